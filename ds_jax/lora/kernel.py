"""`LoraKernel`: a parameter-pytree value that wraps a base kernel with named low-rank adapters.

A kernel W has axes [*S, *E, D, *O]: stacked layer axes S (from nn.scan; sliced away before the
einsum), batch axes E (one adapter per expert), one input axis D and output axes O (e.g. heads,
head_dim). Each adapter holds

  lora_a    [*S, *E, D, r]
  lora_b    [*S, *E, r, *O]
  magnitude [*S, *E, *O]      (DoRA only)
  expert_scale [*S, *E, k]    (expert_mode="shared" with expert_scale "expert" (k = 1) or
                              "rank" (k = r): A's columns are scaled per expert)

so every leaf shares the leading axes and `nn.scan` slices the wrapper like a plain array.
The base is a plain array or any kernel object with `.einsum` (e.g. packed int4, for QLoRA).

With expert_mode="shared" the kernel still stores A and B with the expert axes (every expert's
copy equal, `broadcast_experts`), so the MoE dispatch can gather them like any expert weight;
the trainable tree holds one copy (`shared_slice`) and `combine` broadcasts it back, so the
gradient of the shared A, B is the sum over experts.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ds_jax.lora.config import LoraConfig
from ds_jax.nn import linear

Array = jax.Array
# A shared expert adapter's extra per-expert A_e, B_e for the experts of its expert_subset.
SUBSET_KEYS = ("subset_a", "subset_b")


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


def shared_slice(a: Array, n_batch: int) -> Array:
  """The single shared copy of an adapter array [*S, *E, x, y]: expert axes E dropped."""
  lead = a.ndim - 2 - n_batch
  return a[(slice(None),) * lead + (0,) * n_batch]


def broadcast_experts(a: Array, experts: tuple[int, ...]) -> Array:
  """[*S, x, y] -> [*S, *experts, x, y], every expert the same copy."""
  lead = a.shape[:-2]
  a = a.reshape(*lead, *(1,) * len(experts), *a.shape[-2:])
  return jnp.broadcast_to(a, (*lead, *experts, *a.shape[-2:]))


def subset_index(subset: tuple, stack: tuple[int, ...], experts: tuple[int, ...]) -> np.ndarray:
  """Flat indices (layer-major) of `subset`'s experts in a kernel's [*stack, *experts] axes;
  raises naming LoraConfig.expert_subset if it does not fit the kernel."""
  n_layers, (n_exp,) = math.prod(stack), experts
  if len(subset) != n_layers:
    raise ValueError(f"LoraConfig.expert_subset has {len(subset)} rows; the expert weight has "
                     f"{n_layers} stacked layer(s) (stack axes {stack}): give one tuple of "
                     "expert indices per layer")
  bad = [e for row in subset for e in row if e >= n_exp]
  if bad:
    raise ValueError(f"LoraConfig.expert_subset: expert indices {bad} out of range for "
                     f"{n_exp} experts")
  return np.asarray([s * n_exp + e for s, row in enumerate(subset) for e in sorted(row)],
                    np.int32)


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
    d = lora_delta(self.lora_a(ad), ad["lora_b"], self.n_out)
    if "subset_a" in ad:  # a shared adapter's per-expert term for the chosen experts
      d = d + lora_delta(ad["subset_a"], ad["subset_b"], self.n_out)
    return self.config(name).scale * d

  @staticmethod
  def lora_a(ad: dict) -> Array:
    """A, with a shared expert adapter's per-expert gains folded in: A_e · diag(g_e)."""
    if "expert_scale" not in ad:
      return ad["lora_a"]
    g = ad["expert_scale"]  # [*S, *E, 1 or r]
    return ad["lora_a"] * jnp.expand_dims(g, -2).astype(ad["lora_a"].dtype)

  def merged_weight(self, name: str) -> tuple[Array, Optional[Array]]:
    """W + sBA (LoRA) or m·(W + sBA)/||W + sBA|| (DoRA); also the DoRA norm (else None)."""
    w = dense(self.base).astype(jnp.float32)
    wc = w + self.delta(name).astype(jnp.float32)
    if not self.config(name).use_dora:
      return wc, None
    norm = column_norm(wc, self.n_out)
    scale = self.adapters[name]["magnitude"] / norm
    return wc * jnp.expand_dims(scale, wc.ndim - self.n_out - 1), norm

  def is_shared(self, name: str) -> bool:
    """Whether adapter `name` is one A, B shared by all experts (expert_mode="shared")."""
    return self.n_batch > 0 and self.config(name).expert_mode == "shared"

  def is_subset(self, name: str) -> bool:
    """Whether adapter `name` exists only for chosen experts (expert_mode="subset")."""
    return self.n_batch > 0 and self.config(name).expert_mode == "subset"

  def is_packed(self, name: str) -> bool:
    """Whether the trainable copy of adapter `name` differs in shape from the stored arrays
    (shared or subset expert adapters): such adapters train only via split_trainable."""
    return self.is_shared(name) or self.is_subset(name)

  def subset_index(self, name: str) -> np.ndarray:
    """Flat indices into the (stacked layer, expert) axes of the chosen experts (subset mode)."""
    return subset_index(self.config(name).expert_subset, self.stack_shape(), self.expert_axes())

  def _gather_subset(self, a: Array) -> Array:
    """[*S, E, x, y] -> [N, x, y]: the chosen experts' rows (layer-major)."""
    lead = len(self.stack_shape()) + self.n_batch
    return a.reshape(-1, *a.shape[lead:])[self.subset_index(self.active)]

  def _scatter_subset(self, a: Array) -> Array:
    """Inverse of `_gather_subset`: the rows into zeros [*S, E, x, y]."""
    lead = self.stack_shape() + self.expert_axes()
    full = jnp.zeros((math.prod(lead), *a.shape[1:]), a.dtype)
    return full.at[self.subset_index(self.active)].set(a).reshape(*lead, *a.shape[1:])

  def stack_shape(self) -> tuple[int, ...]:
    shape = self.shape
    return tuple(shape[:len(shape) - self.n_out - 1 - self.n_batch])

  def expert_axes(self) -> tuple[int, ...]:
    shape = self.shape
    lead = len(shape) - self.n_out - 1 - self.n_batch
    return tuple(shape[lead:lead + self.n_batch])

  def share(self, key: str, a: Any) -> Any:
    """Trainable copy of adapter array `key`: the shared slice for lora_a / lora_b of a shared
    adapter, the chosen experts' rows [N, x, y] of a subset adapter, else `a` itself."""
    if key in SUBSET_KEYS and a is not None:
      return self._gather_subset(a)
    if key not in ("lora_a", "lora_b") or not self.is_packed(self.active) or a is None:
      return a
    if self.is_subset(self.active):
      return self._gather_subset(a)
    return shared_slice(a, self.n_batch) if key == "lora_a" else shared_slice(
        a.reshape(*a.shape[:a.ndim - self.n_out], -1), self.n_batch).reshape(
            *a.shape[:a.ndim - self.n_out - 1 - self.n_batch], -1, *a.shape[a.ndim - self.n_out:])

  def unshare(self, key: str, a: Any) -> Any:
    """Inverse of `share`: broadcast a shared lora_a / lora_b over the expert axes; scatter a
    subset adapter's rows into zeros (the other experts' A, B stay exactly 0)."""
    if key in SUBSET_KEYS and hasattr(a, "ndim"):
      return self._scatter_subset(a)
    if key not in ("lora_a", "lora_b") or not self.is_packed(self.active) or not hasattr(
        a, "ndim"):
      return a
    experts = self.expert_axes()
    if self.is_subset(self.active):
      return self._scatter_subset(a)
    if key == "lora_a":
      return broadcast_experts(a, experts)
    outs = a.shape[a.ndim - self.n_out:]
    b = broadcast_experts(a.reshape(*a.shape[:a.ndim - self.n_out], -1), experts)
    return b.reshape(*b.shape[:-1], *outs)

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
                     self.lora_a(ad).astype(dtype), ad["lora_b"].astype(dtype))
    if "subset_a" in ad:  # tied + the chosen experts' own A_e, B_e (rank subset_r)
      low = low + jnp.einsum(f"{x_spec},{batch}{d}{r},{batch}{r}{outs}->{out_spec}", xd,
                             ad["subset_a"].astype(dtype), ad["subset_b"].astype(dtype))
    y = y + (cfg.scale * low).astype(y.dtype)
    if cfg.use_dora:
      wc = dense(self.base).astype(jnp.float32) + self.delta(name).astype(jnp.float32)
      # PEFT treats the norm as a constant in the backward pass (DoRA paper, section 4.3).
      norm = jax.lax.stop_gradient(column_norm(wc, self.n_out))
      mns = (ad["magnitude"] / norm).astype(y.dtype)
      y = jnp.einsum(f"{out_spec},{batch}{outs}->{out_spec}", y, mns)
    return y
