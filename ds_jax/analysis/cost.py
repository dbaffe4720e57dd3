"""FLOPs and memory per token for a `ModelConfig`, summed over `params.param_table`.

FLOPs count multiply-adds as 2 and cover every matmul a token goes through (attention
projections, dense MLPs, the k routed + shared experts, the router, the output head) plus the two
attention matmuls (scores Q·Kᵀ and probabilities·V) at context length `seq_len`. As in the PaLM
paper's 6N + 12·L·H·Q·T, attention is counted over the full context; `causal=True` halves it
(what a causal kernel that skips masked blocks actually does). Training = 3 × forward (backward
costs two forwards); MTP modules, when configured, add their own forward to training.

Memory figures are bytes. Activation memory is an *estimate* (the tensors a straightforward
autodiff keeps per token), not a measurement; weights, optimizer state and KV cache are exact.
"""

from __future__ import annotations

from typing import Any

from ds_jax.analysis.params import Tensor, param_table
from ds_jax.config import ModelConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "int4": 0.5}


def _matmul_flops(tensors: list[Tensor]) -> float:
  return sum(2 * t.active_size for t in tensors if t.kind == "matmul")


def attention_dims(mc: ModelConfig) -> tuple[int, int, int]:
  """(query heads, query/key dim per head, value dim per head) as the scores are computed."""
  if mc.attention_type == "mla":
    return (mc.num_attention_heads, mc.qk_nope_head_dim + mc.qk_rope_head_dim, mc.v_head_dim)
  return mc.num_attention_heads, mc.head_size, mc.head_size


def attention_flops(mc: ModelConfig, seq_len: int, layers: int, causal: bool = False) -> float:
  """Q·Kᵀ and P·V FLOPs per token for `layers` layers at context `seq_len`."""
  h, dqk, dv = attention_dims(mc)
  f = 2.0 * seq_len * h * (dqk + dv) * layers
  return f / 2 if causal else f


def flops_per_token(mc: ModelConfig, seq_len: int, causal: bool = False) -> dict[str, float]:
  """{"forward", "train", "matmul", "attention", "mtp_forward"} FLOPs per token.

  The training loop's MFU is `flops_per_token(mc, seq_len)["train"] * tokens/s / peak`.
  """
  table = param_table(mc)
  main = [t for t in table if t.group != "mtp"]
  matmul = _matmul_flops(main)
  attn = attention_flops(mc, seq_len, mc.num_hidden_layers, causal)
  mtp = 0.0
  if mc.num_nextn_predict_layers:
    # Each MTP module runs its block and eh_proj, then the shared output head.
    head = 2.0 * mc.hidden_size * mc.vocab_size
    mtp = (_matmul_flops([t for t in table if t.group == "mtp"])
           + attention_flops(mc, seq_len, mc.num_nextn_predict_layers, causal)
           + head * mc.num_nextn_predict_layers)
  forward = matmul + attn
  return dict(forward=forward, train=3.0 * (forward + mtp), matmul=matmul, attention=attn,
              mtp_forward=mtp)


