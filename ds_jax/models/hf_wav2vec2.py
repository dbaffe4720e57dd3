"""wav2vec 2.0 encoder over raw 16 kHz waveforms, with Hugging Face config and weight loading.

What `Wav2Vec2` computes (transformers' `Wav2Vec2Model`, inference mode, no adapter):
  f = ConvStack(wave)                     # 7 strided 1-D convs (320x down-sampling for base);
                                          # "group": GroupNorm(C groups) after conv 0 only;
                                          # "layer": LayerNorm over channels after every conv
  x = Linear(LN(f))                       # feature projection to hidden_size
  x[padded frames] = 0
  x = x + GELU(WeightNormConv(x))         # positional conv embedding (groups, same padding)
  post-norm ("base", do_stable_layer_norm=False):
    x = LN(x); per layer: x = LN(x + Attn(x)); x = LN(x + FF(x))
  stable-layer-norm ("large", lv60):
    per layer: x = x + Attn(LN(x)); x = x + FF(LN(x)); finally x = LN(x)
Attention masks padded frames as keys. The tower returns (last_hidden_state, frame mask).

`wav2vec2_config(hf)` maps a `Wav2Vec2Config` (object, dict or config.json path) to ours;
`wav2vec2_params(state_dict_or_model, cfg)` renames / transposes PyTorch weights (with or without
the `wav2vec2.` prefix of the CTC / pre-training heads; weight norm stored as
`parametrizations.weight.original0/1` or `weight_g/weight_v`); `load_wav2vec2(path_or_model)`
returns both. `normalize_waveform` is the feature extractor's `do_normalize` (per clip zero mean,
unit variance over the unpadded part).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.models.encoders import Attention, activation
from ds_jax.models.hf_encoders import _linear, _ln, _np  # the CLIP loader's torch->Linen helpers
from ds_jax.nn.linear import Linear


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  """Hugging Face `Wav2Vec2Config` field names; defaults are wav2vec2-base."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  feat_extract_norm: str = "group"  # "group" (base) | "layer" (large / lv60 / stable)
  feat_extract_activation: str = "gelu"
  conv_dim: tuple = (512,) * 7
  conv_stride: tuple = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  initializer_range: float = 0.02
  dtype: str = "float32"
  do_normalize: bool = True  # the feature extractor's per-clip normalisation (tri-modal input)

  def replace(self, **kw: Any) -> "Wav2Vec2Config":
    return dataclasses.replace(self, **kw)

  @property
  def tower_cls(self):
    """The Linen module the tri-modal model builds for this config (`multimodal.TriModal`)."""
    return Wav2Vec2

  def features(self, wave_BxS: jax.Array) -> jax.Array:
    """The tri-modal `audio_processor` for this tower: raw (optionally normalised) waveforms."""
    return normalize_waveform(wave_BxS) if self.do_normalize else wave_BxS

  def frames(self, num_samples: int) -> int:
    """Number of output frames for `num_samples` input samples."""
    n = num_samples
    for k, s in zip(self.conv_kernel, self.conv_stride):
      n = (n - k) // s + 1
    return n


FIELDS = tuple(f.name for f in dataclasses.fields(Wav2Vec2Config))


def normalize_waveform(wave_BxS: jax.Array, mask_BxS: Optional[jax.Array] = None) -> jax.Array:
  """Zero mean, unit variance per clip over the unpadded samples; padding set to 0."""
  x = wave_BxS.astype(jnp.float32)
  m = jnp.ones_like(x) if mask_BxS is None else mask_BxS.astype(jnp.float32)
  n = jnp.maximum(m.sum(-1, keepdims=True), 1.0)
  mean = (x * m).sum(-1, keepdims=True) / n
  var = (jnp.square(x - mean) * m).sum(-1, keepdims=True) / n
  return (x - mean) / jnp.sqrt(var + 1e-7) * m


