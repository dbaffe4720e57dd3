"""MoE layer on one device: every grouped-matmul strategy against a slow NumPy loop."""

import functools

import numpy as np
import pytest
import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.nn import moe_dispatch as md
from ds_jax.nn.moe import AUX_KEYS, MoE, bias_update

CFG = ModelConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3,
                  moe_intermediate_size=8, n_shared_experts=1, routed_scaling_factor=1.5,
                  initializer_range=0.3)


def _setup(cfg, b=2, l=8, seed=0):
  """Inputs and NumPy-random parameters (jitted flax init costs seconds of compile here)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, l, cfg.hidden_size)), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
  if "e_score_correction_bias" in params["gate"]:
    params["gate"]["e_score_correction_bias"] = jnp.asarray(rng.normal(size=(8,)) * 0.2,
                                                            jnp.float32)
  return x, params


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(cfg, params, x, deterministic=True):
  return MoE(cfg).apply({"params": params}, x, deterministic)


def ref_moe(x, p, cfg, drop_mask=None):
  """Token-by-token NumPy MoE: sum_k w_k * SwiGLU_{e_k}(x) + shared SwiGLU(x)."""
  from tests.nn.test_router import ref_route
  x = np.asarray(x, np.float64).reshape(-1, cfg.hidden_size)
  g = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
  logits = x @ np.asarray(p["gate"]["kernel"], np.float64)
  idx, w = ref_route(logits, cfg, np.asarray(p["gate"].get("e_score_correction_bias", 0)))
  silu = lambda z: z / (1 + np.exp(-z))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      if drop_mask is not None and drop_mask[t, j]:
        continue
      e = idx[t, j]
      h = silu(x[t] @ g["gate_proj"][e]) * (x[t] @ g["up_proj"][e])
      y[t] += w[t, j] * (h @ g["down_proj"][e])
  if cfg.n_shared_experts:
    s = {k: np.asarray(v["kernel"], np.float64) for k, v in p["shared_experts"].items()}
    y += (silu(x @ s["gate_proj"]) * (x @ s["up_proj"])) @ s["down_proj"]
  return y, idx


def test_param_tree_and_aux_keys():
  cfg = CFG.replace(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1)
  x, params = _setup(cfg)
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes == {
      "gate": {"kernel": (16, 8), "e_score_correction_bias": (8,)},
      "experts": {"gate_proj": (8, 16, 8), "up_proj": (8, 16, 8), "down_proj": (8, 8, 16)},
      "shared_experts": {"gate_proj": {"kernel": (16, 8)}, "up_proj": {"kernel": (16, 8)},
                         "down_proj": {"kernel": (8, 16)}}}
  boxed = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)["params"]
  assert boxed["experts"]["down_proj"].names == ("expert", "mlp", "embed")
  assert boxed["experts"]["gate_proj"].names == ("expert", "embed", "mlp")
  assert boxed["gate"]["kernel"].names == ("embed", None)
  _, aux = _apply(cfg, params, x)
  assert set(aux) == set(AUX_KEYS)
  assert aux["load"].shape == (8,) and all(aux[k].shape == () for k in AUX_KEYS if k != "load")
  np.testing.assert_allclose(aux["load"].sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("matmul,block", [
    ("dense_mask", 1), ("padded_einsum", 4), ("block_loop", 4),
    pytest.param("block_loop", 1, marks=pytest.mark.slow),
    pytest.param("padded_einsum", 1, marks=pytest.mark.slow),
    pytest.param("padded_einsum", 64, marks=pytest.mark.slow),
    pytest.param("ragged_dot", 1, marks=pytest.mark.slow)])
def test_dropless_matches_numpy(matmul, block):
  cfg = CFG.replace(moe_matmul=matmul, moe_block_size=block)
  x, params = _setup(cfg)
  y, aux = _apply(cfg, params, x)
  want, _ = ref_moe(x, params, cfg)
  np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-4, atol=1e-5)
  assert float(aux["drop_frac"]) == 0.0


@pytest.mark.parametrize("matmuls", [("padded_einsum", "block_loop"), pytest.param(
    ("ragged_dot",), marks=pytest.mark.slow)])
def test_strategies_agree_in_gradients(matmuls):
  cfg = CFG.replace(topk_method="group_limited_greedy", n_group=4, topk_group=2)
  x, params = _setup(cfg, seed=3)

  def loss(p, x, mm):
    y, aux = MoE(cfg.replace(moe_matmul=mm, moe_block_size=4)).apply({"params": p}, x)
    return jnp.sum(jnp.sin(y)) + aux["expert_balance"]
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  ref = grad(params, x, "dense_mask")
  for mm in matmuls:
    got = grad(params, x, mm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, ref)
  assert float(jnp.abs(ref[0]["experts"]["down_proj"]).max()) > 0


@pytest.mark.parametrize("matmuls", [("padded_einsum",), pytest.param(
    ("dense_mask", "ragged_dot"), marks=pytest.mark.slow)])
def test_capacity_huge_equals_dropless(matmuls):
  x, params = _setup(CFG)
  y0, _ = _apply(CFG, params, x)
  for mm in matmuls:
    cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=8.0, moe_matmul=mm)
    y, aux = _apply(cfg, params, x, False)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)
    assert float(aux["drop_frac"]) == 0.0


def test_capacity_drops_like_gshard():
  """First choices fill expert buffers before second choices; overflow is dropped."""
  cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=1.0,
                    n_shared_experts=0)
  x, params = _setup(cfg, seed=5)
  for det, cf in ((False, 0.5), (True, 1.0)):
    y, aux = _apply(cfg, params, x, det)
    _, idx = ref_moe(x, params, cfg)
    t, k = idx.shape
    cap = int(np.ceil(cf * t * k / 8))
    fill = np.zeros(8, int)
    drop = np.zeros((t, k), bool)
    for j in range(k):  # choice-major priority
      for n in range(t):
        e = idx[n, j]
        drop[n, j] = fill[e] >= cap
        fill[e] += 1
    want, _ = ref_moe(x, params, cfg, drop)
    np.testing.assert_allclose(np.asarray(y).reshape(want.shape), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux["drop_frac"], drop.mean(), rtol=1e-6)
    assert drop.any()


def test_block_layout_is_dropless_under_worst_case_skew():
  """All slots on one expert: the static row bound N + E (b - 1) still holds every slot."""
  rng = np.random.default_rng(9)
  k = md.ExpertKernels(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                         for s in [(4, 6, 5), (4, 6, 5), (4, 5, 6)]))
  x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  valid = jnp.arange(10) != 7

  @jax.jit
  def both(e):
    got, kept = md.expert_rows(x, e, valid, k, "padded_einsum", 3, jnp.float32)
    want, _ = md.expert_rows(x, e, valid, k, "dense_mask", 1, jnp.float32)
    return got, kept, want
  for e in (jnp.full((10,), 2), jnp.arange(10) % 4):
    got, kept, want = both(e)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[7]).max()) == 0.0 and bool(jnp.all(kept == valid))


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_bias_update_on_model_params(scan):
  from ds_jax.models import lm
  cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, n_routed_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=8, first_k_dense_replace=1,
                    topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1,
                    bias_update_speed=0.1, scan_layers=scan)
  params = jax.eval_shape(lambda: lm.init(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  load = jnp.array([[0.4, 0.1, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
  new = bias_update(params, load, 0, cfg)
  got = []
  for i in (1, 2):
    name, pos = lm.layer_location(cfg, i)
    b = new[name]["block"]["mlp"]["gate"]["e_score_correction_bias"]
    got.append(b if pos is None else b[pos])
  np.testing.assert_allclose(got[0], [-0.1, 0.1, 0.0, 0.0])
  np.testing.assert_allclose(got[1], [0.1, 0.1, -0.1, -0.1])
  name, pos = lm.layer_location(cfg, 1)
  old = params[name]["block"]["mlp"]["gate"]["e_score_correction_bias"]
  assert float(jnp.abs(old).max()) == 0.0  # the input tree is untouched


def test_bias_update_covers_mtp_moe_blocks():
  """The MTP modules' MoE gates get the V3 bias update from their own load, which the train
  objective hands to `post_update` (traced abstractly: no compile)."""
  from ds_jax import config as cfglib
  from ds_jax.models import lm
  from ds_jax.train import LMTask
  cfg = cfglib.load_config("experiments/tiny_moe.py", [
      "model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64",
      "model.moe_intermediate_size=16", "model.n_routed_experts=4",
      "model.num_experts_per_tok=2", "model.first_k_dense_replace=1",
      "model.topk_method=noaux_tc", "model.scoring_func=sigmoid", "model.n_group=1",
      "model.topk_group=1", "model.aux_loss_alpha=0.0", "model.bias_update_speed=0.1",
      "model.num_nextn_predict_layers=1", "batch_size=2", "seq_len=16"])
  cfg.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  mc = cfglib.validate(cfg, 1)
  params = jax.eval_shape(lambda: lm.init(mc, jax.random.key(0)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  task = LMTask(cfg, mc)
  toks = jnp.zeros((2, 17), jnp.int32)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((2, 16))}
  _, metrics = jax.eval_shape(lambda p: task.objective(p, None, batch, jax.random.key(1), 0,
                                                       32.0, 1), params)
  assert metrics["mtp_moe/load"].shape == (1, 4)
  trunk = jnp.full((1, 4), 0.25)
  new = task.post_update(params, {"moe/load": trunk,
                                  "mtp_moe/load": jnp.array([[0.4, 0.1, 0.25, 0.25]])}, 0)
  np.testing.assert_allclose(
      new["mtp_0"]["block"]["mlp"]["gate"]["e_score_correction_bias"], [-0.1, 0.1, 0.0, 0.0])
  name, pos = lm.layer_location(mc, 1)
  b = new[name]["block"]["mlp"]["gate"]["e_score_correction_bias"]
  np.testing.assert_allclose(b if pos is None else b[pos], 0.0)  # balanced trunk: no move
