"""The pure train step: sharded == one device, accumulation == large batch, loss falls."""

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax import config as cfglib
from ds_jax import sharding as shd
from ds_jax.data.text import TextData
from ds_jax.loop import train
from ds_jax.train import Trainer
from tests.helpers import tiny_cfg


def _trainer(cfg, devices):
  mc = cfglib.validate(cfg, len(devices))
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, len(devices)), devices)
  return Trainer(cfg, mc, mesh)


def _loss_and_grads(trainer, batch):
  state = trainer.init_state()
  task = trainer.task
  norm = float(np.sum(batch["weights"]))

  def f(params, b):
    return task.objective(params, {}, b, jax.random.key(0), state.step, norm, 1)[0]

  with jax.set_mesh(trainer.mesh):
    b = shd.shard_batch(batch, trainer.mesh)
    loss, grads = jax.jit(jax.value_and_grad(f))(state.params, b)
  return float(loss), jax.device_get(grads)


def test_sharded_equals_single_device():
  cfg = tiny_cfg()
  batch = TextData(cfg).batch(0)
  one = tiny_cfg()
  one.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  l1, g1 = _loss_and_grads(_trainer(one, jax.devices()[:1]), batch)
  many = tiny_cfg()
  many.mesh.update(dict(data=2, fsdp=2, expert=1, tensor=2))
  tr = _trainer(many, jax.devices())
  # The parameters really are sharded (fsdp on embed, tensor on mlp/heads).
  spec = tr.param_sh["layers_0"]["block"]["mlp"]["gate_proj"]["kernel"].spec
  assert tuple(spec) == (None, "fsdp", "tensor")
  l8, g8 = _loss_and_grads(tr, batch)
  assert abs(l1 - l8) < 1e-5
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_accumulation_equals_large_batch():
  def run(accum):
    cfg = tiny_cfg()
    cfg.batch_size = 16
    cfg.optimizer.accumulation_steps = accum
    cfg.optimizer.name = "sgd"
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 0
    cfg.optimizer.grad_clip = 0.0
    cfg.mesh.update(dict(data=2, fsdp=1, expert=1, tensor=1))
    tr = _trainer(cfg, jax.devices()[:2])
    state = tr.init_state()
    state, m = tr.step(state, TextData(cfg).batch(0))
    return jax.device_get(state.params), jax.device_get(m)
  p1, m1 = run(1)
  p4, m4 = run(4)
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) < 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_loss_falls_on_corpus(tmp_path):
  cfg = tiny_cfg()
  cfg.steps = 40
  cfg.log_every = 1
  cfg.optimizer.learning_rate = 1e-2
  cfg.optimizer.warmup_steps = 5
  cfg.checkpoint.every_steps = 40
  out = train(cfg, str(tmp_path), progress=False)
  from ds_jax.metrics import read_metrics
  rows = read_metrics(str(tmp_path))
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[0] > 5.0  # ~ln(259) at init
  assert out["metrics"]["val_loss"] < losses[0] - 1.0
  for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"):
    assert key in rows[0], key
  assert (tmp_path / "loss.png").exists() and (tmp_path / "config.json").exists()
  assert any(p.name.startswith("events") for p in (tmp_path / "tb").iterdir())


def test_nonfinite_step_is_skipped():
  cfg = tiny_cfg()
  cfg.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  tr = _trainer(cfg, jax.devices()[:1])
  state = tr.init_state()
  before = jax.device_get(state.params)
  batch = TextData(cfg).batch(0)
  batch["weights"] = batch["weights"] * np.float32("nan")
  state, m = tr.step(state, batch)
  assert int(m["nonfinite"]) == 1 and int(state.skipped) == 1
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_lora_config_trains_only_adapters():
  from ds_jax.lora import default_lora_config
  cfg = tiny_cfg()
  cfg.mesh.update(dict(data=2, fsdp=1, expert=1, tensor=1))
  with cfg.unlocked():
    cfg.lora = default_lora_config()
  cfg.lora.enabled = True
  cfg.lora.r = 4
  tr = _trainer(cfg, jax.devices()[:2])
  state = tr.init_state()
  base0 = jax.device_get(state.frozen)
  n_trained = sum(x.size for x in jax.tree.leaves(state.params))
  n_total = sum(x.size for x in jax.tree.leaves(tr.full_params(state)))
  assert 0 < n_trained < 0.1 * n_total
  # Adam's moments exist for the adapters only.
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert n_opt == 2 * n_trained
  p0 = jax.device_get(state.params)
  data = TextData(cfg)
  for s in range(2):
    state, m = tr.step(state, data.batch(s))
  for a, b in zip(jax.tree.leaves(base0), jax.tree.leaves(jax.device_get(state.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p0),
                                                      jax.tree.leaves(jax.device_get(state.params)))]
  assert max(moved) > 0


def test_quant_config_switches_on_qat_at_start_step():
  from ds_jax.quant import default_quant_config

  def first_losses(quant):
    cfg = tiny_cfg()
    cfg.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
    if quant:
      with cfg.unlocked():
        cfg.quant = default_quant_config()
      cfg.quant.enabled = True
      cfg.quant.start_step = 1
      cfg.quant.group_size = 32
    tr = _trainer(cfg, jax.devices()[:1])
    state, data, out = tr.init_state(), TextData(cfg), []
    for s in range(2):
      state, m = tr.step(state, data.batch(s))
      out.append(float(m["loss"]))
    return out
  fp, q = first_losses(False), first_losses(True)
  assert fp[0] == q[0]  # before start_step: float
  assert fp[1] != q[1]  # from start_step on: fake-quantized weights and activations
