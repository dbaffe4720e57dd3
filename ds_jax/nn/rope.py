"""Rotary position embeddings (half-split "rotate_half" convention of the HF Llama reference)."""

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
  return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_frequencies(inv: np.ndarray, dim: int, theta: float, s: RopeScaling) -> np.ndarray:
  """YaRN (Peng et al. 2023) as the DeepSeek-V2/V3 references compute it: interpolate the
  low-frequency dimensions by `factor`, keep the high-frequency ones, ramp in between."""
  orig = s.original_max_position_embeddings
  low = max(math.floor(_yarn_find_dim(s.beta_fast, dim, theta, orig)), 0)
  high = min(math.ceil(_yarn_find_dim(s.beta_slow, dim, theta, orig)), dim - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  extrapolation_mask = 1.0 - ramp
  inv_interp = inv / s.factor
  return inv_interp * (1 - extrapolation_mask) + inv * extrapolation_mask


def yarn_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, inv_freq: np.ndarray,
               cos_sin_scale: float = 1.0) -> jax.Array:
  """Rotate the last axis of x (size K, even) by position * inv_freq, half-split convention."""
  freqs_BxLxK2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  cos = (jnp.cos(freqs_BxLxK2) * cos_sin_scale)[:, :, None, :]
  sin = (jnp.sin(freqs_BxLxK2) * cos_sin_scale)[:, :, None, :]
  x32 = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)
