"""A ds_jax language model (`ds_jax.models.lm.Transformer`) as the text tower of `TriModal`.

What `LMTower` computes, for tri-modal byte tokens t [B, L] (byte + 1, 0 = padding, right-padded):
  ids = t + token_offset where t > 0, else pad_id     # ByteTokenizer: byte b is id b
  ids = [bos_id, ids]                                  # if bos_id >= 0
  h = Transformer(ids).aux["hidden"]                   # final hidden states, before the LM's norm
  pooling "tokens": (h, mask)                          # TriModal attention-pools over the mask
          "mean":   (masked mean of h, [B, 1])        # one token
          "last":   (h at the last real token, [B, 1])
The LM is causal and the padding is on the right, so real tokens never attend to padding; the
mask only keeps padding out of the pooling. The LM head's logits are unused (XLA drops them under
jit). TriModal applies its own LayerNorm to the tower tokens, so the LM's final RMSNorm is not
needed. `lm_tower_config` builds the config from `config.model.text` or from an LM workdir / HF
directory (`load_lm_tower` then gives the parameters, placed at `params["text_tower"]["lm"]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.models.lm import Transformer

POOLINGS = ("tokens", "mean", "last")


@dataclasses.dataclass(frozen=True)
class LMTowerConfig:
  model: ModelConfig = ModelConfig(vocab_size=259, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
  token_offset: int = -1  # LM id of byte token t (= byte + 1) is t + token_offset
  pad_id: int = 0  # id fed at padding positions (never seen by real tokens)
  bos_id: int = -1  # prepended when >= 0 (ByteTokenizer: 256)
  pooling: str = "tokens"  # tokens | mean | last

  @property
  def hidden_size(self) -> int:
    return self.model.hidden_size

  @property
  def tower_cls(self):
    return LMTower

  def replace(self, **kw: Any) -> "LMTowerConfig":
    return dataclasses.replace(self, **kw)


def pool(h_BxLxD: jax.Array, mask_BxL: jax.Array, kind: str) -> jax.Array:
  """Mask-aware pooling [B, L, D] -> [B, D]: masked "mean" or the "last" real token."""
  if kind == "mean":
    m = mask_BxL.astype(h_BxLxD.dtype)[..., None]
    return (h_BxLxD * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  if kind == "last":
    last = jnp.maximum(mask_BxL.astype(jnp.int32).sum(1) - 1, 0)
    return jnp.take_along_axis(h_BxLxD, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"pooling must be mean or last; got {kind!r}")


class LMTower(nn.Module):
  """Byte tokens [B, L] (0 = padding) -> (hidden states, mask) of a decoder-only LM."""
  cfg: LMTowerConfig

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    mask_BxL = tokens_BxL > 0
    ids = jnp.where(mask_BxL, tokens_BxL + c.token_offset, c.pad_id).astype(jnp.int32)
    if c.bos_id >= 0:
      b = ids.shape[0]
      ids = jnp.concatenate([jnp.full((b, 1), c.bos_id, jnp.int32), ids], axis=1)
      mask_BxL = jnp.concatenate([jnp.ones((b, 1), bool), mask_BxL], axis=1)
    _, aux = Transformer(c.model, name="lm")(ids)
    h = aux["hidden"]
    if c.pooling == "tokens":
      return h, mask_BxL
    return pool(h, mask_BxL, c.pooling)[:, None], jnp.ones((h.shape[0], 1), bool)


def lm_tower_config(model: Optional[Mapping] = None, pretrained: str = "",
                    **kw: Any) -> LMTowerConfig:
  """From ModelConfig fields (e.g. `config.model.text`; tower fields such as `pooling` are taken
  too, other keys ignored) or, when `pretrained` is set, with that LM's own ModelConfig (a ds_jax
  workdir or HF directory; bos_id then defaults to the byte tokenizer's BOS)."""
  from ds_jax.config import model_config
  tower_fields = {f.name for f in dataclasses.fields(LMTowerConfig)} - {"model"}
  kw = {**{k: v for k, v in dict(model or {}).items() if k in tower_fields}, **kw}
  if pretrained:
    mc, _, tok = _load(pretrained, params=False)
    kw.setdefault("bos_id", getattr(tok, "bos_id", -1) if _is_byte(tok) else -1)
  else:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = {k: v for k, v in dict(model or {}).items() if k in fields}
    d.setdefault("vocab_size", 259)
    mc = model_config(d)
  if kw.get("pooling", "tokens") not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}; got {kw['pooling']!r}")
  return LMTowerConfig(model=mc, **kw)


def _is_byte(tok: Any) -> bool:
  from ds_jax.data.tokenizer import ByteTokenizer
  return isinstance(tok, ByteTokenizer)


def _load(path: str, params: bool = True):
  """(ModelConfig, params or None, tokenizer) of a ds_jax LM workdir or a HF directory."""
  import json
  import os
  from ds_jax import inference
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  if "model" in cfg:  # ds_jax experiment workdir
    from ds_jax.config import model_config
    mc = model_config(cfg["model"])
    tok = inference._tokenizer(cfg, path)
    p = inference.load_params(path) if params else None
  else:
    m = inference.load(path)
    mc, tok, p = m.mc, m.tokenizer, m.params
  return mc, p, tok


def load_lm_tower(path: str, **kw: Any) -> tuple[LMTowerConfig, Any]:
  """(tower config, LM params for `params["text_tower"]["lm"]`) of a ds_jax workdir / HF dir.

  The tri-modal text pipeline feeds UTF-8 bytes, so the LM must use the byte tokenizer
  (ds_jax's `ByteTokenizer`); another tokenizer raises."""
  mc, p, tok = _load(path)
  if not _is_byte(tok):
    raise ValueError(f"{path}: the LM's tokenizer is {type(tok).__name__}; the tri-modal text "
                     f"input is UTF-8 bytes, so only byte-tokenizer LMs can be the text tower")
  kw.setdefault("bos_id", tok.bos_id)
  if kw.get("pooling", "tokens") not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}; got {kw['pooling']!r}")
  return LMTowerConfig(model=mc, **kw), jax.tree.map(jnp.asarray, p)
