"""Hugging Face CLIP-vision towers: config translation and weight loading into `encoders.ViT`.

`clip_vision_config(hf_config)` maps a `CLIPVisionConfig` (or a CLIPConfig's `vision_config`, or
its dict / config.json) to an `EncoderConfig`; `clip_vision_params(state_dict)` renames and
transposes a PyTorch state dict (tensors or arrays, with or without the `vision_model.` prefix).
Our ViT applies `post_layernorm` to every token, so its tokens are post_layernorm(HF
last_hidden_state) and token 0 is HF's `pooler_output`. Images are NHWC here (NCHW in HF).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ds_jax.models.encoders import EncoderConfig


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


def clip_vision_config(hf: Any) -> EncoderConfig:
  """EncoderConfig from a CLIPVisionConfig, a CLIPConfig, their dicts, or a config.json path."""
  if isinstance(hf, str):
    with open(os.path.join(hf, "config.json") if os.path.isdir(hf) else hf) as f:
      hf = json.load(f)
  vc = _get(hf, "vision_config")
  if vc is not None:
    hf = vc
  return EncoderConfig(
      hidden_size=_get(hf, "hidden_size", 768), intermediate_size=_get(hf, "intermediate_size", 3072),
      num_hidden_layers=_get(hf, "num_hidden_layers", 12),
      num_attention_heads=_get(hf, "num_attention_heads", 12),
      layer_norm_eps=_get(hf, "layer_norm_eps", 1e-5), hidden_act=_get(hf, "hidden_act", "quick_gelu"),
      image_size=_get(hf, "image_size", 224), patch_size=_get(hf, "patch_size", 32),
      num_channels=_get(hf, "num_channels", 3), class_token=True, pre_layernorm=True)


def _np(t: Any) -> np.ndarray:
  if hasattr(t, "detach"):
    t = t.detach().cpu().float().numpy()
  return np.asarray(t, np.float32)


def _ln(sd: dict, key: str) -> dict:
  return {"scale": _np(sd[key + ".weight"]), "bias": _np(sd[key + ".bias"])}


def _linear(sd: dict, key: str, heads: int = 0) -> dict:
  w = _np(sd[key + ".weight"]).T  # [in, out]
  b = _np(sd[key + ".bias"])
  if heads:
    w = w.reshape(w.shape[0], heads, -1)
    b = b.reshape(heads, -1)
  return {"kernel": w, "bias": b}


def clip_vision_params(state_dict: Mapping[str, Any], cfg: EncoderConfig) -> dict:
  """ViT parameter tree from a CLIPVisionModel / CLIPModel state dict."""
  prefixes = ("vision_model.", "")
  pre = next(p for p in prefixes if p + "embeddings.class_embedding" in state_dict)
  sd = {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)}
  conv = _np(sd["embeddings.patch_embedding.weight"])  # [D, C, p, p]
  h = cfg.num_attention_heads
  layers = {}
  for i in range(cfg.num_hidden_layers):
    k = f"encoder.layers.{i}."
    layers[f"layers_{i}"] = {
        "layer_norm1": _ln(sd, k + "layer_norm1"), "layer_norm2": _ln(sd, k + "layer_norm2"),
        "self_attn": {"q_proj": _linear(sd, k + "self_attn.q_proj", h),
                      "k_proj": _linear(sd, k + "self_attn.k_proj", h),
                      "v_proj": _linear(sd, k + "self_attn.v_proj", h),
                      "out_proj": _linear(sd, k + "self_attn.out_proj")},
        "mlp": {"fc1": _linear(sd, k + "mlp.fc1"), "fc2": _linear(sd, k + "mlp.fc2")}}
  return {
      "patch_embedding": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])},
      "class_embedding": _np(sd["embeddings.class_embedding"]),
      "position_embedding": _np(sd["embeddings.position_embedding.weight"]),
      "pre_layrnorm": _ln(sd, "pre_layrnorm"),
      "encoder": layers,
      "post_layernorm": _ln(sd, "post_layernorm")}


def load_clip_vision(path: str) -> tuple[EncoderConfig, dict]:
  """(config, ViT params) from a local Hugging Face CLIP / CLIP-vision directory (safetensors)."""
  from safetensors.numpy import load_file
  cfg = clip_vision_config(path)
  sd: dict = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      sd.update(load_file(os.path.join(path, name)))
  return cfg, clip_vision_params(sd, cfg)
