"""The one place where activations meet parameter matrices.

Every matmul against a parameter in ds_jax (dense projections, the stacked expert weights of MoE
layers) goes through `einsum` below. A kernel is either a plain array or any pytree object that
implements

    kernel.einsum(equation, x, *, dtype, rng, deterministic) -> array

so quantized weights (`ds_jax.quant`) and LoRA adapters (`ds_jax.lora`) are *values in the
parameter pytree*, swapped in by pure transforms, never edits of model classes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def einsum(equation: str, x: Array, kernel: Any, *, dtype: Any,
           rng: Optional[Array] = None, deterministic: bool = True) -> Array:
  """`jnp.einsum(equation, x, kernel)` in `dtype`, or the kernel's own einsum if it has one."""
  if hasattr(kernel, "einsum"):
    return kernel.einsum(equation, x, dtype=dtype, rng=rng, deterministic=deterministic)
  return jnp.einsum(equation, x.astype(dtype), jnp.asarray(kernel).astype(dtype))


def normal_init(stddev: float) -> Callable:
  return nn.initializers.normal(stddev)


class Linear(nn.Module):
  """y = x @ kernel (+ bias) over the last axis of x.

  `features` may be a tuple (e.g. (heads, head_dim)); `axes` names the kernel's logical axes,
  input axis first, for the sharding rule table in `ds_jax.sharding`.
  """
  features: int | Sequence[int]
  axes: Sequence[str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    shape = (x.shape[-1],) + feats
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(normal_init(self.init_std), tuple(self.axes)),
        shape, jnp.float32)
    letters = "abcdefgh"[:len(feats)]
    rng = None
    if not deterministic and self.has_rng("dropout"):
      rng = self.make_rng("dropout")
    y = einsum(f"...z,z{letters}->...{letters}", x, kernel, dtype=self.dtype, rng=rng,
               deterministic=deterministic)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             tuple(self.axes[1:])),
                        feats, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