def _norm(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """Two-pass mean / variance normalisation along `axis` in float32 (no affine)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(axis, keepdims=True)
  var = jnp.square(x32 - mean).mean(axis, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class Norm(nn.Module):
  """LayerNorm over channels (axis -1) or per-channel GroupNorm over time (axis 1), affine."""
  eps: float = 1e-5
  axis: int = -1

  @nn.compact
  def __call__(self, x_BxTxC: jax.Array) -> jax.Array:
    c = x_BxTxC.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    y = _norm(x_BxTxC, self.axis, self.eps)
    return y * scale.astype(y.dtype) + bias.astype(y.dtype)


class FeatureEncoder(nn.Module):
  """Waveform [B, S] -> conv features [B, T, conv_dim[-1]] (`conv_layers_<i>`)."""
  cfg: Wav2Vec2Config

  @nn.compact
  def __call__(self, wave_BxS: jax.Array) -> jax.Array:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    act = activation(c.feat_extract_activation)
    x = wave_BxS[..., None].astype(dtype)
    for i, (d, k, s) in enumerate(zip(c.conv_dim, c.conv_kernel, c.conv_stride)):
      x = nn.Conv(d, (k,), (s,), padding="VALID", use_bias=c.conv_bias, dtype=dtype,
                  kernel_init=nn.initializers.he_normal(), name=f"conv_layers_{i}_conv")(x)
      if c.feat_extract_norm == "layer":
        x = Norm(1e-5, -1, name=f"conv_layers_{i}_layer_norm")(x)
      elif c.feat_extract_norm == "group" and i == 0:
        x = Norm(1e-5, 1, name=f"conv_layers_{i}_layer_norm")(x)  # GroupNorm(C, C): over time
      x = act(x)
    return x


class PositionalConvEmbedding(nn.Module):
  """GELU(grouped conv with weight norm over the kernel axis, 'same' padding)."""
  cfg: Wav2Vec2Config

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c = self.cfg
    d, k, g = c.hidden_size, c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups
    std = 2.0 / np.sqrt(k * d / g)
    v = self.param("weight_v", nn.initializers.normal(std), (k, d // g, d), jnp.float32)
    norm_v = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2)))
    w_g = self.param("weight_g", lambda rng: norm_v(v))  # initially w == v (as in PyTorch)
    b = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    w = (w_g / norm_v(v))[:, None, None] * v  # [K, D/groups, D]
    dtype = x_BxTxD.dtype
    y = jax.lax.conv_general_dilated(x_BxTxD, w.astype(dtype), (1,), [(k // 2, k // 2)],
                                     dimension_numbers=("NWC", "WIO", "NWC"),
                                     feature_group_count=g)
    if k % 2 == 0:
      y = y[:, :-1]
    return activation(c.feat_extract_activation)(y + b.astype(dtype))


class FeedForward(nn.Module):
  cfg: Wav2Vec2Config

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    c = self.cfg
    kw = dict(dtype=jnp.dtype(c.dtype), init_std=c.initializer_range, use_bias=True)
    h = Linear(c.intermediate_size, ("embed", "mlp"), name="intermediate_dense", **kw)(x_BxTxD)
    return Linear(c.hidden_size, ("mlp", "embed"), name="output_dense", **kw)(
        activation(c.hidden_act)(h))


class EncoderLayer(nn.Module):
  cfg: Wav2Vec2Config

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, mask_BxT: Optional[jax.Array]) -> jax.Array:
    c = self.cfg
    attn = Attention(c.num_attention_heads, jnp.dtype(c.dtype), c.initializer_range,
                     name="attention")
    ln1 = Norm(c.layer_norm_eps, name="layer_norm")
    ln2 = Norm(c.layer_norm_eps, name="final_layer_norm")
    ff = FeedForward(c, name="feed_forward")
    if c.do_stable_layer_norm:
      x_BxTxD = x_BxTxD + attn(ln1(x_BxTxD), mask_BxT)
      return x_BxTxD + ff(ln2(x_BxTxD))
    x_BxTxD = ln1(x_BxTxD + attn(x_BxTxD, mask_BxT))
    return ln2(x_BxTxD + ff(x_BxTxD))


class Wav2Vec2(nn.Module):
  """Waveform [B, S] (16 kHz; `mask_BxS` marks real samples) -> (tokens [B, T, D], mask [B, T])."""
  cfg: Wav2Vec2Config

  @nn.compact
  def __call__(self, wave_BxS: jax.Array, mask_BxS: Optional[jax.Array] = None
               ) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    f = FeatureEncoder(c, name="feature_extractor")(wave_BxS)
    b, t = f.shape[:2]
    if mask_BxS is None:
      mask_BxT = jnp.ones((b, t), bool)
      kmask = None
    else:
      n = mask_BxS.astype(jnp.int32).sum(-1)
      for k, s in zip(c.conv_kernel, c.conv_stride):
        n = (n - k) // s + 1
      mask_BxT = jnp.arange(t)[None, :] < n[:, None]
      kmask = mask_BxT
    f = Norm(c.layer_norm_eps, name="feature_projection_layer_norm")(f)
    x = Linear(c.hidden_size, ("conv", "embed"), use_bias=True, dtype=dtype,
               init_std=c.initializer_range, name="feature_projection")(f)
    if kmask is not None:
      x = jnp.where(kmask[..., None], x, 0)
    x = x + PositionalConvEmbedding(c, name="pos_conv_embed")(x)
    if not c.do_stable_layer_norm:
      x = Norm(c.layer_norm_eps, name="encoder_layer_norm")(x)
    for i in range(c.num_hidden_layers):
      x = EncoderLayer(c, name=f"layers_{i}")(x, kmask)
    if c.do_stable_layer_norm:
      x = Norm(c.layer_norm_eps, name="encoder_layer_norm")(x)
    return x, mask_BxT


# ----------------------------------------------------------------------------- Hugging Face

def _get(cfg: Any, name: str, default: Any = None) -> Any:
  return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


def wav2vec2_config(hf: Any, **overrides: Any) -> Wav2Vec2Config:
  """Our config from a transformers `Wav2Vec2Config`, its dict, or a config.json (or dir) path."""
  if isinstance(hf, str):
    with open(os.path.join(hf, "config.json") if os.path.isdir(hf) else hf) as f:
      hf = json.load(f)
  if _get(hf, "add_adapter", False):
    raise ValueError("wav2vec2 adapters (add_adapter=True) are not supported")
  d = Wav2Vec2Config()
  kw = {}
  for name in FIELDS:
    if name in ("dtype", "do_normalize", "initializer_range"):
      continue
    v = _get(hf, name, getattr(d, name))
    kw[name] = tuple(v) if isinstance(v, list) else v
  kw.update(overrides)
  cfg = Wav2Vec2Config(**kw)
  if cfg.feat_extract_norm not in ("group", "layer"):
    raise ValueError(f"feat_extract_norm must be group or layer; got {cfg.feat_extract_norm!r}")
  return cfg


def tower_config(fields: Optional[Mapping] = None, pretrained: str = "") -> Wav2Vec2Config:
  """The tri-modal audio tower's config: from `config.model.audio` (Wav2Vec2Config fields; keys
  of the default log-mel tower such as patch_frames are ignored) or, when `pretrained` is a HF
  directory, from its config.json (and `do_normalize` from its preprocessor_config.json)."""
  d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(fields or {}).items()
       if k in FIELDS}
  if not pretrained:
    return Wav2Vec2Config(**d)
  pp = os.path.join(pretrained, "preprocessor_config.json")
  over = {k: d[k] for k in ("dtype", "do_normalize") if k in d}
  if os.path.exists(pp) and "do_normalize" not in over:
    with open(pp) as f:
      over["do_normalize"] = bool(json.load(f).get("do_normalize", True))
  return wav2vec2_config(pretrained, **over)




def wav2vec2_params(state_dict_or_model: Any, cfg: Wav2Vec2Config) -> dict:
  """`Wav2Vec2` parameter tree from a Wav2Vec2Model / ForCTC / ForPreTraining state dict or
  model (PyTorch tensors or numpy arrays)."""
  sd = state_dict_or_model
  if hasattr(sd, "state_dict"):
    sd = sd.state_dict()
  pre = next((p for p in ("", "wav2vec2.") if p + "feature_projection.projection.weight" in sd),
             None)
  if pre is None:
    raise KeyError("not a wav2vec2 state dict (no feature_projection.projection.weight)")
  sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
  out: dict = {}
  fe = {}
  for i in range(len(cfg.conv_dim)):
    k = f"feature_extractor.conv_layers.{i}."
    conv = {"kernel": _np(sd[k + "conv.weight"]).transpose(2, 1, 0)}  # [out,in,K] -> [K,in,out]
    if cfg.conv_bias:
      conv["bias"] = _np(sd[k + "conv.bias"])
    fe[f"conv_layers_{i}_conv"] = conv
    if k + "layer_norm.weight" in sd:
      fe[f"conv_layers_{i}_layer_norm"] = _ln(sd, k + "layer_norm")
  out["feature_extractor"] = fe
  out["feature_projection_layer_norm"] = _ln(sd, "feature_projection.layer_norm")
  out["feature_projection"] = _linear(sd, "feature_projection.projection")
  p = "encoder.pos_conv_embed.conv."
  if p + "parametrizations.weight.original0" in sd:
    g, v = sd[p + "parametrizations.weight.original0"], sd[p + "parametrizations.weight.original1"]
  else:
    g, v = sd[p + "weight_g"], sd[p + "weight_v"]
  out["pos_conv_embed"] = {"weight_g": _np(g).reshape(-1),
                           "weight_v": _np(v).transpose(2, 1, 0),  # [D, D/g, K] -> [K, D/g, D]
                           "bias": _np(sd[p + "bias"])}
  out["encoder_layer_norm"] = _ln(sd, "encoder.layer_norm")
  h = cfg.num_attention_heads
  for i in range(cfg.num_hidden_layers):
    k = f"encoder.layers.{i}."
    out[f"layers_{i}"] = {
        "attention": {"q_proj": _linear(sd, k + "attention.q_proj", h),
                      "k_proj": _linear(sd, k + "attention.k_proj", h),
                      "v_proj": _linear(sd, k + "attention.v_proj", h),
                      "out_proj": _linear(sd, k + "attention.out_proj")},
        "layer_norm": _ln(sd, k + "layer_norm"),
        "final_layer_norm": _ln(sd, k + "final_layer_norm"),
        "feed_forward": {"intermediate_dense": _linear(sd, k + "feed_forward.intermediate_dense"),
                         "output_dense": _linear(sd, k + "feed_forward.output_dense")}}
  return out


def _read_state_dict(path: str) -> dict:
  sd: dict = {}
  names = sorted(os.listdir(path))
  st = [n for n in names if n.endswith(".safetensors")]
  if st:
    from safetensors.numpy import load_file
    for n in st:
      sd.update(load_file(os.path.join(path, n)))
    return sd
  bins = [n for n in names if n.endswith(".bin") and n.startswith("pytorch_model")]
  if not bins:
    raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin")
  import torch
  for n in bins:
    sd.update(torch.load(os.path.join(path, n), map_location="cpu", weights_only=True))
  return sd


def load_wav2vec2(path_or_model: Any, **overrides: Any) -> tuple[Wav2Vec2Config, dict]:
  """(config, params) from a local Hugging Face wav2vec2 directory or a transformers model."""
  if isinstance(path_or_model, str):
    cfg = wav2vec2_config(path_or_model, **overrides)
    return cfg, wav2vec2_params(_read_state_dict(path_or_model), cfg)
  cfg = wav2vec2_config(path_or_model.config, **overrides)
  return cfg, wav2vec2_params(path_or_model.state_dict(), cfg)
