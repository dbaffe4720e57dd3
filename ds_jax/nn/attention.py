"""Grouped-query attention with RoPE (Llama / Mixtral), and the shared softmax-attention core."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.nn.linear import Linear
from ds_jax.nn.rope import apply_rope, inv_frequencies, yarn_attention_factor

NEG_INF = -1e30


def causal_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array,
                k_valid_BxS: Optional[jax.Array] = None) -> jax.Array:
  """[B, 1, T, S] boolean mask: key position <= query position (and key valid)."""
  m = k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
  if k_valid_BxS is not None:
    m = m & k_valid_BxS[:, None, :]
  return m[:, None]


def attend(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxV: jax.Array,
           mask_Bx1xTxS: jax.Array, scale: float) -> jax.Array:
  """Softmax attention, H query heads sharing G key/value heads (H % G == 0); f32 softmax."""
  b, t, h, _ = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, -1)
  logits_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK).astype(jnp.float32) * scale
  logits_BxGxRxTxS = jnp.where(mask_Bx1xTxS[:, :, None], logits_BxGxRxTxS, NEG_INF)
  probs = jax.nn.softmax(logits_BxGxRxTxS, axis=-1).astype(v_BxSxGxV.dtype)
  out = jnp.einsum("bgrts,bsgv->btgrv", probs, v_BxSxGxV)
  return out.reshape(b, t, h, -1)


class GQAttention(nn.Module):
  """Llama-style attention: q/k/v/o projections, RoPE on q and k, H/G query heads per KV head."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               deterministic: bool = True) -> jax.Array:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    h, g, k = c.num_attention_heads, c.num_key_value_heads, c.head_size
    kw = dict(dtype=dtype, init_std=c.initializer_range, use_bias=c.attention_bias)
    q = Linear((h, k), ("embed", "heads", "kv"), name="q_proj", **kw)(x_BxLxD, deterministic)
    kk = Linear((g, k), ("embed", "kv_heads", "kv"), name="k_proj", **kw)(x_BxLxD, deterministic)
    v = Linear((g, k), ("embed", "kv_heads", "kv"), name="v_proj", **kw)(x_BxLxD, deterministic)
    inv = inv_frequencies(k, c.rope_theta, c.rope_scaling)
    factor = yarn_attention_factor(c.rope_scaling)  # 1.0 unless YaRN scales cos/sin
    q = apply_rope(q, positions_BxL, inv, factor)
    kk = apply_rope(kk, positions_BxL, inv, factor)
    mask = causal_mask(positions_BxL, positions_BxL)
    out_BxLxHxK = attend(q, kk, v, mask, scale=k ** -0.5)
    o_kw = dict(kw, use_bias=False)
    return Linear(c.hidden_size, ("heads", "embed"), name="o_proj", **o_kw)(
        out_BxLxHxK.reshape(*out_BxLxHxK.shape[:2], h * k), deterministic)
