"""Fake quantization: NumPy reference, error bounds on Gaussian weights, STE and LSQ gradients."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ds_jax import quant
from ds_jax.quant.calibrate import mse_scale
from ds_jax.quant.config import QuantRule
from ds_jax.quant.fake import fake_quant_array


def ref_qdq(w, bits, group, symmetric, scale_dtype="float32"):
  """Obvious loop over groups of `group` rows (0: all rows) of a [K, N] kernel, per column."""
  k, _ = w.shape
  g = k if group == 0 else group
  out = np.zeros_like(w)
  lo_q, hi_q = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  for start in range(0, k, g):
    v = w[start:start + g].astype(np.float64)
    if symmetric:
      s, z = np.abs(v).max(0) / hi_q, 0.0
    else:
      lo, hi = np.minimum(v.min(0), 0.0), np.maximum(v.max(0), 0.0)
      s = (hi - lo) / (2 ** bits - 1)
    s = s.astype(np.float32).astype(getattr(ml_dtypes, scale_dtype, np.float32)).astype(np.float64)
    if not symmetric:
      z = np.clip(lo_q - np.round(lo / s), lo_q, hi_q)
    q = np.clip(np.round(v / s) + z, lo_q, hi_q)
    out[start:start + g] = (q - z) * s
  return out


def rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def gauss():
  return np.asarray(jax.random.normal(jax.random.PRNGKey(0), (256, 64)), np.float32)


@pytest.mark.parametrize("bits,group,symmetric,scale_dtype", [
    (8, 0, True, "float32"), (4, 128, True, "bfloat16"), (4, 32, False, "bfloat16"),
    (4, 0, False, "float32")])
def test_matches_numpy_reference(gauss, bits, group, symmetric, scale_dtype):
  rule = QuantRule("k", bits=bits, group_size=group, symmetric=symmetric)
  got = np.asarray(fake_quant_array(jnp.asarray(gauss), rule, 0, scale_dtype))
  np.testing.assert_allclose(got, ref_qdq(gauss, bits, group, symmetric, scale_dtype),
                             atol=1e-6, rtol=1e-6)


# Upper bounds on relative Frobenius error, from REFERENCES.md (measured: int8 per-channel 0.8%,
# int4 per-channel 15%, g128 11.7%, g32 9.7%) with a little slack; asymmetric/MSE must be lower.
BOUNDS = [(8, 0, "absmax", True, 0.015), (4, 0, "absmax", True, 0.15),
          (4, 128, "absmax", True, 0.122), (4, 64, "absmax", True, 0.112),
          (4, 32, "absmax", True, 0.10), (4, 128, "absmax", False, 0.105),
          (4, 128, "mse", True, 0.105), (4, 32, "mse", False, 0.085),
          (4, 128, "lsq", True, 0.105)]


@pytest.mark.parametrize("bits,group,calibration,symmetric,bound", BOUNDS)
def test_error_bounds(gauss, bits, group, calibration, symmetric, bound):
  qcfg = quant.QuantConfig((QuantRule("w", bits=bits, group_size=group, symmetric=symmetric,
                                      calibration=calibration),))
  params = {"w": jnp.asarray(gauss)}
  got = quant.fake_quantize(params, qcfg, quant.init_qstate(params, qcfg))["w"]
  assert got.dtype == jnp.float32 and got.shape == gauss.shape
  err = rel_err(np.asarray(got), gauss)
  assert 0.0 < err < bound


def test_mse_never_worse_than_absmax_per_group(gauss):
  w = jnp.asarray(gauss)
  for sym in (True, False):
    a = fake_quant_array(w, QuantRule("w", 4, 32, sym, "absmax"), 0, "bfloat16")
    m = fake_quant_array(w, QuantRule("w", 4, 32, sym, "mse"), 0, "bfloat16")
    ea = ((np.asarray(a) - gauss) ** 2).reshape(8, 32, 64).sum(1)
    em = ((np.asarray(m) - gauss) ** 2).reshape(8, 32, 64).sum(1)
    assert np.all(em <= ea + 1e-7) and em.sum() < 0.97 * ea.sum()


def test_ste_gradient_one_inside_zero_outside():
  w = np.array(jax.random.normal(jax.random.PRNGKey(1), (64, 8)), np.float32)
  w[3, 2] = 12.0  # outlier: the MSE search clips it
  rule = QuantRule("w", bits=4, group_size=0, calibration="mse")
  c = jax.random.normal(jax.random.PRNGKey(2), w.shape)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant_array(v, rule, 0, "bfloat16") * c)))(
      jnp.asarray(w))
  s, _ = mse_scale(jnp.asarray(w)[None], 4, True, "bfloat16")  # [1, 1, 8]
  s = np.asarray(s)[0]
  inside = (w >= -8 * s) & (w <= 7 * s)
  assert not inside[3, 2] and inside.mean() > 0.9
  np.testing.assert_allclose(np.asarray(grad)[inside], np.asarray(c)[inside], rtol=1e-6)
  assert not np.any(np.asarray(grad)[~inside])
  # the naive cast has no gradient at all; the STE version does
  naive = jax.grad(lambda v: jnp.sum(v.astype(jnp.int4).astype(jnp.float32) * c))(jnp.asarray(w))
  assert not np.any(np.asarray(naive)) and np.count_nonzero(grad) == inside.sum()


def test_lsq_scale_gradient_formula():
  w = jax.random.normal(jax.random.PRNGKey(3), (32, 4))
  rule = QuantRule("w", bits=4, group_size=16, calibration="lsq")
  s0 = jnp.full((2, 1, 4), 0.2)  # small enough that some values clip
  gs = jax.jit(jax.grad(lambda s: jnp.sum(fake_quant_array(w, rule, 0, "float32", s))))(s0)
  v = np.asarray(w).reshape(2, 16, 4) / 0.2
  per = np.where(v > 7, 7.0, np.where(v < -8, -8.0, np.round(v) - v))
  g = 1.0 / np.sqrt(16 * 7)
  np.testing.assert_allclose(np.asarray(gs), per.sum(1, keepdims=True) * g, rtol=1e-4, atol=1e-5)
  assert np.any(v > 7) and np.all(np.asarray(gs) != 0)


def test_lsq_training_lowers_error():
  w = jax.random.normal(jax.random.PRNGKey(4), (128, 16))
  params = {"w": w}
  qcfg = quant.QuantConfig((QuantRule("w", bits=4, group_size=32, calibration="lsq"),),
                           scale_dtype="float32")
  qs = {"w": jnp.full((4, 1, 16), 0.5)}  # deliberately poor start
  loss = lambda q: jnp.sum((quant.fake_quantize(params, qcfg, q)["w"] - w) ** 2)
  first = loss(qs)
  step = jax.jit(lambda q: jax.tree.map(lambda s, g: s - 0.05 * g, q, jax.grad(loss)(q)))
  for _ in range(30):
    qs = step(qs)
  assert loss(qs) < 0.5 * first


def test_experts_quantized_per_expert_and_group():
  """[L, E, D, F] under layers_0/.../experts: scales per (layer, expert, group, column)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 3, 64, 8)).astype(np.float32)
  w[1, 2] *= 50.0  # one loud expert must not change the others' grids
  path = {"layers_0": {"block": {"mlp": {"experts": {"gate_proj": jnp.asarray(w)}}}}}
  qcfg = quant.quant_config(bits=4, group_size=32, scale_dtype="float32")
  assert quant.quantized_paths(path, qcfg)["layers_0/block/mlp/experts/gate_proj"].bits == 4
  got = np.asarray(quant.fake_quantize(path, qcfg)["layers_0"]["block"]["mlp"]["experts"]
                   ["gate_proj"])
  for l in range(2):
    for e in range(3):
      np.testing.assert_allclose(got[l, e], ref_qdq(w[l, e], 4, 32, True), atol=1e-5, rtol=1e-6)
  assert rel_err(got[0, 0], w[0, 0]) < 0.11


