"""Bidirectional transformer encoders for the three towers: text (bytes), ViT (images), audio.

All towers share one pre-norm block whose parameter names follow Hugging Face CLIP
(`self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/fc2`) so CLIP-vision weights load by
renaming only (see `ds_jax.models.hf_encoders`). Every tower returns `(tokens_BxNxD, mask_BxN)`:
the final-normed token states and which tokens are real (padding is False).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.data.audio import normalize_mel
from ds_jax.nn.linear import Linear

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """One tower's hyper-parameters (Hugging Face CLIP / ViT field names where they exist)."""
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"  # "gelu" | "quick_gelu" (CLIP)
  initializer_range: float = 0.02
  dtype: str = "float32"
  # ViT stem.
  image_size: int = 8
  patch_size: int = 2
  num_channels: int = 1
  class_token: bool = False
  pre_layernorm: bool = False  # CLIP's `pre_layrnorm`
  # Pixels are standardised inside the tower, (x - pixel_mean) / pixel_std (identity by default;
  # CLIP towers get normalised images from the data pipeline instead). Uncentred [0, 1] digits
  # share one large mean component: at init every image then had cosine ~0.99 to every other.
  pixel_mean: float = 0.0
  pixel_std: float = 1.0
  # Text stem (byte tokens; 0 = padding).
  vocab_size: int = 260
  max_position_embeddings: int = 64
  # Audio stem: non-overlapping patches of `patch_frames` log-mel frames.
  n_mels: int = 80
  patch_frames: int = 4
  max_frames: int = 128
  # "patch": one linear map of each non-overlapping patch; "conv": Whisper-like 1-D conv stem
  # over time (kernel 3, GELU): one stride-1 conv, then log2(patch_frames) stride-2 convs
  # (patch_frames must be a power of two), so both stems give ceil(T / patch_frames) tokens.
  audio_stem: str = "patch"
  # Per-utterance normalisation of the log-mel before the stem (data.audio.normalize_mel):
  # "none" | "cmvn" (per mel channel over time) | "utt" (one mean / std per clip).
  mel_norm: str = "none"

  def replace(self, **kw: Any) -> "EncoderConfig":
    return dataclasses.replace(self, **kw)


def activation(name: str):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_new":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unknown activation {name!r}")


