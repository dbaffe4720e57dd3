"""Multi-head latent attention (MLA) of DeepSeek-V2/V3.

Keys and values are compressed into one latent per token, c_kv = RMSNorm(x W_dkv) of size
`kv_lora_rank` (C), plus one rope key k_pe of size `qk_rope_head_dim` (R) shared by all heads
("decoupled RoPE"). Per head h the key is [c_kv W_uk_h ; k_pe] and the value c_kv W_uv_h, where
`kv_b_proj` holds W_uk (N = qk_nope_head_dim columns) and W_uv (V = v_head_dim columns) per head.
Queries are x W_q or, with `q_lora_rank`, RMSNorm(x W_dq) W_uq, split per head into N nope and R
rope dimensions. Letters: B batch, L/T query length, S key length, D hidden, H heads.

Two equivalent computations:
  * `__call__` (training default): decompress k_nope and v per head, then attend.
  * `compress_kv` + `attend_compressed` (generation): cache only c_kv and k_pe (C + R values per
    token and layer), absorb W_uk into the query and W_uv into the output, so attention runs in the
    latent space and nothing per-head is stored.

Rope convention: ds_jax rotates in the half-split layout (dimension j pairs with j + R/2). HF
DeepSeek checkpoints store q_pe / k_pe interleaved (pairs 2i, 2i+1); a converter permutes the rope
output columns once with `hf_rope_permutation` (see `hf_q_columns`, `hf_kv_a_columns`).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.config import ModelConfig
from ds_jax.nn.attention import NEG_INF, causal_mask
from ds_jax.nn.linear import Linear, einsum
from ds_jax.nn.norm import RMSNorm
from ds_jax.nn.rope import apply_rope, inv_frequencies, yarn_attention_factor, yarn_softmax_mscale

# HF builds q_a_layernorm / kv_a_layernorm with the RMSNorm default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
  """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
  return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * yarn_softmax_mscale(
      cfg.rope_scaling)


def hf_rope_permutation(dim: int) -> np.ndarray:
  """Column indices taking HF's interleaved rope layout to ds_jax's half-split one.

  ds_jax column j reads HF column perm[j]: perm = [0, 2, 4, ..., 1, 3, 5, ...]. HF rotates the pair
  (2i, 2i+1) by frequency i; after the permutation that pair sits at (i, i + dim/2), which is the
  pair `apply_rope` rotates by frequency i. Queries and keys get the same permutation, so every
  q.k dot product, hence the attention output, is unchanged.
  """
  if dim % 2:
    raise ValueError(f"rope dim must be even; got {dim}")
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def hf_q_columns(cfg: ModelConfig) -> np.ndarray:
  """Indices into the output columns of HF q_proj / q_b_proj (head-major, [nope ; rope] per head)
  giving ds_jax's order: `kernel_ds = W_hf.T[:, cols].reshape(in, H, N + R)`."""
  n, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  per_head = np.concatenate([np.arange(n), n + hf_rope_permutation(r)])
  return (np.arange(cfg.num_attention_heads)[:, None] * (n + r) + per_head).reshape(-1)


def hf_kv_a_columns(cfg: ModelConfig) -> np.ndarray:
  """Indices into the output columns of HF kv_a_proj_with_mqa ([latent ; rope key]):
  `kernel_ds = W_hf.T[:, cols]`."""
  c = cfg.kv_lora_rank
  return np.concatenate([np.arange(c), c + hf_rope_permutation(cfg.qk_rope_head_dim)])


def _unbox(v: Any) -> Any:
  return v.value if isinstance(v, nn.Partitioned) else v


