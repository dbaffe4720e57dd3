"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)), HF names gate_proj / up_proj / down_proj."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.nn.linear import Linear


class MLP(nn.Module):
  intermediate_size: int
  dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, deterministic: bool = True) -> jax.Array:
    d = x_BxLxD.shape[-1]
    kw = dict(dtype=self.dtype, init_std=self.init_std)
    gate = Linear(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(
        x_BxLxD, deterministic)
    up = Linear(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(
        x_BxLxD, deterministic)
    h_BxLxF = nn.silu(gate) * up
    return Linear(d, ("mlp", "embed"), name="down_proj", **kw)(h_BxLxF, deterministic)
