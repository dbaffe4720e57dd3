"""Quantized matmuls vs NumPy, and fake-quant == packed through `lm.apply` (dense and MoE)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax import quant
from ds_jax.config import ModelConfig
from ds_jax.models import lm
from ds_jax.quant.matmul import ActQuantKernel


def ref_tokens(x, bits, axis=-1):
  qmax = 2 ** (bits - 1) - 1
  s = np.abs(x).max(axis=axis, keepdims=True) / qmax
  s = np.where(s > 0, s, 1.0)
  return np.clip(np.round(x / s), -qmax, qmax) * s


@pytest.mark.parametrize("eq,xshape,wshape,stack,group,symmetric", [
    ("...z,zab->...ab", (2, 3, 32), (32, 2, 3), 0, 16, False),
    ("ecd,edf->ecf", (4, 5, 32), (4, 32, 6), 1, 8, True),
    ("nbd,ndf->nbf", (3, 4, 16), (3, 16, 5), 1, 0, False)])
@pytest.mark.parametrize("backend", ["int8", "dequant"])
def test_packed_einsum_matches_numpy(eq, xshape, wshape, stack, group, symmetric, backend):
  rng = np.random.default_rng(0)
  x = rng.normal(size=xshape).astype(np.float32)
  w = rng.normal(size=wshape).astype(np.float32)
  rule = quant.QuantRule("w", bits=4, group_size=group, symmetric=symmetric, act_bits=8,
                         stacked_axes=stack)
  qcfg = quant.QuantConfig((rule,), scale_dtype="float32")
  pk = quant.quantize_params({"w": jnp.asarray(w)}, qcfg, backend=backend)["w"]
  w_deq = np.asarray(quant.fake_quantize({"w": jnp.asarray(w)}, qcfg)["w"], np.float64)
  want = np.einsum(eq, ref_tokens(x.astype(np.float64), 8), w_deq)
  got = jax.jit(lambda v: pk.einsum(eq, v, dtype=jnp.float32))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
  got_aq = ActQuantKernel(jnp.asarray(w_deq, jnp.float32), bits=8).einsum(eq, jnp.asarray(x),
                                                                      dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(got_aq), want, rtol=2e-5, atol=2e-5)


def test_activation_quant_is_per_token():
  x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
  w = ActQuantKernel(jnp.asarray(np.random.default_rng(2).normal(size=(16, 8)), jnp.float32),
                     bits=4)
  y = np.asarray(w.einsum("tz,zf->tf", jnp.asarray(x), dtype=jnp.float32))
  x2 = x.copy()
  x2[0] *= 1000.0
  y2 = np.asarray(w.einsum("tz,zf->tf", jnp.asarray(x2), dtype=jnp.float32))
  np.testing.assert_allclose(y2[1:], y[1:], rtol=1e-6)
  assert np.abs(y - x @ np.asarray(w.w)).max() > 1e-3  # int4 activations are visibly coarse
  g = jax.grad(lambda v: jnp.sum(w.einsum("tz,zf->tf", v, dtype=jnp.float32)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.asarray(w.w).sum(1), x.shape),
                             rtol=1e-5)  # straight-through


DENSE = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
MOE = DENSE.replace(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_shared_experts=1, first_k_dense_replace=1)


def init(cfg):
  """Random parameters of the model's shapes without compiling an init (norm scales = 1)."""
  shapes = jax.eval_shape(lambda: lm.init(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)

  def fill(path, a):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(a.shape, a.dtype)
    return jnp.asarray(rng.normal(size=a.shape) * 0.1, a.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def dense_params():
  return init(DENSE)


def greedy(cfg, params, prompt, n):
  """Greedy decoding by full recompute on a fixed-length buffer (one compile)."""
  fwd = jax.jit(lambda p, t: lm.apply(cfg, p, t))
  toks = np.zeros((1, len(prompt) + n), np.int32)
  toks[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    toks[0, i] = int(jnp.argmax(fwd(params, jnp.asarray(toks))[0, i - 1]))
  return toks[0].tolist(), fwd(params, jnp.asarray(toks))


def unstack(params, n):
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  for i in range(n):
    out[f"layer_{i}"] = jax.tree.map(lambda a: a[i], params["layers_0"])
  return out


def test_act_quant_kernels_slice_under_scan(dense_params):
  qcfg = quant.quant_config(4, 16, act_bits=4)
  tok = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, DENSE.vocab_size)

  late = quant.qat_transform(dataclasses.replace(qcfg, start_step=5))

  @jax.jit
  def run(params, step):
    qp = quant.qat_params(params, qcfg)
    assert isinstance(qp["layers_0"]["block"]["mlp"]["up_proj"]["kernel"], ActQuantKernel)
    return (lm.apply(DENSE, qp, tok),
            lm.apply(DENSE.replace(scan_layers=False), unstack(qp, 2), tok),
            lm.apply(DENSE, quant.fake_quantize(params, qcfg), tok),
            lm.apply(DENSE, late(params, step), tok), lm.apply(DENSE, params, tok))
  scanned, looped, w_only, gated, fp = run(dense_params, 5)
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(looped), atol=1e-5)
  np.testing.assert_allclose(np.asarray(gated), np.asarray(scanned), atol=1e-6)
  gated4 = run(dense_params, 4)[3]  # before start_step: the float model
  np.testing.assert_allclose(np.asarray(gated4), np.asarray(fp), atol=1e-6)
  assert np.abs(np.asarray(scanned - w_only)).max() > 1e-4  # activations were quantized


def check_packed_equals_fake(cfg, params, tmp_path):
  qcfg = quant.quant_config(4, 16, act_bits=8, symmetric=cfg is DENSE)
  paths = quant.quantized_paths(params, qcfg)
  if cfg.is_moe:
    assert "layers_1/block/mlp/experts/down_proj" in paths
    assert not any(p.endswith("mlp/gate/kernel") for p in paths)
  quant.save_packed(str(tmp_path), quant.quantize_params(params, qcfg), qcfg)
  packed, _ = quant.load_packed(str(tmp_path), backend="int8")
  prompt = [3, 1, 4, 1, 5]
  want_toks, want = greedy(cfg, jax.jit(lambda p: quant.qat_params(p, qcfg))(params), prompt, 5)
  got_toks, got = greedy(cfg, packed, prompt, 5)
  assert got_toks == want_toks
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3)
  assert np.abs(np.asarray(got)).max() > 0.05  # not trivially zero


def test_packed_equals_fake_quant_dense(dense_params, tmp_path):
  check_packed_equals_fake(DENSE, dense_params, tmp_path)


@pytest.mark.slow
def test_packed_equals_fake_quant_moe(tmp_path):
  check_packed_equals_fake(MOE, init(MOE), tmp_path)
