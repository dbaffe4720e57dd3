"""Rotary position embeddings (half-split "rotate_half" convention of the HF Llama reference),
with linear and YaRN scaling as DeepSeek-V2/V3 configure it.

YaRN (Peng et al. 2023) changes three things, all computed here from `RopeScaling`:
  * the inverse frequencies: low-frequency dimensions are interpolated by `factor`, high-frequency
    ones kept, with a linear ramp between the dimensions set by `beta_fast` / `beta_slow`
    (`inv_frequencies`);
  * cos and sin are multiplied by an attention factor (`yarn_attention_factor`), which scales the
    rope part of every attention logit by its square;
  * DeepSeek's MLA also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2
    (`yarn_softmax_mscale`).
For the published DeepSeek configs mscale == mscale_all_dim, so the cos/sin factor is 1 and only
the softmax scale changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.config import RopeScaling


def inv_frequencies(dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
  """Inverse frequencies [dim/2] with optional linear or YaRN scaling."""
  inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if scaling.type == "linear":
    inv = inv / scaling.factor
  elif scaling.type == "yarn":
    inv = _yarn_inv_frequencies(inv, dim, theta, scaling)
  return inv.astype(np.float32)


def _yarn_find_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """The (fractional) dimension whose wavelength fits `num_rotations` times into `max_pos`."""
  return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_ramp(dim: int, theta: float, s: RopeScaling) -> np.ndarray:
  """[dim/2] interpolation weight per frequency: 0 keeps the original, 1 divides by factor."""
  orig = s.original_max_position_embeddings
  low = max(math.floor(_yarn_find_dim(s.beta_fast, dim, theta, orig)), 0)
  high = min(math.ceil(_yarn_find_dim(s.beta_slow, dim, theta, orig)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  return np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def _yarn_inv_frequencies(inv: np.ndarray, dim: int, theta: float, s: RopeScaling) -> np.ndarray:
  """Interpolate the low-frequency dimensions by `factor`, keep the high-frequency ones."""
  ramp = yarn_ramp(dim, theta, s)
  return (inv / s.factor) * ramp + inv * (1.0 - ramp)


def yarn_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extrapolating)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
  """Multiplier of cos and sin under YaRN (1 otherwise), as transformers' yarn rope init:
  mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else
  mscale(factor). (DeepSeek's remote code uses the ratio always; the two differ only when
  mscale_all_dim == 0 and mscale != 1, which no published config does.)"""
  if s.type != "yarn":
    return 1.0
  if s.mscale and s.mscale_all_dim:
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
  return yarn_mscale(s.factor)


def yarn_softmax_mscale(s: RopeScaling) -> float:
  """Factor on MLA's softmax scale: mscale(factor, mscale_all_dim)^2 when rope is scaled and
  mscale_all_dim is set (HF DeepseekV2/V3 `yarn_apply_mscale`), else 1."""
  if s.type == "none" or not s.mscale_all_dim:
    return 1.0
  m = yarn_mscale(s.factor, s.mscale_all_dim)
  return m * m


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, inv_freq: np.ndarray,
               cos_sin_scale: float = 1.0) -> jax.Array:
  """Rotate the last axis of x (size K, even) by position * inv_freq, half-split convention:
  dimension j pairs with j + K/2 (HF `rotate_half`), both rotated by angle inv_freq[j]."""
  freqs_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  cos = (jnp.cos(freqs_BxLxK2) * cos_sin_scale)[:, :, None, :]
  sin = (jnp.sin(freqs_BxLxK2) * cos_sin_scale)[:, :, None, :]
  x32 = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)