def mha(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
        kmask_BxS: Optional[jax.Array]) -> jax.Array:
  """Unmasked-in-time (bidirectional) softmax attention with a key-padding mask; f32 softmax."""
  scale = q_BxTxHxK.shape[-1] ** -0.5
  logits = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK).astype(jnp.float32) * scale
  if kmask_BxS is not None:
    logits = jnp.where(kmask_BxS[:, None, None, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxHxK.dtype)
  return jnp.einsum("bhts,bshk->bthk", probs, v_BxSxHxK)


class Attention(nn.Module):
  """Multi-head attention: queries from x, keys/values from `context` (self-attention if None)."""
  num_heads: int
  dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, kmask_BxS: Optional[jax.Array] = None,
               context_BxSxC: Optional[jax.Array] = None) -> jax.Array:
    d = x_BxTxD.shape[-1]
    h = self.num_heads
    ctx = x_BxTxD if context_BxSxC is None else context_BxSxC
    kw = dict(dtype=self.dtype, init_std=self.init_std, use_bias=True)
    q = Linear((h, d // h), ("embed", "heads", "kv"), name="q_proj", **kw)(x_BxTxD)
    k = Linear((h, d // h), ("embed", "heads", "kv"), name="k_proj", **kw)(ctx)
    v = Linear((h, d // h), ("embed", "heads", "kv"), name="v_proj", **kw)(ctx)
    out = mha(q, k, v, kmask_BxS)
    out = out.reshape(*out.shape[:2], d)
    return Linear(d, ("heads", "embed"), name="out_proj", **kw)(out)


class FeedForward(nn.Module):
  intermediate_size: int
  act: str = "gelu"
  dtype: Any = jnp.float32
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, init_std=self.init_std, use_bias=True)
    h = Linear(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x_BxLxD)
    return Linear(x_BxLxD.shape[-1], ("mlp", "embed"), name="fc2", **kw)(activation(self.act)(h))


class EncoderBlock(nn.Module):
  """Pre-norm residual block: x += attn(LN(x)); x += mlp(LN(x)) (CLIP encoder layer)."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, mask_BxL: Optional[jax.Array]) -> jax.Array:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    h = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="layer_norm1")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(c.num_attention_heads, dtype, c.initializer_range,
                                  name="self_attn")(h, mask_BxL)
    h = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="layer_norm2")(x_BxLxD)
    return x_BxLxD + FeedForward(c.intermediate_size, c.hidden_act, dtype, c.initializer_range,
                                 name="mlp")(h)


class Encoder(nn.Module):
  """Stack of `num_hidden_layers` EncoderBlocks named `layers_<i>`."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, mask_BxL: Optional[jax.Array]) -> jax.Array:
    for i in range(self.cfg.num_hidden_layers):
      x_BxLxD = EncoderBlock(self.cfg, name=f"layers_{i}")(x_BxLxD, mask_BxL)
    return x_BxLxD


def _pos_embed(module: nn.Module, n: int, d: int, std: float) -> jax.Array:
  return module.param("position_embedding", nn.initializers.normal(std), (n, d), jnp.float32)


class ViT(nn.Module):
  """Images [B, H, W, C] -> patch tokens (+ optional class token first). CLIP-vision shaped."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, images_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    b, hh, ww, ch = images_BxHxWxC.shape
    if c.pixel_mean != 0.0 or c.pixel_std != 1.0:
      images_BxHxWxC = (images_BxHxWxC - c.pixel_mean) / c.pixel_std
    p = c.patch_size
    gh, gw = hh // p, ww // p
    x = images_BxHxWxC[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, ch)
    patches_BxNxP = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * ch)
    x_BxNxD = Linear(c.hidden_size, ("patch", "embed"), dtype=dtype, use_bias=not c.class_token,
                     init_std=c.initializer_range, name="patch_embedding")(patches_BxNxP)
    if c.class_token:
      cls = self.param("class_embedding", nn.initializers.normal(c.initializer_range),
                       (c.hidden_size,), jnp.float32)
      x_BxNxD = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, c.hidden_size)),
                                 x_BxNxD], axis=1)
    n = x_BxNxD.shape[1]
    x_BxNxD = x_BxNxD + _pos_embed(self, n, c.hidden_size, c.initializer_range).astype(dtype)
    if c.pre_layernorm:
      x_BxNxD = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="pre_layrnorm")(x_BxNxD)
    x_BxNxD = Encoder(c, name="encoder")(x_BxNxD, None)
    x_BxNxD = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="post_layernorm")(x_BxNxD)
    return x_BxNxD, jnp.ones((b, n), bool)


class TextEncoder(nn.Module):
  """Byte tokens [B, L] (0 = padding) -> token states; bidirectional with a padding mask."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    mask_BxL = tokens_BxL > 0
    emb = self.param("token_embedding", nn.initializers.normal(c.initializer_range),
                     (c.vocab_size, c.hidden_size), jnp.float32)
    x_BxLxD = jnp.take(emb, tokens_BxL, axis=0).astype(dtype)
    pos = _pos_embed(self, c.max_position_embeddings, c.hidden_size, c.initializer_range)
    x_BxLxD = x_BxLxD + pos[:tokens_BxL.shape[1]].astype(dtype)
    x_BxLxD = Encoder(c, name="encoder")(x_BxLxD, mask_BxL)
    x_BxLxD = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="final_layer_norm")(x_BxLxD)
    return x_BxLxD, mask_BxL


class AudioEncoder(nn.Module):
  """Log-mel [B, T, n_mels] -> tokens from non-overlapping `patch_frames`-frame patches."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, mel_BxTxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    b, t, m = mel_BxTxM.shape
    p = c.patch_frames
    mel_BxTxM = normalize_mel(mel_BxTxM, c.mel_norm)
    if c.audio_stem == "conv":
      if p & (p - 1):
        raise ValueError(f"audio_stem='conv' needs a power-of-two patch_frames; got {p}")
      act = activation(c.hidden_act)
      x_BxNxD = mel_BxTxM.astype(dtype)
      for i, stride in enumerate([1] + [2] * (p.bit_length() - 1)):
        x_BxNxD = act(nn.Conv(c.hidden_size, (3,), strides=(stride,), padding=((1, 1),),
                              dtype=dtype, name=f"conv{i + 1}")(x_BxNxD))
      n = x_BxNxD.shape[1]
    elif c.audio_stem == "patch":
      n = t // p
      patches_BxNxP = mel_BxTxM[:, :n * p].reshape(b, n, p * m)
      x_BxNxD = Linear(c.hidden_size, ("patch", "embed"), dtype=dtype, use_bias=True,
                       init_std=c.initializer_range, name="patch_embedding")(patches_BxNxP)
    else:
      raise ValueError(f"audio_stem must be 'patch' or 'conv'; got {c.audio_stem!r}")
    pos = _pos_embed(self, c.max_frames // p, c.hidden_size, c.initializer_range)
    x_BxNxD = x_BxNxD + pos[:n].astype(dtype)
    x_BxNxD = Encoder(c, name="encoder")(x_BxNxD, None)
    x_BxNxD = nn.LayerNorm(c.layer_norm_eps, dtype=dtype, name="post_layernorm")(x_BxNxD)
    return x_BxNxD, jnp.ones((b, n), bool)


def tokenize_bytes(texts: list[str], length: int) -> "np.ndarray":
  """UTF-8 bytes + 1 (so 0 is padding), cropped / padded to `length`: int32 [B, length]."""
  import numpy as np
  out = np.zeros((len(texts), length), np.int32)
  for i, s in enumerate(texts):
    ids = np.frombuffer(s.lower().encode("utf-8"), np.uint8)[:length].astype(np.int32) + 1
    out[i, :len(ids)] = ids
  return out
