"""RoPE and YaRN against formula transcriptions and transformers' rope init functions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.config import RopeScaling
from ds_jax.nn.rope import (apply_rope, inv_frequencies, yarn_attention_factor, yarn_mscale,
                            yarn_softmax_mscale)

# (dim, theta, scaling): DeepSeek-V2 (factor 40), V2-Lite / V3 style (factor 40, mscale 1), a
# small-context case whose ramp covers several dimensions, and a ratio != 1 case.
CASES = [
    (64, 10000.0, RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 0.707)),
    (64, 10000.0, RopeScaling("yarn", 40.0, 4096, 32.0, 1.0, 1.0, 1.0)),
    (16, 500.0, RopeScaling("yarn", 4.0, 64, 8.0, 2.0, 0.9, 0.7)),
    (8, 10000.0, RopeScaling("yarn", 4.0, 64, 32.0, 1.0, 1.0, 0.0)),
]


def formula_inv_freq(dim, theta, s):
  """YaRN paper §3 / DeepSeek reference, one dimension at a time."""
  def dim_of(rot):  # dimension whose wavelength makes `rot` turns in the original context
    return dim * math.log(s.original_max_position_embeddings / (rot * 2 * math.pi)) / (
        2 * math.log(theta))
  low, high = max(math.floor(dim_of(s.beta_fast)), 0), min(math.ceil(dim_of(s.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  out = []
  for i in range(dim // 2):
    extrapolated = 1.0 / theta ** (2 * i / dim)
    interpolated = extrapolated / s.factor
    gamma = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: keep, 0: interpolate
    out.append(interpolated * (1 - gamma) + extrapolated * gamma)
  return np.array(out)


@pytest.mark.parametrize("dim,theta,s", CASES)
def test_yarn_inv_frequencies_match_formula(dim, theta, s):
  got = inv_frequencies(dim, theta, s)
  np.testing.assert_allclose(got, formula_inv_freq(dim, theta, s), rtol=1e-6)
  # Sanity of the regime: highest frequency kept, lowest divided by factor.
  base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
  assert got[0] == pytest.approx(base[0], rel=1e-6)
  assert got[-1] == pytest.approx(base[-1] / s.factor, rel=1e-6)


def test_linear_and_plain_frequencies():
  base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
  np.testing.assert_allclose(inv_frequencies(16, 10000.0), base, rtol=1e-6)
  np.testing.assert_allclose(inv_frequencies(16, 10000.0, RopeScaling("linear", 8.0)),
                             base / 8, rtol=1e-6)


def test_mscale_factors():
  s = RopeScaling("yarn", 40.0, 4096, mscale=0.9, mscale_all_dim=0.7)
  m = lambda k: 0.1 * k * math.log(40.0) + 1.0
  assert yarn_mscale(40.0, 0.9) == pytest.approx(m(0.9))
  assert yarn_mscale(1.0, 0.9) == 1.0
  assert yarn_attention_factor(s) == pytest.approx(m(0.9) / m(0.7))
  assert yarn_softmax_mscale(s) == pytest.approx(m(0.7) ** 2)
  assert yarn_attention_factor(RopeScaling()) == 1.0 and yarn_softmax_mscale(RopeScaling()) == 1.0
  # mscale_all_dim unset: cos/sin scaled by mscale(factor), softmax scale untouched.
  s0 = RopeScaling("yarn", 40.0, 4096, mscale=1.0, mscale_all_dim=0.0)
  assert yarn_attention_factor(s0) == pytest.approx(m(1.0)) and yarn_softmax_mscale(s0) == 1.0


def test_apply_rope_matches_complex_rotation():
  """Half-split pairs (j, j + K/2) rotate like the complex number x_j + i x_{j+K/2}."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 1000, size=(2, 5))
  inv = inv_frequencies(8, 10000.0, CASES[2][2])
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv, cos_sin_scale=1.3))
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, :, None, None] * inv) * 1.3
  np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
  inv = inv_frequencies(16, 10000.0)
  def score(m, n):
    qm = apply_rope(jnp.asarray(q), jnp.array([[m]]), inv)
    kn = apply_rope(jnp.asarray(k), jnp.array([[n]]), inv)
    return float(jnp.sum(qm * kn))
  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-5)
  assert abs(score(7, 3) - score(7, 5)) > 1e-3


@pytest.mark.slow  # importing torch + transformers costs ~10 s here
@pytest.mark.parametrize("dim,theta,s", CASES)
def test_yarn_matches_transformers(dim, theta, s):
  pytest.importorskip("torch")
  rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
  from transformers import DeepseekV3Config
  cfg = DeepseekV3Config(
      hidden_size=64, num_attention_heads=2, qk_rope_head_dim=dim, qk_nope_head_dim=8,
      max_position_embeddings=s.original_max_position_embeddings * int(s.factor),
      rope_scaling={"type": "yarn", "rope_theta": theta, "factor": s.factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                    "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale,
                    "mscale_all_dim": s.mscale_all_dim})
  inv, factor = rope_utils.ROPE_INIT_FUNCTIONS["yarn"](cfg)
  np.testing.assert_allclose(inv_frequencies(dim, theta, s), inv.numpy(), rtol=1e-6)
  assert yarn_attention_factor(s) == pytest.approx(factor, rel=1e-6)
