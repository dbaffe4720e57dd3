"""Tri-modal model: text / image / audio towers, attention pooling into one space, and CMAA.

What the module computes (see docs/multimodal.md):
  tokens_m, mask_m = tower_m(x_m)                              # per modality, independent
  s_m = LN(tokens_m) @ W_m                                     # project to the shared width S
  z_m = Linear(AttnPool_m(s_m, mask_m))                        # one query, multi-head; z in R^E
Cross-modal attention alignment (CMAA), training only, for each pair (a, b):
  c = s_a + CrossAttn(LN(s_a), keys/values = s_b)              # a's tokens attend to b's tokens
  c = c + MLP(LN(c));  match_logit = w . AttnPool(c) + bias    # is (a_i, b_j) the same class?
Retrieval and zero-shot use only z_m, which never sees another modality.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax import losses
from ds_jax.data import audio as A
from ds_jax.models.encoders import (Attention, AudioEncoder, EncoderConfig, FeedForward, TextEncoder,
                                    ViT)
from ds_jax.nn.linear import Linear

MODALITIES = ("text", "image", "audio")
ALL_PAIRS = (("image", "text"), ("image", "audio"), ("audio", "text"))
IMAGE_ANCHORED = (("image", "text"), ("image", "audio"))


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
  text: EncoderConfig = EncoderConfig(max_position_embeddings=32)
  image: EncoderConfig = EncoderConfig(image_size=8, patch_size=2)
  audio: EncoderConfig = EncoderConfig(n_mels=80, patch_frames=4, max_frames=128)
  shared_width: int = 64  # S: width of projected tokens (pooling and CMAA)
  embed_dim: int = 64  # E: the joint embedding space
  pool_heads: int = 4
  cmaa: bool = True
  pairs: tuple = ALL_PAIRS
  contrastive: str = "softmax"  # "softmax" | "sigmoid"
  # A tower config may also be any config with a `tower_cls` (the Linen module to build) and a
  # `hidden_size`: hf_wav2vec2.Wav2Vec2Config (audio from raw waveforms), lm_tower.LMTowerConfig.
  frozen: tuple = ()  # towers trained with no gradient (LiT): their tokens are stop_gradient'ed
  # Initial logit scale log(t) and SigLIP bias; None = the loss's published init (CLIP: t = 1/0.07;
  # SigLIP: t = 10, b = -10). SigLIP's b = -10 is the log-odds of one positive among ~22k
  # candidates (its batch); see multimodal_train.sigmoid_prior_bias for small batches.
  init_log_t: Optional[float] = None
  init_bias: Optional[float] = None


def pair_name(a: str, b: str) -> str:
  return f"{a}_{b}"


def fan_in_std(width: int) -> float:
  """1/sqrt(width): keeps unit scale through the short projection chain after the towers."""
  return width ** -0.5


class AttentionPool(nn.Module):
  """A learned query attends over the (masked) tokens: [B, N, S] -> [B, S]."""
  num_heads: int

  @nn.compact
  def __call__(self, x_BxNxS: jax.Array, mask_BxN: Optional[jax.Array]) -> jax.Array:
    s = x_BxNxS.shape[-1]
    q = self.param("query", nn.initializers.normal(1.0), (1, 1, s), jnp.float32)
    q_Bx1xS = jnp.broadcast_to(q, (x_BxNxS.shape[0], 1, s))
    out = Attention(self.num_heads, init_std=fan_in_std(s), name="attn")(
        q_Bx1xS, mask_BxN, context_BxSxC=x_BxNxS)
    return out[:, 0]


class CrossModalBlock(nn.Module):
  """Tokens of modality a attend to tokens of b; a pooled match logit for the pair."""
  num_heads: int

  @nn.compact
  def __call__(self, a_BxNxS: jax.Array, amask_BxN: jax.Array, b_BxMxS: jax.Array,
               bmask_BxM: jax.Array) -> jax.Array:
    s = a_BxNxS.shape[-1]
    h = nn.LayerNorm(name="ln_q")(a_BxNxS)
    ctx = nn.LayerNorm(name="ln_kv")(b_BxMxS)
    std = fan_in_std(s)
    c = a_BxNxS + Attention(self.num_heads, init_std=std, name="cross_attn")(
        h, bmask_BxM, context_BxSxC=ctx)
    c = c + FeedForward(2 * s, init_std=std, name="mlp")(nn.LayerNorm(name="ln_mlp")(c))
    pooled = AttentionPool(self.num_heads, name="pool")(c, amask_BxN)
    return Linear(1, ("embed", "out"), use_bias=True, init_std=std, name="match")(pooled)[:, 0]


TOWERS = {"text": TextEncoder, "image": ViT, "audio": AudioEncoder}


def tower_module(modality: str, tower_cfg: Any):
  """The Linen class of a tower: the config's own `tower_cls`, else the default of the modality."""
  return getattr(tower_cfg, "tower_cls", None) or TOWERS[modality]