def test_lsq_scales_in_params_are_used_and_trained():
  """`with_qstate` puts LSQ (log) scales into the params; `qat_transform` pops them, uses them,
  and the gradient reaches them (so the optimizer trains them with the weights)."""
  w = jax.random.normal(jax.random.PRNGKey(5), (64, 8))
  params = {"mlp": {"up_proj": {"kernel": w}}}
  qcfg = quant.quant_config(bits=4, group_size=32, calibration="lsq", scale_dtype="float32")
  p = quant.with_qstate(params, qcfg)
  assert set(p[quant.QSTATE_KEY]) == {"mlp/up_proj/kernel"}
  out = quant.qat_transform(qcfg)(p, jnp.asarray(0))
  assert quant.QSTATE_KEY not in out
  _, qs = quant.split_qstate(p)
  np.testing.assert_allclose(np.asarray(qs["mlp/up_proj/kernel"]),
                             np.asarray(quant.init_qstate(params, qcfg)["mlp/up_proj/kernel"]),
                             rtol=1e-6)
  ref = quant.fake_quantize(params, qcfg, qs)
  np.testing.assert_array_equal(np.asarray(out["mlp"]["up_proj"]["kernel"]),
                                np.asarray(ref["mlp"]["up_proj"]["kernel"]))
  target = jnp.roll(w, 1, axis=0)
  loss = lambda q: jnp.sum((quant.qat_transform(qcfg)(q, 0)["mlp"]["up_proj"]
                            ["kernel"] - target) ** 2)
  g = jax.grad(loss)(p)[quant.QSTATE_KEY]["mlp/up_proj/kernel"]
  assert g.shape == (2, 1, 8) and np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g))
