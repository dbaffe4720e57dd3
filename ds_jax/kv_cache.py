"""Cached forward pass of `ds_jax.models.lm.Transformer` for generation.

The same parameter tree and the same Linen submodules as training (RMSNorm, Linear, MLP, MoE,
MLAttention, rope, `attend`), applied layer by layer on slices of the stacked parameters, with a
key/value cache in between. Nothing is forked: a parameter tree with quantized or LoRA kernels
works here exactly as in `lm.apply`.

Cache (`KVCache`): fixed-size slot buffers of length S, written in place at a shared slot index.
  * GQA layer: k [B, S, G, K] and v [B, S, G, K] (rotated keys).
  * MLA layer: ckv [B, S, C] (normalised latent) and kpe [B, S, R] (rotated shared rope key), that
    is kv_lora_rank + qk_rope_head_dim values per token per layer; attention runs in the latent
    space with the absorbed projections (`MLAttention.attend_compressed`).
  * positions [B, S]: the position of the token in each slot, EMPTY for padding and unwritten
    slots, so the usual causal rule (key position <= query position) masks both.
Scanned segments (`layers_<s>`) keep their cache stacked [n, B, S, ...] and run under `lax.scan`
with the cache in the carry, updated by `dynamic_update_slice` (in place inside jit).
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.models.lm import segments
from ds_jax.nn.attention import attend, causal_mask
from ds_jax.nn.embed import Embed
from ds_jax.nn.linear import Linear
from ds_jax.nn.mlp import MLP
from ds_jax.nn.norm import RMSNorm
from ds_jax.nn.rope import apply_rope, inv_frequencies

EMPTY = 2 ** 30  # position of an empty or padding slot: later than any query, so never attended


@flax.struct.dataclass
class KVCache:
  layers: dict  # layer-module name -> {"k", "v"} (GQA) or {"ckv", "kpe"} (MLA)
  positions: jax.Array  # [B, S] int32


def entry_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-token shape of each cached array of one layer."""
  if mc.attention_type == "mla":
    return {"ckv": (mc.kv_lora_rank,), "kpe": (mc.qk_rope_head_dim,)}
  g, k = mc.num_key_value_heads, mc.head_size
  return {"k": (g, k), "v": (g, k)}


def init_cache(mc: ModelConfig, batch: int, length: int) -> KVCache:
  """An empty cache of `length` slots in the model's compute dtype."""
  dtype = jnp.dtype(mc.dtype)
  layers: dict[str, Any] = {}
  for s, (_, first, n) in enumerate(segments(mc)):
    if mc.scan_layers:
      layers[f"layers_{s}"] = {key: jnp.zeros((n, batch, length) + shp, dtype)
                               for key, shp in entry_shapes(mc).items()}
    else:
      for i in range(first, first + n):
        layers[f"layer_{i}"] = {key: jnp.zeros((batch, length) + shp, dtype)
                                for key, shp in entry_shapes(mc).items()}
  return KVCache(layers, jnp.full((batch, length), EMPTY, jnp.int32))


def cache_bytes_per_token(mc: ModelConfig, cache: KVCache) -> float:
  """Bytes of the layers' cached arrays per token slot (the shared positions row excluded);
  works on concrete arrays and on `jax.eval_shape` results."""
  b, s = cache.positions.shape
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(cache.layers)) / (b * s)


def _write(buf_BxSx: jax.Array, new_BxTx: jax.Array, index: jax.Array) -> jax.Array:
  start = (0, index) + (0,) * (buf_BxSx.ndim - 2)
  return jax.lax.dynamic_update_slice(buf_BxSx, new_BxTx.astype(buf_BxSx.dtype), start)


def _gqa(mc: ModelConfig, p: dict, h_BxTxD: jax.Array, pos_BxT: jax.Array, entry: dict,
         kpos_BxS: jax.Array, index: jax.Array) -> tuple[jax.Array, dict]:
  """GQAttention of the new tokens over the cache (after writing their keys and values)."""
  dtype = jnp.dtype(mc.dtype)
  h, g, k = mc.num_attention_heads, mc.num_key_value_heads, mc.head_size
  kw = dict(dtype=dtype, use_bias=mc.attention_bias)

  def proj(name, feats, axes, **extra):
    return Linear(feats, axes, **{**kw, **extra}).apply({"params": p[name]}, h_BxTxD)

  q = proj("q_proj", (h, k), ("embed", "heads", "kv"))
  kk = proj("k_proj", (g, k), ("embed", "kv_heads", "kv"))
  v = proj("v_proj", (g, k), ("embed", "kv_heads", "kv"))
  inv = inv_frequencies(k, mc.rope_theta, mc.rope_scaling)
  q, kk = apply_rope(q, pos_BxT, inv), apply_rope(kk, pos_BxT, inv)
  entry = {"k": _write(entry["k"], kk, index), "v": _write(entry["v"], v, index)}
  mask = causal_mask(pos_BxT, kpos_BxS)
  out_BxTxHxK = attend(q, entry["k"].astype(dtype), entry["v"].astype(dtype), mask, k ** -0.5)
  b, t = out_BxTxHxK.shape[:2]
  o = Linear(mc.hidden_size, ("heads", "embed"), dtype=dtype).apply(
      {"params": p["o_proj"]}, out_BxTxHxK.reshape(b, t, h * k))
  return o, entry


