"""Token embedding with an optional tied output projection."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Embed(nn.Module):
  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                  ("vocab", "embed")),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Tied output logits x @ E^T."""
    return jnp.einsum("bld,vd->blv", x_BxLxD, self.embedding.astype(self.dtype))
