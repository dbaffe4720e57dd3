"""Integer grids, grouping and scale calibration (absmax, MSE clipping search).

Layout used throughout `ds_jax.quant`: a kernel `[*stacked, K, *out]` is viewed as
`w_SxGxgxN` = `[*stacked, G, g, N]`: G groups of g along the contraction axis K, N = prod(out).
Scales and zero points are `[*stacked, G, 1, N]` (stored without the 1).

Both symmetric and asymmetric grids are signed, [-2^(b-1), 2^(b-1) - 1]:
  symmetric:  q = clip(round(w / s)),      w ≈ q s,        s = absmax / (2^(b-1) - 1)
  asymmetric: q = clip(round(w / s) + z),  w ≈ (q - z) s,  s = (max - min) / (2^b - 1)
so an asymmetric int4 value packs exactly like a symmetric one.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

MSE_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # clipping ratios 1.0 ... 0.5


def qrange(bits: int) -> tuple[int, int]:
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def effective_group(k: int, group_size: int) -> int:
  """Group length along an axis of length k: 0 or >= k means one group (per channel)."""
  if group_size == 0 or group_size >= k:
    return k
  if k % group_size:
    raise ValueError(f"contraction axis of length {k} is not divisible by group_size "
                     f"{group_size}")
  return group_size


def grouped(w: Array, n_stack: int, group_size: int) -> Array:
  """[*stacked, K, *out] -> [*stacked, G, g, N]."""
  if w.ndim < n_stack + 2:
    raise ValueError(f"a kernel with {n_stack} stacked axes needs >= {n_stack + 2} dims; "
                     f"got shape {w.shape}")
  stack, k = w.shape[:n_stack], w.shape[n_stack]
  g = effective_group(k, group_size)
  n = math.prod(w.shape[n_stack + 1:])
  return w.reshape(*stack, k // g, g, n)


def ungrouped(w_SxGxgxN: Array, shape: tuple[int, ...]) -> Array:
  return w_SxGxgxN.reshape(shape)


def round_scale(s: Array, scale_dtype: str) -> Array:
  """Round to the storage dtype (same value the packed export holds); guards all-zero groups."""
  s = jnp.where(s > 0, s, 1.0)
  return s.astype(scale_dtype).astype(jnp.float32)


def minmax_scale(w_SxGxgxN: Array, bits: int, symmetric: bool, scale_dtype: str,
                 ratio: float | Array = 1.0) -> tuple[Array, Optional[Array]]:
  """Scale (and zero point) covering `ratio` times the group's range."""
  w = w_SxGxgxN.astype(jnp.float32)
  qmin, qmax = qrange(bits)
  if symmetric:
    s = jnp.max(jnp.abs(w), axis=-2, keepdims=True) * ratio / qmax
    return round_scale(s, scale_dtype), None
  lo = jnp.minimum(jnp.min(w, axis=-2, keepdims=True), 0.0) * ratio
  hi = jnp.maximum(jnp.max(w, axis=-2, keepdims=True), 0.0) * ratio
  s = round_scale((hi - lo) / (qmax - qmin), scale_dtype)
  z = jnp.clip(qmin - jnp.round(lo / s), qmin, qmax)
  return s, z


def quantize(w: Array, s: Array, z: Optional[Array], bits: int) -> Array:
  """Integer values (as float) on the signed grid."""
  qmin, qmax = qrange(bits)
  q = jnp.round(w / s)
  if z is not None:
    q = q + z
  return jnp.clip(q, qmin, qmax)


def dequantize(q: Array, s: Array, z: Optional[Array]) -> Array:
  return (q - z) * s if z is not None else q * s


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def mse_scale(w_SxGxgxN: Array, bits: int, symmetric: bool,
              scale_dtype: str) -> tuple[Array, Optional[Array]]:
  """Per group, the clipping ratio in MSE_RATIOS with the least squared quantization error."""
  w = w_SxGxgxN.astype(jnp.float32)
  best_s, best_z = minmax_scale(w, bits, symmetric, scale_dtype)
  best_err = jnp.sum((dequantize(quantize(w, best_s, best_z, bits), best_s, best_z) - w) ** 2,
                     axis=-2, keepdims=True)
  for r in MSE_RATIOS[1:]:
    s, z = minmax_scale(w, bits, symmetric, scale_dtype, r)
    err = jnp.sum((dequantize(quantize(w, s, z, bits), s, z) - w) ** 2, axis=-2, keepdims=True)
    better = err < best_err
    best_s = jnp.where(better, s, best_s)
    best_z = None if z is None else jnp.where(better, z, best_z)
    best_err = jnp.minimum(err, best_err)
  return best_s, best_z


def calibrate(w_SxGxgxN: Array, bits: int, symmetric: bool, calibration: str,
              scale_dtype: str) -> tuple[Array, Optional[Array]]:
  """Scale and zero point of each group ("lsq" starts from the MSE scale)."""
  if calibration == "absmax":
    return minmax_scale(w_SxGxgxN, bits, symmetric, scale_dtype)
  if calibration in ("mse", "lsq"):
    return mse_scale(w_SxGxgxN, bits, symmetric, scale_dtype)
  raise ValueError(f"unknown calibration {calibration!r}")