def audio_features(cfg: MultimodalConfig, wave_BxS: jax.Array) -> jax.Array:
  """The audio tower's input from 16 kHz waveforms: the tower config's `features` (wav2vec2:
  normalised raw waveform) or, by default, Whisper log-mel."""
  f = getattr(cfg.audio, "features", None)
  return f(wave_BxS) if f is not None else A.log_mel(wave_BxS)


class TriModal(nn.Module):
  cfg: MultimodalConfig

  def setup(self):
    c = self.cfg
    self.towers = {m: tower_module(m, getattr(c, m))(getattr(c, m), name=f"{m}_tower")
                   for m in MODALITIES}
    self.norms = {m: nn.LayerNorm(name=f"{m}_token_norm") for m in MODALITIES}
    self.projs = {m: Linear(c.shared_width, ("embed", "shared"), name=f"{m}_token_proj",
                            init_std=fan_in_std(getattr(c, m).hidden_size)) for m in MODALITIES}
    self.pools = {m: AttentionPool(c.pool_heads, name=f"{m}_pool") for m in MODALITIES}
    self.heads = {m: Linear(c.embed_dim, ("shared", "joint"), name=f"{m}_head",
                            init_std=fan_in_std(c.shared_width)) for m in MODALITIES}
    names = [pair_name(a, b) for a, b in ALL_PAIRS]
    init_t = (losses.SOFTMAX_INIT_LOG_T if c.contrastive == "softmax"
              else losses.SIGMOID_INIT_LOG_T) if c.init_log_t is None else c.init_log_t
    init_b = losses.SIGMOID_INIT_BIAS if c.init_bias is None else c.init_bias
    self.log_t = {n: self.param(f"log_t_{n}", nn.initializers.constant(init_t), (), jnp.float32)
                  for n in names}
    self.bias = {n: self.param(f"bias_{n}", nn.initializers.constant(init_b),
                               (), jnp.float32) for n in names}
    self.cross = {n: CrossModalBlock(c.pool_heads, name=f"cmaa_{n}") for n in names}

  def tokens(self, modality: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shared-width tokens s_m [B, N, S] and their mask."""
    t_BxNxD, mask_BxN = self.towers[modality](x)
    if modality in self.cfg.frozen:
      t_BxNxD = jax.lax.stop_gradient(t_BxNxD)
    return self.projs[modality](self.norms[modality](t_BxNxD)), mask_BxN

  def embed_tokens(self, modality: str, s_BxNxS: jax.Array, mask_BxN: jax.Array) -> jax.Array:
    return self.heads[modality](self.pools[modality](s_BxNxS, mask_BxN))

  def encode(self, modality: str, x: jax.Array) -> jax.Array:
    """The joint embedding z_m [B, E] (unnormalised) of one modality, computed alone."""
    return self.embed_tokens(modality, *self.tokens(modality, x))

  def match_logits(self, a: str, b: str, sa, ma, sb, mb) -> jax.Array:
    return self.cross[pair_name(a, b)](sa, ma, sb, mb)

  def __call__(self, inputs: dict) -> dict:
    """Embeddings of every modality present plus (for init) every CMAA block's logits."""
    toks = {m: self.tokens(m, x) for m, x in inputs.items()}
    out = {m: self.embed_tokens(m, *t) for m, t in toks.items()}
    for a, b in ALL_PAIRS:
      if a in toks and b in toks:
        out[pair_name(a, b)] = self.match_logits(a, b, *toks[a], *toks[b])
    out["log_t"] = dict(self.log_t)
    out["bias"] = dict(self.bias)
    return out


def hard_negatives(za_BxE: jax.Array, zb_BxE: jax.Array, labels_B: jax.Array) -> jax.Array:
  """For each a_i the index of the most similar b_j of a different class (no gradient)."""
  sim = jax.lax.stop_gradient(losses.l2_normalize(za_BxE) @ losses.l2_normalize(zb_BxE).T)
  sim = jnp.where(labels_B[:, None] == labels_B[None, :], -jnp.inf, sim)
  return jnp.argmax(sim, axis=-1)


def tri_modal_loss(model: TriModal, params: Any, inputs: dict, labels_B: jax.Array, *,
                   pairs: Sequence[tuple[str, str]], kind: str = "softmax",
                   mse_weight: float = 0.5, cmaa_weight: float = 0.5,
                   multi_positive: bool = True,
                   contrastive_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """Sum over `pairs` of w_c * contrastive + mse_weight * MSE (+ cmaa_weight * CMAA BCE)."""

  def fwd(mdl: TriModal):
    toks = {m: mdl.tokens(m, x) for m, x in inputs.items()}
    z = {m: mdl.embed_tokens(m, *t) for m, t in toks.items()}
    total = 0.0
    aux = {}
    lab = labels_B if multi_positive else None
    for a, b in pairs:
      n = pair_name(a, b)
      _, la = losses.contrastive_mse_loss(z[a], z[b], mdl.log_t[n], mdl.bias[n], kind=kind,
                                          mse_weight=mse_weight, labels_B=lab)
      loss = contrastive_weight * la["contrastive"] + mse_weight * la["mse"]
      total = total + loss
      aux[f"{n}/loss"] = loss
      aux[f"{n}/temperature"] = la["temperature"]
      # cmaa_weight may be traced (ramped in the train step); a Python 0 skips the block
      if mdl.cfg.cmaa and not (isinstance(cmaa_weight, (int, float)) and cmaa_weight <= 0):
        neg = hard_negatives(z[a], z[b], labels_B)
        sa, ma = toks[a]
        sb, mb = toks[b]
        # positives and hard negatives in one call of the block (one traced copy, not two)
        cat = lambda x, y: jnp.concatenate([x, y], axis=0)
        logits = mdl.match_logits(a, b, cat(sa, sa), cat(ma, ma), cat(sb, sb[neg]),
                                  cat(mb, mb[neg]))
        pos_logit, neg_logit = jnp.split(logits, 2)
        bce = -(jnp.mean(jax.nn.log_sigmoid(pos_logit)) +
                jnp.mean(jax.nn.log_sigmoid(-neg_logit))) / 2
        total = total + cmaa_weight * bce
        aux[f"{n}/cmaa_bce"] = bce
        aux[f"{n}/cmaa_acc"] = (jnp.mean(pos_logit > 0) + jnp.mean(neg_logit < 0)) / 2
    return total, aux

  return nn.apply(fwd, model)({"params": params})


def init_params(cfg: MultimodalConfig, rng: jax.Array, example: dict) -> Any:
  """Jitted init: op-by-op (eager) init of the three towers and CMAA blocks took ~25 s."""
  example = {k: jnp.asarray(v) for k, v in example.items()}
  return nn.unbox(jax.jit(TriModal(cfg).init)(rng, example)["params"])


def encode(cfg: MultimodalConfig, params: Any, modality: str, x: jax.Array) -> jax.Array:
  """L2-normalised embeddings of one modality (jit this)."""
  z = TriModal(cfg).apply({"params": params}, modality, x, method=TriModal.encode)
  return losses.l2_normalize(z)
