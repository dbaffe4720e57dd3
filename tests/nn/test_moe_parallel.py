"""Expert parallelism: a mesh with an "expert" axis gives the outputs and gradients of one device."""

import numpy as np
import pytest
import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax import sharding
from ds_jax.config import ModelConfig
from ds_jax.nn.moe import MoE
from ds_jax.nn.moe_parallel import routed_ffn
from ds_jax.nn import moe_dispatch as md

CFG = ModelConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=8, n_shared_experts=1, moe_block_size=2,
                  moe_matmul="padded_einsum")


def _data(cfg, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(8, 4, cfg.hidden_size)), jnp.float32)
  boxed = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                        nn.unbox(boxed))
  return x, params, boxed


def _loss_and_grad(cfg):
  def loss(p, x):
    y, aux = MoE(cfg).apply({"params": p}, x, False)
    return jnp.sum(jnp.sin(y)) + aux["expert_balance"] + aux["z_loss"], (y, aux)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


def _compare(cfg, mesh_sizes):
  x, params, boxed = _data(cfg)
  f = _loss_and_grad(cfg)
  (l0, (y0, a0)), g0 = jax.jit(f)(params, x)
  mesh = sharding.make_mesh(mesh_sizes)
  with jax.set_mesh(mesh):
    ps = jax.device_put(params, sharding.param_shardings(boxed, mesh))
    xs = jax.device_put(x, sharding.batch_sharding(mesh, 3))
    (l1, (y1, a1)), g1 = jax.jit(f)(ps, xs)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(a1["load"], a0["load"], rtol=1e-6)
  np.testing.assert_allclose(a1["drop_frac"], a0["drop_frac"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g0)
  assert float(jnp.abs(g0[0]["experts"]["gate_proj"]).max()) > 0


@pytest.mark.parametrize("sizes", [
    pytest.param(dict(data=4, fsdp=1, expert=2, tensor=1), marks=pytest.mark.slow),
    dict(data=1, fsdp=2, expert=4, tensor=1),
    pytest.param(dict(data=1, fsdp=1, expert=8, tensor=1), marks=pytest.mark.slow),
])
def test_expert_parallel_equals_one_device(sizes):
  _compare(CFG, sizes)


@pytest.mark.parametrize("sizes", [
    dict(data=2, fsdp=1, expert=2, tensor=2),
    pytest.param(dict(data=1, fsdp=2, expert=4, tensor=1), marks=pytest.mark.slow),
])
def test_block_loop_sharded_equals_one_device(sizes):
  """The CPU loop kernel's hand-written backward inside shard_map: replicated weights get the
  psum of their per-shard gradients."""
  _compare(CFG.replace(moe_matmul="block_loop"), sizes)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [
    dict(data=2, fsdp=1, expert=2, tensor=2),
    dict(data=8, fsdp=1, expert=1, tensor=1),
])
def test_other_meshes_equal_one_device(sizes):
  _compare(CFG.replace(moe_matmul="ragged_dot"), sizes)


@pytest.mark.slow
def test_expert_parallel_capacity_layout():
  """The GShard [E, C, D] exchange: huge capacity equals dropless on one device."""
  cfg = CFG.replace(moe_dispatch="capacity", capacity_factor=8.0)
  x, params, boxed = _data(cfg, 1)
  want, _ = jax.jit(MoE(CFG).apply)({"params": params}, x)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=4, tensor=1))
  with jax.set_mesh(mesh):
    got, aux = jax.jit(lambda p, x: MoE(cfg).apply({"params": p}, x, False))(params, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(aux["drop_frac"]) == 0.0


def test_expert_parallel_capacity_drops_per_group():
  """With a tight capacity each expert shard's tokens form one GShard group."""
  rng = np.random.default_rng(2)
  e, d, f, t, k = 8, 4, 3, 32, 2
  kern = md.ExpertKernels(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                            for s in [(e, d, f), (e, d, f), (e, f, d)]))
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, e, size=(t, k)), jnp.int32)
  w = jnp.asarray(rng.random((t, k)), jnp.float32)
  kw = dict(strategy="padded_einsum", block=1, dtype=jnp.float32, cap_factor=1.0)
  groups = 4
  want, drops = [], 0
  for g in range(groups):  # each shard of t / groups tokens on its own device
    sl = slice(g * t // groups, (g + 1) * t // groups)
    yg, dg = md.local_moe(x[sl], idx[sl], w[sl], jnp.ones((t // groups,), bool), kern, **kw)
    want.append(yg)
    drops += int(dg)
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
  with jax.set_mesh(mesh):
    got, frac = jax.jit(lambda *a: routed_ffn(*a, **kw))(x, idx, w, kern)
  np.testing.assert_allclose(got, jnp.concatenate(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(frac, drops / (t * k), rtol=1e-6)
  assert drops > 0


@pytest.mark.slow
def test_token_count_not_divisible_by_shards():
  """T = 30 tokens on 8 shards: padded with invalid tokens that take no expert capacity."""
  rng = np.random.default_rng(3)
  e, d, f, t, k = 8, 4, 3, 30, 2
  kern = md.ExpertKernels(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                            for s in [(e, d, f), (e, d, f), (e, f, d)]))
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, e, size=(t, k)), jnp.int32)
  w = jnp.asarray(rng.random((t, k)), jnp.float32)
  kw = dict(strategy="padded_einsum", block=2, dtype=jnp.float32)
  want, _ = md.local_moe(x, idx, w, jnp.ones((t,), bool), kern, **kw)
  mesh = sharding.make_mesh(dict(data=4, fsdp=1, expert=2, tensor=1))
  with jax.set_mesh(mesh):
    got, frac = jax.jit(lambda *a: routed_ffn(*a, **kw))(x, idx, w, kern)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(frac) == 0.0
