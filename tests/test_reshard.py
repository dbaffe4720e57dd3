"""Resharding restore: a checkpoint written on mesh (data=2, expert=4) restores onto (data=4,
expert=2) and onto one device, and the next training step gives the same loss and parameters."""

import os

import jax
import numpy as np
import pytest

from ds_jax import checkpoint as ckpt
from ds_jax import config as cfglib
from ds_jax import sharding as shd
from ds_jax.data.text import TextData
from ds_jax.train import Trainer
from tests.helpers import REPO

# One MoE layer (8 experts, top-2, 1 shared), MLA attention: the smallest tiny-MoE variant.
OVERRIDES = ["seq_len=32", "batch_size=8", "model.num_hidden_layers=1",
             "model.first_k_dense_replace=0", "optimizer.warmup_steps=0"]


def _trainer(mesh_sizes: dict, devices=None):
  cfg = cfglib.load_config(os.path.join(REPO, "experiments/tiny_moe.py:smoke"), OVERRIDES)
  sizes = {**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh_sizes}
  mesh = shd.make_mesh(sizes, devices)
  return cfg, Trainer(cfg, cfglib.model_config(cfg.model), mesh)


def _next_step(trainer, state, batch):
  state, m = trainer.step(state, batch)
  return float(m["loss"]), jax.device_get(state.params)


@pytest.mark.parametrize("target", ["data4_expert2", pytest.param("one_device",
                                                                  marks=pytest.mark.slow)])
def test_restore_onto_another_mesh(tmp_path, target):
  cfg, src = _trainer(dict(data=2, expert=4))
  data = TextData(cfg)
  state = src.init_state()
  state, _ = src.step(state, data.batch(0))
  mngr = ckpt.manager(str(tmp_path))
  ckpt.save(mngr, 1, state, force=True)
  mngr.wait_until_finished()
  ref_loss, ref_params = _next_step(src, state, data.batch(1))

  if target == "one_device":
    _, dst = _trainer({}, jax.devices()[:1])
  else:
    _, dst = _trainer(dict(data=4, expert=2))
  step, restored = ckpt.restore_latest(ckpt.manager(str(tmp_path)), dst.abstract_state)
  assert step == 1
  experts = restored.params["layers_0"]["block"]["mlp"]["experts"]["gate_proj"]
  assert experts.sharding == dst.param_sh["layers_0"]["block"]["mlp"]["experts"]["gate_proj"]
  loss, params = _next_step(dst, restored, data.batch(1))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=0)
  for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