def weight_bytes(mc: ModelConfig, fmt: str = "bfloat16", group_size: int = 128,
                 scale_bytes: int = 2, mtp: bool = False) -> float:
  """Bytes of the weights stored as `fmt` (float32 | bfloat16 | int8 | int4).

  For int8/int4 every matmul kernel (experts and output head included) is quantized with one
  `scale_bytes` scale per `group_size` consecutive input elements (`group_size=0`: one scale per
  output channel, i.e. a group spans the whole input axis); embedding table, norm scales and
  biases stay bfloat16. `int4` at group 128 with bf16 scales is 4.125 bits per kernel weight.
  """
  tensors = param_table(mc, mtp=mtp)
  if fmt in ("float32", "bfloat16", "float16"):
    return sum(t.size for t in tensors) * BYTES[fmt]
  if fmt not in ("int8", "int4"):
    raise ValueError(f"unknown weight format {fmt!r}")
  total = 0.0
  for t in tensors:
    if t.kind != "matmul":
      total += t.size * 2
      continue
    fan_in = t.shape[0]
    group = group_size if group_size and group_size < fan_in else fan_in
    n_scales = -(-fan_in // group) * (t.size // fan_in)
    total += t.size * BYTES[fmt] + n_scales * scale_bytes
  return total


def bits_per_weight(mc: ModelConfig, fmt: str, group_size: int = 128) -> float:
  """Average bits per parameter of `weight_bytes` (all parameters, not only kernels)."""
  n = sum(t.size for t in param_table(mc, mtp=False))
  return 8.0 * weight_bytes(mc, fmt, group_size) / n


def train_state_bytes(mc: ModelConfig) -> dict[str, float]:
  """AdamW training state with float32 parameters (as ds_jax keeps them): 16 bytes/param."""
  n = sum(t.size for t in param_table(mc))  # MTP included: it is trained
  return dict(params=4.0 * n, grads=4.0 * n, adam_mu_nu=8.0 * n, total=16.0 * n)


def kv_cache_per_token(mc: ModelConfig, dtype: str = "bfloat16") -> dict[str, float]:
  """Cached values per token over all layers, and bytes in `dtype`.

  GQA caches K and V: 2·G·head_dim per layer. MLA caches the compressed latent and the shared
  RoPE key: kv_lora_rank + qk_rope_head_dim per layer (576 for DeepSeek-V2/V3), against
  H·(qk_nope + qk_rope + v) per layer if the decompressed keys and values were cached instead.
  """
  n = mc.num_hidden_layers
  if mc.attention_type == "mla":
    values = (mc.kv_lora_rank + mc.qk_rope_head_dim) * n
    h, dqk, dv = attention_dims(mc)
    naive = h * (dqk + dv) * n
  else:
    values = naive = 2 * mc.num_key_value_heads * mc.head_size * n
  return dict(values=values, bytes=values * BYTES[dtype], decompressed_values=naive,
              decompressed_bytes=naive * BYTES[dtype])


def _layer_activations(mc: ModelConfig, moe: bool, seq_len: int) -> tuple[float, float]:
  """(elements in the compute dtype, elements in float32) one layer keeps per token for backward."""
  d = mc.hidden_size
  h, dqk, dv = attention_dims(mc)
  kv_heads = h if mc.attention_type == "mla" else mc.num_key_value_heads
  # Residual input, its norm; q, k, v before and after RoPE; attention output.
  act = 2 * d + 2 * h * dqk + 2 * kv_heads * dqk + kv_heads * dv + h * dv
  if mc.attention_type == "mla":
    act += 2 * (mc.kv_lora_rank + mc.qk_rope_head_dim) + 2 * mc.q_lora_rank
  f32 = h * seq_len  # softmax probabilities (kept in float32)
  act += 2 * d  # residual after attention and its norm
  if moe:
    k, fe = mc.num_experts_per_tok, mc.moe_intermediate_size
    f32 += mc.n_routed_experts  # router logits / scores
    act += 2 * k * d + 3 * k * fe  # dispatched inputs and outputs; gate, up, gate*up per expert
    act += 3 * mc.n_shared_experts * fe
  else:
    act += 3 * mc.intermediate_size
  return act, f32


def activation_bytes_per_token(mc: ModelConfig, seq_len: int) -> dict[str, float]:
  """Estimated activation memory per token, without remat and with full per-layer remat.

  With full remat only each layer's input is kept and one layer is recomputed at a time, so the
  peak is L·D plus one layer's working set. Logits (float32, vocab-sized) are listed apart
  since chunked cross-entropy avoids them.
  """
  b = BYTES[mc.dtype]
  per_layer = []
  for i in range(mc.num_hidden_layers):
    act, f32 = _layer_activations(mc, mc.is_moe_layer(i), seq_len)
    per_layer.append(act * b + f32 * 4)
  logits = 4.0 * mc.vocab_size
  no_remat = sum(per_layer) + mc.hidden_size * b
  full = mc.num_hidden_layers * mc.hidden_size * b + max(per_layer)
  return dict(no_remat=no_remat, full_remat=full, logits=logits)


def summary(mc: ModelConfig, seq_len: int, group_size: int = 128) -> dict[str, Any]:
  """Everything `ds-jax analyze` prints, as one dict."""
  from ds_jax.analysis.params import count_params
  return dict(
      params=count_params(mc),
      flops=flops_per_token(mc, seq_len),
      weights=dict(float32=weight_bytes(mc, "float32"), bfloat16=weight_bytes(mc, "bfloat16"),
                   int8=weight_bytes(mc, "int8", group_size=0),
                   int4=weight_bytes(mc, "int4", group_size)),
      train_state=train_state_bytes(mc),
      activations=activation_bytes_per_token(mc, seq_len),
      kv_cache=kv_cache_per_token(mc),
      group_size=group_size,
  )
