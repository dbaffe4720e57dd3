"""Quantized matmuls: dynamic per-token activation quantization and kernels with `.einsum`.

Kernels here are flax.struct dataclasses placed in the parameter pytree in place of a float
array; `ds_jax.nn.linear.einsum` calls their `.einsum(equation, x, ...)`. Every array field keeps
the kernel's leading axes, so nn.scan slices them per layer like a plain kernel.

- `ActQuantKernel(w, on, bits)`: fake-quantizes x per token (STE) then multiplies by float w (QAT).
- `PackedKernel`: int4 or int8 weights with scales; backend "int8" runs
  int8 x int8 -> int32 dots on per-token int8 activations (W4A8; int4 dots fail on XLA:CPU),
  backend "dequant" dequantizes to float and multiplies.
"""

from __future__ import annotations

import math
import string
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from ds_jax.quant.calibrate import qrange

Array = jax.Array


def _terms(part: str, equation: str) -> list[str]:
  if "..." in part[1:] or part.count("...") > 1:
    raise ValueError(f"unsupported einsum equation {equation!r}: '...' only at the front")
  return (["..."] if part.startswith("...") else []) + list(part.replace("...", ""))


def parse_equation(equation: str) -> tuple[list[str], list[str], list[str]]:
  """'...z,zab->...ab' -> (['...', 'z'], ['z', 'a', 'b'], ['...', 'a', 'b'])."""
  lhs, _, out = equation.replace(" ", "").partition("->")
  x, _, k = lhs.partition(",")
  return _terms(x, equation), _terms(k, equation), _terms(out, equation)


def contracted_axes(x_terms: list[str], k_terms: list[str], out_terms: list[str]) -> list[int]:
  """Negative axes of x summed with the kernel (the per-token reduction axes)."""
  n = len(x_terms)
  return [i - n for i, t in enumerate(x_terms) if t in k_terms and t not in out_terms]


def quantize_tokens(x: Array, bits: int, axes: list[int]) -> tuple[Array, Array]:
  """Symmetric per-token quantization over `axes`: (integer values as float, scale keepdims)."""
  qmax = qrange(bits)[1]
  x = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x), axis=tuple(axes), keepdims=True) / qmax
  s = jnp.where(s > 0, s, 1.0)
  return jnp.clip(jnp.round(x / s), -qmax, qmax), s


def fake_quant_tokens(x: Array, bits: int, axes: list[int]) -> Array:
  """Quantize-dequantize x per token; straight-through gradient."""
  q, s = quantize_tokens(x, bits, axes)
  xf = x.astype(jnp.float32)
  return (xf - jax.lax.stop_gradient(xf) + jax.lax.stop_gradient(q * s)).astype(x.dtype)