def _mla(mc: ModelConfig, p: dict, h_BxTxD: jax.Array, pos_BxT: jax.Array, entry: dict,
         kpos_BxS: jax.Array, index: jax.Array) -> tuple[jax.Array, dict]:
  """MLA with the compressed cache: write (c_kv, k_pe), attend in the latent space."""
  from ds_jax.nn.mla import MLAttention
  mla, variables = MLAttention(mc), {"params": p}
  ckv_BxTxC, kpe_BxTxR = mla.apply(variables, h_BxTxD, pos_BxT, method="compress_kv")
  entry = {"ckv": _write(entry["ckv"], ckv_BxTxC, index),
           "kpe": _write(entry["kpe"], kpe_BxTxR, index)}
  out = mla.apply(variables, h_BxTxD, pos_BxT, entry["ckv"], entry["kpe"], kpos_BxS,
                  method="attend_compressed")
  return out, entry


def moe_block(mc: ModelConfig, tokens: int) -> int:
  """Expert-group padding block for `tokens` tokens: decoding routes a handful of tokens, and
  padding every expert's group to the training block (8) multiplied the MoE time by ~2.5 at batch
  1 on CPU; the result is the same (padding rows are discarded)."""
  per_expert = tokens * mc.num_experts_per_tok // max(mc.n_routed_experts, 1)
  return max(1, min(mc.moe_block_size, 1 << max(per_expert - 1, 0).bit_length()))


def layer_step(mc: ModelConfig, moe: bool, p: dict, x_BxTxD: jax.Array, pos_BxT: jax.Array,
               entry: dict, kpos_BxS: jax.Array, index: jax.Array) -> tuple[jax.Array, dict]:
  """One `Block` (params `p` = the layer's "block" subtree) on new tokens with its cache entry."""
  dtype = jnp.dtype(mc.dtype)
  norm = RMSNorm(mc.rms_norm_eps, dtype)
  h = norm.apply({"params": p["input_layernorm"]}, x_BxTxD)
  attn = _mla if mc.attention_type == "mla" else _gqa
  a, entry = attn(mc, p["self_attn"], h, pos_BxT, entry, kpos_BxS, index)
  x_BxTxD = x_BxTxD + a
  h = norm.apply({"params": p["post_attention_layernorm"]}, x_BxTxD)
  if moe:
    from ds_jax.nn.moe import MoE
    y, _ = MoE(mc.replace(moe_block_size=moe_block(mc, h.shape[0] * h.shape[1]))).apply(
        {"params": p["mlp"]}, h, True)
  else:
    y = MLP(mc.intermediate_size, dtype, mc.initializer_range).apply({"params": p["mlp"]}, h)
  return x_BxTxD + y, entry


def _segment(mc: ModelConfig, moe: bool, p_stacked: dict, x_BxTxD: jax.Array,
             pos_BxT: jax.Array, cache_seg: dict, kpos_BxS: jax.Array, index: jax.Array):
  """lax.scan over a segment's stacked layers; the stacked cache rides in the carry."""
  n = jax.tree.leaves(cache_seg)[0].shape[0]

  def body(carry, xs):
    x, seg = carry
    p_layer, i = xs
    entry = {key: jax.lax.dynamic_index_in_dim(a, i, keepdims=False) for key, a in seg.items()}
    x, entry = layer_step(mc, moe, p_layer["block"], x, pos_BxT, entry, kpos_BxS, index)
    seg = {key: jax.lax.dynamic_update_index_in_dim(seg[key], entry[key], i, 0) for key in seg}
    return (x, seg), None

  (x_BxTxD, cache_seg), _ = jax.lax.scan(body, (x_BxTxD, cache_seg), (p_stacked, jnp.arange(n)))
  return x_BxTxD, cache_seg


def forward(mc: ModelConfig, params: Any, tokens_BxT: jax.Array, pos_BxT: jax.Array,
            cache: KVCache, index: jax.Array, slot_pos_BxT: jax.Array | None = None,
            last_only: bool = False) -> tuple[jax.Array, KVCache]:
  """Run T new tokens through the model, writing them at cache slots [index, index + T).

  pos_BxT: rope / causal positions of the new tokens. slot_pos_BxT: what the cache records for
  them (default pos; EMPTY marks padding that later tokens must not see). Returns float32 logits
  [B, T, V] ([B, 1, V] with `last_only`) and the updated cache.
  """
  dtype = jnp.dtype(mc.dtype)
  slot_pos = pos_BxT if slot_pos_BxT is None else slot_pos_BxT
  kpos_BxS = _write(cache.positions, slot_pos.astype(jnp.int32), index)
  embed = Embed(mc.vocab_size, mc.hidden_size, dtype)
  x_BxTxD = embed.apply({"params": params["embed_tokens"]}, tokens_BxT)
  layers = dict(cache.layers)
  for s, (moe, first, n) in enumerate(segments(mc)):
    if mc.scan_layers:
      name = f"layers_{s}"
      x_BxTxD, layers[name] = _segment(mc, moe, params[name], x_BxTxD, pos_BxT, layers[name],
                                       kpos_BxS, index)
    else:
      for i in range(first, first + n):
        name = f"layer_{i}"
        x_BxTxD, layers[name] = layer_step(mc, moe, params[name]["block"], x_BxTxD, pos_BxT,
                                           layers[name], kpos_BxS, index)
  if last_only:
    x_BxTxD = x_BxTxD[:, -1:]
  h = RMSNorm(mc.rms_norm_eps, dtype).apply({"params": params["norm"]}, x_BxTxD)
  if mc.tie_word_embeddings:
    logits = embed.apply({"params": params["embed_tokens"]}, h, method="attend")
  else:
    logits = Linear(mc.vocab_size, ("embed", "vocab"), dtype=dtype).apply(
        {"params": params["lm_head"]}, h)
  return logits.astype(jnp.float32), KVCache(layers, kpos_BxS)
