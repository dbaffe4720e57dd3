"""Decoder-only language model: dense (Llama) or MoE (DeepSeek-V2/V3, Mixtral), GQA or MLA.

Consecutive layers of the same kind (dense / MoE) form a *segment*; with `scan_layers` each
segment is one `nn.scan` over a stacked parameter tree (`layers_<segment>`, leading axis = layer),
so compile time does not grow with depth. Without scanning, layers are `layer_<i>`.

The model returns `(logits_BxLxV, aux)`; `aux["moe"]` holds each MoE layer's router statistics
stacked over MoE layers (see `ds_jax.nn.moe`).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ds_jax.config import ModelConfig
from ds_jax.nn.attention import GQAttention
from ds_jax.nn.embed import Embed
from ds_jax.nn.linear import Linear
from ds_jax.nn.mlp import MLP
from ds_jax.nn.norm import RMSNorm

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def segments(cfg: ModelConfig) -> list[tuple[bool, int, int]]:
  """[(is_moe, first_layer, num_layers)] runs of consecutive layers of the same kind."""
  runs: list[tuple[bool, int, int]] = []
  for i in range(cfg.num_hidden_layers):
    moe = cfg.is_moe_layer(i)
    if runs and runs[-1][0] == moe:
      runs[-1] = (moe, runs[-1][1], runs[-1][2] + 1)
    else:
      runs.append((moe, i, 1))
  return runs


def layer_location(cfg: ModelConfig, i: int) -> tuple[str, Optional[int]]:
  """Where layer i's parameters live: (module name, index along the stacked axis or None)."""
  if not cfg.scan_layers:
    return f"layer_{i}", None
  for s, (_, first, n) in enumerate(segments(cfg)):
    if first <= i < first + n:
      return f"layers_{s}", i - first
  raise IndexError(i)


def attention_module(cfg: ModelConfig):
  if cfg.attention_type == "mla":
    from ds_jax.nn.mla import MLAttention
    return MLAttention
  return GQAttention


class Block(nn.Module):
  """Pre-norm residual block: attention, then a SwiGLU MLP or an MoE layer."""
  cfg: ModelConfig
  moe: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               deterministic: bool = True) -> tuple[jax.Array, dict]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    h = RMSNorm(c.rms_norm_eps, dtype, name="input_layernorm")(x_BxLxD)
    attn = attention_module(c)(c, name="self_attn")(h, positions_BxL, deterministic)
    attn = checkpoint_name(attn, "attn_out")
    x_BxLxD = x_BxLxD + attn
    h = RMSNorm(c.rms_norm_eps, dtype, name="post_attention_layernorm")(x_BxLxD)
    if self.moe:
      from ds_jax.nn.moe import MoE
      y, aux = MoE(c, name="mlp")(h, deterministic)
    else:
      y, aux = MLP(c.intermediate_size, dtype, c.initializer_range, name="mlp")(
          h, deterministic), {}
    x_BxLxD = x_BxLxD + y
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    return x_BxLxD, aux


class ScanBody(nn.Module):
  """Block with the (carry, xs) -> (carry, ys) signature nn.scan wants."""
  cfg: ModelConfig
  moe: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    block = Block
    if self.cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], static_argnums=(3,))
    x_BxLxD, aux = block(self.cfg, self.moe, name="block")(x_BxLxD, positions_BxL,
                                                           self.deterministic)
    return x_BxLxD, aux


class Transformer(nn.Module):
  cfg: ModelConfig

  def body(self, x_BxLxD, positions_BxL, deterministic):
    """Run every layer; returns the final (un-normed) hidden state and stacked MoE stats."""
    c = self.cfg
    moe_aux = []
    for s, (is_moe, first, n) in enumerate(segments(c)):
      if c.scan_layers:
        scan = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                           "dropout": True},
                       in_axes=nn.broadcast, length=n,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxLxD, aux = scan(c, is_moe, deterministic, name=f"layers_{s}")(x_BxLxD,
                                                                           positions_BxL)
        if is_moe:
          moe_aux.append(aux)
      else:
        for i in range(first, first + n):
          x_BxLxD, aux = ScanBody(c, is_moe, deterministic, name=f"layer_{i}")(
              x_BxLxD, positions_BxL)
          if is_moe:
            moe_aux.append(jax.tree.map(lambda a: a[None], aux))
    stats = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *moe_aux) if moe_aux else {}
    return x_BxLxD, stats

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, positions_BxL: Optional[jax.Array] = None,
               deterministic: bool = True, inputs_embeds_BxLxD: Optional[jax.Array] = None
               ) -> tuple[jax.Array, dict]:
    """Logits [B, L, V] (float32) and aux; `inputs_embeds_BxLxD` replaces the token lookup."""
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    embed = Embed(c.vocab_size, c.hidden_size, dtype, c.initializer_range, name="embed_tokens")
    x_BxLxD = embed(tokens_BxL) if inputs_embeds_BxLxD is None else inputs_embeds_BxLxD
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    h_BxLxD, stats = self.body(x_BxLxD, positions_BxL, deterministic)
    normed = RMSNorm(c.rms_norm_eps, dtype, name="norm")(h_BxLxD)
    if c.tie_word_embeddings:
      head = embed.attend
    else:
      head = Linear(c.vocab_size, ("embed", "vocab"), dtype=dtype,
                    init_std=c.initializer_range, name="lm_head")
    logits_BxLxV = head(normed)
    aux: dict[str, Any] = {"moe": stats, "hidden": h_BxLxD}
    # -- DeepSeek-V3 multi-token prediction (ds_jax.nn.mtp), sharing embedding and head:
    # aux["mtp_logits"][j, b, i] ([n, B, L, V]) predicts tokens[b, i + j + 2]; aux["mtp_moe"]
    # holds the MTP blocks' MoE stats stacked over depths ({} when dense).
    if c.num_nextn_predict_layers > 0:
      from ds_jax.nn.mtp import mtp_forward
      aux["mtp_logits"], aux["mtp_moe"] = mtp_forward(c, normed, x_BxLxD, positions_BxL, head,
                                                      deterministic)
    # -- end multi-token prediction
    return logits_BxLxV.astype(jnp.float32), aux


def apply(cfg: ModelConfig, params: Any, tokens_BxL: jax.Array) -> jax.Array:
  """Functional forward for notebooks and conversion checks: logits [batch, length, vocab]."""
  logits, _ = Transformer(cfg).apply({"params": params}, tokens_BxL)
  return logits


def init(cfg: ModelConfig, rng: jax.Array, batch: int = 1, length: int = 8) -> Any:
  """Unboxed float32 parameters (no sharding); see `ds_jax.train` for sharded init."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  variables = Transformer(cfg).init(rng, tokens)
  return nn.unbox(variables["params"])