@flax.struct.dataclass
class ActQuantKernel:
  """A float kernel whose input activations are fake-quantized per token (QAT).

  on: optional bool gate (QAT switched on at a traced step) shaped like the kernel's stacked
  axes, so nn.scan and expert gathers slice it like `w`; its entries are all equal."""
  w: Array
  on: Optional[Array] = None
  bits: int = flax.struct.field(pytree_node=False, default=8)

  @property
  def shape(self):
    return self.w.shape

  def einsum(self, equation: str, x: Array, *, dtype: Any, rng: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    axes = contracted_axes(*parse_equation(equation))
    xq = fake_quant_tokens(x, self.bits, axes)
    if self.on is not None:
      xq = jnp.where(self.on.reshape(-1)[0], xq, x)
    return jnp.einsum(equation, xq.astype(dtype), self.w.astype(dtype))


def unpack_int4(packed: Array, n: int) -> Array:
  """uint8 [..., m] -> int4 [..., n] (low nibble first, sign-extended); n in {2m - 1, 2m}."""
  m = packed.shape[-1]
  if n not in (2 * m - 1, 2 * m):
    raise ValueError(f"{m} bytes hold 2*{m} int4 values; cannot unpack {n}")
  q = jax.lax.bitcast_convert_type(jnp.asarray(packed, jnp.uint8), jnp.int4)  # [..., m, 2]
  return q.reshape(*packed.shape[:-1], 2 * m)[..., :n]


@flax.struct.dataclass
class PackedKernel:
  """Integer weights `qweight` (int4 or int8, the kernel's shape `[*stacked, K, *out]`; on disk
  int4 is two per byte, see `ds_jax.quant.pack`) with scale / zero `[*stacked, G, N]` (bf16 or
  f32, N = prod(out)): w ≈ (q - zero) * scale, G groups along K.

  qweight comes first: Flax checks the first leaf of a parameter against the kernel's shape."""
  qweight: Array
  scale: Array
  zero: Optional[Array]
  out_dims: tuple[int, ...] = flax.struct.field(pytree_node=False)
  backend: str = flax.struct.field(pytree_node=False, default="int8")
  act_bits: int = flax.struct.field(pytree_node=False, default=8)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qweight.shape)

  @property
  def bits(self) -> int:
    return 4 if self.qweight.dtype == jnp.int4 else 8

  def int_values(self) -> Array:
    """int8 [*stacked, G, g, N]."""
    n = math.prod(self.out_dims)
    k = self.qweight.shape[-len(self.out_dims) - 1]
    groups = self.scale.shape[-2]
    stack = self.qweight.shape[:-len(self.out_dims) - 1]
    return self.qweight.astype(jnp.int8).reshape(*stack, groups, k // groups, n)

  def dequantize(self, dtype: Any = jnp.float32) -> Array:
    q = self.int_values().astype(jnp.float32)
    s = self.scale.astype(jnp.float32)[..., None, :]
    w = (q - self.zero.astype(jnp.float32)[..., None, :]) * s if self.zero is not None else q * s
    return w.reshape(self.shape).astype(dtype)

  def einsum(self, equation: str, x: Array, *, dtype: Any, rng: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    xt, kt, ot = parse_equation(equation)
    axes = contracted_axes(xt, kt, ot)
    if self.backend == "dequant":
      if self.act_bits:
        x = fake_quant_tokens(x, self.act_bits, axes)
      return jnp.einsum(equation, x.astype(dtype), self.dequantize(dtype))
    if not self._int_dot_fits(xt, kt, ot, axes):
      # e.g. MLA's absorbed decode contracts kv_b_proj over its *output* axes: no single-K int8
      # dot exists, so dequantize for this use (same numbers as the dequant backend).
      if self.act_bits:
        x = fake_quant_tokens(x, self.act_bits, axes)
      return jnp.einsum(equation, x.astype(dtype), self.dequantize(dtype))
    return self._int_einsum(xt, kt, ot, axes, x).astype(dtype)

  def _int_dot_fits(self, xt, kt, ot, axes) -> bool:
    kk = kt[-len(self.out_dims) - 1]
    return (kk in xt and axes == [xt.index(kk) - len(xt)]
            and all(t in ot for t in kt if t != kk))

  def _int_einsum(self, xt, kt, ot, axes, x):
    n_out = len(self.out_dims)
    kk = kt[-n_out - 1]  # the contraction letter of the kernel
    if axes != [xt.index(kk) - len(xt)] or any(t not in ot for t in kt if t != kk):
      raise ValueError(f"int8 backend needs one contraction axis (the kernel's K) and every "
                       f"other kernel axis in the output; got {''.join(xt)},{''.join(kt)}")
    used = set(xt + kt + ot)
    gl = next(c for c in string.ascii_letters if c not in used)  # the group letter
    xq, xs = quantize_tokens(x, self.act_bits or 8, axes)
    ax = axes[0] % x.ndim
    groups = self.scale.shape[-2]
    xq = xq.astype(jnp.int8).reshape(*x.shape[:ax], groups, x.shape[ax] // groups,
                                     *x.shape[ax + 1:])
    xs = jnp.squeeze(xs, ax)
    xgt = xt[:xt.index(kk)] + [gl] + xt[xt.index(kk):]
    wq = self.int_values()
    wq = wq.reshape(*wq.shape[:-1], *self.out_dims)
    wgt = kt[:-n_out - 1] + [gl, kk] + kt[-n_out:]
    j = "".join
    acc = jnp.einsum(f"{j(xgt)},{j(wgt)}->{j(ot)}{gl}", xq, wq,
                     preferred_element_type=jnp.int32)
    st = kt[:-n_out - 1] + [gl] + kt[-n_out:]
    xnt = [t for t in xt if t != kk]
    s = self.scale.astype(jnp.float32).reshape(*self.scale.shape[:-1], *self.out_dims)
    y = jnp.einsum(f"{j(ot)}{gl},{j(st)},{j(xnt)}->{j(ot)}", acc.astype(jnp.float32), s, xs)
    if self.zero is not None:
      zs = s * self.zero.astype(jnp.float32).reshape(s.shape)
      xsum = jnp.sum(xq.astype(jnp.int32), axis=ax + 1).astype(jnp.float32)  # [.., G, ..]
      xst = [gl if t == kk else t for t in xt]
      y = y - jnp.einsum(f"{j(xst)},{j(st)},{j(xnt)}->{j(ot)}", xsum, zs, xs)
    return y
