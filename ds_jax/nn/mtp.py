"""DeepSeek-V3 multi-token prediction (MTP), paper §2.2.

Depth k = 1..n (`num_nextn_predict_layers`) keeps the causal chain: at position i it combines the
previous depth's representation h^{k-1}_i with the embedding of token t_{i+k},

    h'^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])   (HF checkpoint order: emb first)
    h^k_i  = shared_head_norm(Block_k(h'^k_i))
    logits = lm_head(h^k_i)  ->  predicts t_{i+k+1}

with the main model's embedding and output head shared. h^0 is the main model's final *normed*
hidden state (what the head reads), as in Megatron-LM and vLLM. Block_k is a full decoder block
(MLA or GQA; MoE when HF's rule `is_moe_layer(num_hidden_layers + k - 1)` says so), and its
parameters live under `mtp_{k-1}` (HF `model.layers.{num_hidden_layers + k - 1}`:
enorm, hnorm, eh_proj, shared_head.norm, and the block's self_attn / mlp / layernorms).

Alignment: `mtp_logits[j, b, i]` (j = k - 1) is the distribution of `tokens[b, i + j + 2]`; the
last j + 2 positions have no target inside the sequence. Their inputs beyond the sequence end are
zero embeddings, so nothing wraps around. `mtp_loss` applies exactly this shift; the train step
adds `cfg.mtp_loss_weight * mtp_loss`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.models.lm import Block  # lm.py imports this module lazily, inside its trace:
# keep module-level imports free of jnp computations (they would become tracers).
from ds_jax.nn.linear import Linear
from ds_jax.nn.norm import RMSNorm


def shift_left(x_BxLxD: jax.Array, k: int) -> jax.Array:
  """x[:, i + k] at position i; zeros past the end."""
  if k == 0:
    return x_BxLxD
  pad = jnp.zeros_like(x_BxLxD[:, :k])
  return jnp.concatenate([x_BxLxD[:, k:], pad], axis=1)


class MTPModule(nn.Module):
  """One MTP depth: (h^{k-1}, Emb(t_{i+k})) -> normed h^k, plus the block's MoE stats."""
  cfg: ModelConfig
  layer_index: int  # num_hidden_layers + k - 1, HF's index of this module

  @nn.compact
  def __call__(self, h_BxLxD: jax.Array, emb_BxLxD: jax.Array, positions_BxL: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, dict]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    e = RMSNorm(c.rms_norm_eps, dtype, name="enorm")(emb_BxLxD)
    h = RMSNorm(c.rms_norm_eps, dtype, name="hnorm")(h_BxLxD)
    x_BxLxD = Linear(c.hidden_size, ("mtp_concat", "embed"), dtype=dtype,
                     init_std=c.initializer_range, name="eh_proj")(
                         jnp.concatenate([e, h], axis=-1), deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    x_BxLxD, aux = Block(c, c.is_moe_layer(self.layer_index), name="block")(
        x_BxLxD, positions_BxL, deterministic)
    return RMSNorm(c.rms_norm_eps, dtype, name="shared_head_norm")(x_BxLxD), aux


def mtp_forward(cfg: ModelConfig, h_BxLxD: jax.Array, emb_BxLxD: jax.Array,
                positions_BxL: jax.Array, head: Callable[[jax.Array], jax.Array],
                deterministic: bool = True) -> tuple[jax.Array, dict]:
  """Run every depth inside the calling (compact) module; `head` is its shared output head.

  Returns logits [n, B, L, V] (float32; see the module docstring for the alignment) and the MTP
  blocks' MoE stats stacked over depths ({} when the blocks are dense).
  """
  logits, stats = [], []
  for j in range(cfg.num_nextn_predict_layers):
    h_BxLxD, aux = MTPModule(cfg, cfg.num_hidden_layers + j, name=f"mtp_{j}")(
        h_BxLxD, shift_left(emb_BxLxD, j + 1), positions_BxL, deterministic)
    logits.append(head(h_BxLxD).astype(jnp.float32))
    if aux:
      stats.append(aux)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else {}
  return jnp.stack(logits), stacked


def mtp_loss(mtp_logits_NxBxLxV: jax.Array, tokens_BxL: jax.Array,
             weights_BxL: Optional[jax.Array] = None, offset: int = 2
             ) -> tuple[jax.Array, dict[str, Any]]:
  """Mean over depths of each depth's token-mean cross-entropy (DeepSeek-V3 eq. 24 without λ).

  Depth j's logits at position i are scored against `tokens_BxL[:, i + j + offset]`: offset 2
  for the model's input tokens, offset 1 for next-token targets (`targets[i] = tokens[i + 1]`,
  what the train step holds). `weights_BxL` (e.g. a padding mask) weights target tokens.
  """
  from ds_jax.losses import lm_loss  # lazily: this module is imported while tracing (lm.py)
  n, _, length, _ = mtp_logits_NxBxLxV.shape
  if weights_BxL is None:
    weights_BxL = jnp.ones(tokens_BxL.shape, jnp.float32)
  per_depth = []
  for j in range(n):
    s = j + offset
    if s >= length:
      raise ValueError(f"MTP depth {j + 1} needs sequences longer than {s}; got {length}")
    loss, _ = lm_loss(mtp_logits_NxBxLxV[j, :, :length - s], tokens_BxL[:, s:],
                      weights_BxL[:, s:])
    per_depth.append(loss)
  losses = jnp.stack(per_depth)
  return jnp.mean(losses), {"mtp_loss_per_depth": losses}
