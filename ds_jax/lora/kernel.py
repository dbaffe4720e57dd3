"""`LoraKernel`: a parameter-pytree value that wraps a base kernel with named low-rank adapters.

A kernel W has axes [*S, *E, D, *O]: stacked layer axes S (from nn.scan; sliced away before the
einsum), batch axes E (one adapter per expert), one input axis D and output axes O (e.g. heads,
head_dim). Each adapter holds

  lora_a    [*S, *E, D, r]
  lora_b    [*S, *E, r, *O]
  magnitude [*S, *E, *O]      (DoRA only)

so every leaf shares the leading axes and `nn.scan` slices the wrapper like a plain array.
The base is a plain array or any kernel object with `.einsum` (e.g. packed int4, for QLoRA).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from ds_jax.lora.config import LoraConfig
from ds_jax.nn import linear

Array = jax.Array


def dense(base: Any) -> Array:
  """The base kernel as a float array (dequantized when the base is a packed kernel)."""
  if hasattr(base, "dequantize"):
    return base.dequantize()
  return jnp.asarray(base)


def kernel_shape(base: Any) -> tuple[int, ...]:
  if hasattr(base, "einsum"):
    return tuple(jax.eval_shape(dense, base).shape)
  return tuple(base.shape)


def lora_delta(a: Array, b: Array, n_out: int) -> Array:
  """B·A in kernel layout: a [..., D, r], b [..., r, *O] -> [..., D, *O]."""
  out = b.shape[b.ndim - n_out:]
  b2 = b.reshape(*b.shape[:b.ndim - n_out], math.prod(out))
  return jnp.matmul(a, b2).reshape(*a.shape[:-1], *out)


def column_norm(w: Array, n_out: int) -> Array:
  """DoRA's per-output-feature norm: ||W[..., :, o]||_2 over the input axis D."""
  return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=w.ndim - n_out - 1))


def dropout(x: Array, rate: float, rng: Optional[Array], deterministic: bool) -> Array:
  if deterministic or rate == 0.0 or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _fresh_letter(equation: str) -> str:
  for c in "rstuvwxyzabcdefghijklmnopq":
    if c not in equation:
      return c
  raise ValueError(f"no free einsum letter in {equation!r}")


@struct.dataclass
class LoraKernel:
  """Base kernel + named adapters; `active` (static) picks the adapter the forward adds.

  `configs` maps adapter names to their LoraConfig (static, hashable); `merged` names the
  adapter folded into `base` (then the forward adds nothing); `merged_norm` keeps DoRA's column
  norm at merge time so `unmerge` can invert it exactly.
  """
  base: Any  # first field: flax compares the first leaf's shape with the declared kernel
  adapters: dict
  merged_norm: Optional[Array] = None
  configs: tuple = struct.field(pytree_node=False, default=())
  active: Optional[str] = struct.field(pytree_node=False, default=None)
  merged: Optional[str] = struct.field(pytree_node=False, default=None)
  n_batch: int = struct.field(pytree_node=False, default=0)
  n_out: int = struct.field(pytree_node=False, default=1)

  def config(self, name: str) -> LoraConfig:
    return dict(self.configs)[name]

  @property
  def shape(self) -> tuple[int, ...]:
    return kernel_shape(self.base)

  def delta(self, name: str) -> Array:
    """scale · B·A of adapter `name`, in the base kernel's layout (leading axes included)."""
    ad = self.adapters[name]
    return self.config(name).scale * lora_delta(ad["lora_a"], ad["lora_b"], self.n_out)

  def merged_weight(self, name: str) -> tuple[Array, Optional[Array]]:
    """W + sBA (LoRA) or m·(W + sBA)/||W + sBA|| (DoRA); also the DoRA norm (else None)."""
    w = dense(self.base).astype(jnp.float32)
    wc = w + self.delta(name).astype(jnp.float32)
    if not self.config(name).use_dora:
      return wc, None
    norm = column_norm(wc, self.n_out)
    scale = self.adapters[name]["magnitude"] / norm
    return wc * jnp.expand_dims(scale, wc.ndim - self.n_out - 1), norm

  def einsum(self, equation: str, x: Array, *, dtype: Any, rng: Optional[Array] = None,
             deterministic: bool = True) -> Array:
    """base einsum + scale · ((dropout(x) @ A) @ B), with DoRA's column rescaling if enabled."""
    y = linear.einsum(equation, x, self.base, dtype=dtype, rng=rng,
                      deterministic=deterministic)
    name = self.active
    if name is None or name == self.merged:
      return y
    cfg, ad = self.config(name), self.adapters[name]
    lhs, out_spec = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    nb = self.n_batch
    if len(k_spec) != nb + 1 + self.n_out:
      raise ValueError(f"LoraKernel(n_batch={nb}, n_out={self.n_out}) cannot serve kernel "
                       f"spec {k_spec!r} of {equation!r}")
    batch, d, outs = k_spec[:nb], k_spec[nb], k_spec[nb + 1:]
    if cfg.use_dora and (d in out_spec or any(c not in out_spec for c in batch + outs)):
      # The kernel is used transposed (e.g. MLA's absorbed kv_b_proj): use the dense W'.
      w, _ = self.merged_weight(name)
      return jnp.einsum(equation, x.astype(dtype), w.astype(dtype))
    r = _fresh_letter(equation)
    if rng is not None:
      rng = jax.random.fold_in(rng, 0x10A)
    xd = dropout(x.astype(dtype), cfg.lora_dropout, rng, deterministic)
    # One three-operand einsum: correct for any use of the kernel (x@A@B for the usual
    # projections, transposed uses too); the contraction order is left to opt_einsum.
    low = jnp.einsum(f"{x_spec},{batch}{d}{r},{batch}{r}{outs}->{out_spec}", xd,
                     ad["lora_a"].astype(dtype), ad["lora_b"].astype(dtype))
    y = y + (cfg.scale * low).astype(y.dtype)
    if cfg.use_dora:
      wc = dense(self.base).astype(jnp.float32) + self.delta(name).astype(jnp.float32)
      # PEFT treats the norm as a constant in the backward pass (DoRA paper, section 4.3).
      norm = jax.lax.stop_gradient(column_norm(wc, self.n_out))
      mns = (ad["magnitude"] / norm).astype(y.dtype)
      y = jnp.einsum(f"{out_spec},{batch}{outs}->{out_spec}", y, mns)
    return y