class MLAttention(nn.Module):
  """DeepSeek-V2/V3 attention; parameter names as HF `DeepseekV2Attention`."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dtype = jnp.dtype(c.dtype)
    h, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    kw = dict(dtype=dtype, init_std=c.initializer_range)
    if c.q_lora_rank:
      self.q_a_proj = Linear(c.q_lora_rank, ("embed", "q_lora"), use_bias=c.attention_bias, **kw)
      self.q_a_layernorm = RMSNorm(LATENT_NORM_EPS, dtype)
      self.q_b_proj = Linear((h, qk), ("q_lora", "heads", "kv"), **kw)
    else:
      self.q_proj = Linear((h, qk), ("embed", "heads", "kv"), **kw)
    self.kv_a_proj_with_mqa = Linear(c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv_lora"),
                                     use_bias=c.attention_bias, **kw)
    self.kv_a_layernorm = RMSNorm(LATENT_NORM_EPS, dtype)
    self.kv_b_proj = Linear((h, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv"),
                            **kw)
    self.o_proj = Linear(c.hidden_size, ("heads", "embed"), use_bias=c.attention_bias, **kw)

  def _rope(self, x_BxLxHxR: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    c = self.cfg
    inv = inv_frequencies(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
    return apply_rope(x_BxLxHxR, positions_BxL, inv, yarn_attention_factor(c.rope_scaling))

  def queries(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
              deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(q_nope [B, L, H, N], rotated q_pe [B, L, H, R])."""
    if self.cfg.q_lora_rank:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BxLxD, deterministic)), deterministic)
    else:
      q = self.q_proj(x_BxLxD, deterministic)
    n = self.cfg.qk_nope_head_dim
    return q[..., :n], self._rope(q[..., n:], positions_BxL)

  def compress_kv(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                  deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """The cache entries: normalised latent c_kv [B, L, C] and rotated shared key k_pe [B, L, R]."""
    kv = self.kv_a_proj_with_mqa(x_BxLxD, deterministic)
    ckv_BxLxC = self.kv_a_layernorm(kv[..., :self.cfg.kv_lora_rank])
    kpe_BxLxR = self._rope(kv[..., None, self.cfg.kv_lora_rank:], positions_BxL)[:, :, 0]
    return ckv_BxLxC, kpe_BxLxR

  def _output(self, out_BxTxHxV: jax.Array, deterministic: bool) -> jax.Array:
    b, t = out_BxTxHxV.shape[:2]
    return self.o_proj(out_BxTxHxV.reshape(b, t, -1), deterministic)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """Causal self-attention over x with decompressed per-head keys and values."""
    c = self.cfg
    qn_BxLxHxN, qpe_BxLxHxR = self.queries(x_BxLxD, positions_BxL, deterministic)
    ckv_BxSxC, kpe_BxSxR = self.compress_kv(x_BxLxD, positions_BxL, deterministic)
    kv_BxSxHxE = self.kv_b_proj(ckv_BxSxC, deterministic)
    kn_BxSxHxN = kv_BxSxHxE[..., :c.qk_nope_head_dim]
    v_BxSxHxV = kv_BxSxHxE[..., c.qk_nope_head_dim:]
    # One score einsum over [nope ; rope] (the shared k_pe broadcast to every head) instead of two
    # summed [B, H, T, S] products: one fewer score-sized temporary and add, forward and backward.
    h = qn_BxLxHxN.shape[2]
    q_BxLxHxE = jnp.concatenate([qn_BxLxHxN, qpe_BxLxHxR.astype(qn_BxLxHxN.dtype)], -1)
    kpe_BxSxHxR = jnp.broadcast_to(kpe_BxSxR[:, :, None], kpe_BxSxR.shape[:2] + (h,) +
                                   kpe_BxSxR.shape[2:]).astype(kn_BxSxHxN.dtype)
    k_BxSxHxE = jnp.concatenate([kn_BxSxHxN, kpe_BxSxHxR], -1)
    logits_BxHxTxS = jnp.einsum("bthe,bshe->bhts", q_BxLxHxE, k_BxSxHxE)
    probs_BxHxTxS = _masked_softmax(logits_BxHxTxS, causal_mask(positions_BxL, positions_BxL),
                                    softmax_scale(c)).astype(v_BxSxHxV.dtype)
    out_BxTxHxV = jnp.einsum("bhts,bshv->bthv", probs_BxHxTxS, v_BxSxHxV)
    return self._output(out_BxTxHxV, deterministic)

  def attend_compressed(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                        ckv_BxSxC: jax.Array, kpe_BxSxR: jax.Array, k_positions_BxS: jax.Array,
                        k_valid_BxS: Optional[jax.Array] = None,
                        deterministic: bool = True) -> jax.Array:
    """Attention of the queries of x over cached (c_kv, k_pe), in the latent space.

    q_nope is absorbed into kv_b_proj's key part (q_lat = q_nope W_uk^T, [B, T, H, C]) and the
    probability-weighted latent goes out through its value part; keys at k_positions > the query
    position or with k_valid False are masked. Equals `__call__` when the cache holds x itself.
    The kernel is used whole through `ds_jax.nn.linear.einsum` (zero-padded query, sliced output)
    so quantized or adapted kernels work unchanged, at twice the (small) absorption FLOPs.
    """
    c = self.cfg
    n = c.qk_nope_head_dim
    qn_BxTxHxN, qpe_BxTxHxR = self.queries(x_BxTxD, positions_BxT, deterministic)
    kernel = _unbox(self.kv_b_proj.variables["params"]["kernel"])  # [C, H, N + V]
    dtype = jnp.dtype(c.dtype)
    q_pad = jnp.pad(qn_BxTxHxN, [(0, 0)] * 3 + [(0, c.v_head_dim)])
    qlat_BxTxHxC = einsum("bthe,che->bthc", q_pad, kernel, dtype=dtype,
                          deterministic=deterministic)
    ckv_BxSxC = ckv_BxSxC.astype(dtype)
    logits_BxHxTxS = (jnp.einsum("bthc,bsc->bhts", qlat_BxTxHxC, ckv_BxSxC) +
                      jnp.einsum("bthr,bsr->bhts", qpe_BxTxHxR, kpe_BxSxR.astype(dtype)))
    mask = causal_mask(positions_BxT, k_positions_BxS, k_valid_BxS)
    probs_BxHxTxS = _masked_softmax(logits_BxHxTxS, mask, softmax_scale(c)).astype(dtype)
    olat_BxTxHxC = jnp.einsum("bhts,bsc->bthc", probs_BxHxTxS, ckv_BxSxC)
    out_BxTxHxE = einsum("bthc,che->bthe", olat_BxTxHxC, kernel, dtype=dtype,
                         deterministic=deterministic)
    return self._output(out_BxTxHxE[..., n:], deterministic)


def _masked_softmax(logits_BxHxTxS: jax.Array, mask_Bx1xTxS: jax.Array,
                    scale: float) -> jax.Array:
  logits = jnp.where(mask_Bx1xTxS, logits_BxHxTxS.astype(jnp.float32) * scale, NEG_INF)
  return jax.nn.softmax(logits, axis=-1)
