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
  x, kernel = x.astype(dtype), jnp.asarray(kernel).astype(dtype)
  if (equation == _PROJ.get(kernel.ndim) and jax.default_backend() == "cpu"
      and not _in_manual(x) and _mesh_size() == 1):
    return _proj(x, kernel)
  return jnp.einsum(equation, x, kernel)


# `...z,za->...a` (the projections of `Linear`) with a hand-written backward pass for XLA:CPU.
# Autodiff's weight gradient there is a dot contracting the *leading* axis of both operands
# (x^T g), which XLA:CPU does not hand to its fast matmul library (YNNPACK): it ran ~2.5x slower
# than the forward matmul of the same FLOPs in the bench_dsv2_tiny step profile. Transposing x
# explicitly first (behind an optimization barrier, so XLA cannot fold the transpose back into
# the dot) makes it an ordinary row-major matmul. The transpose is a copy of the activations,
# which is small next to the matmul. Only on one device: under a multi-device mesh the barrier
# stops sharding propagation (GSPMD then all-gathers tensor-parallel activations), so sharded
# steps and other backends keep autodiff's dot.
_PROJ = {n: "...z,z{0}->...{0}".format("abcdefgh"[:n - 1]) for n in range(2, 6)}


def _mesh_size() -> int:
  """Devices of the mesh being traced under (`jax.set_mesh`); 1 outside any mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh is None or mesh.empty else mesh.size


def _in_manual(x: Array) -> bool:
  """True inside shard_map (manual axes): keep plain autodiff there."""
  mt = getattr(jax.typeof(x), "manual_axis_type", None)
  return bool(mt is not None and mt.varying)


@jax.custom_vjp
def _proj(x: Array, w: Array) -> Array:
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _proj_fwd(x, w):
  return _proj(x, w), (x, w)


def _proj_bwd(res, g):
  x, w = res
  nout = w.ndim - 1
  g2 = g.reshape(-1, *w.shape[1:])
  dx = jax.lax.dot_general(g, w, ((tuple(range(g.ndim - nout, g.ndim)),
                                   tuple(range(1, w.ndim))), ((), ())))
  xt = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [z, tokens]
  dw = jax.lax.dot_general(xt, g2, (((1,), (0,)), ((), ())))
  return dx, dw


_proj.defvjp(_proj_fwd, _proj_bwd)


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
