"""Parameter accounting: every array ds_jax builds for a `ModelConfig`, enumerated analytically.

`param_table(mc)` lists one `Tensor` per parameter kind (stacked over layers and experts by
`copies`), with the fraction of it one token uses (`active`: k / n_routed_experts for routed
experts, 1 otherwise). Everything else here (counts, FLOPs, memory) is a sum over that table, so
the table is the single thing checked against the real arrays (`jax.eval_shape` of
`ds_jax.models.lm.init`) in the tests.

Conventions (stated because published figures differ on them):
- `total` excludes DeepSeek-V3's multi-token-prediction (MTP) modules, as the published 671B does;
  `mtp` counts them (without the embedding and output head they share with the main model) and
  `total_with_mtp` is what the parameter tree holds.
- `active` counts the parameters one token multiplies with in the forward pass: routed experts at
  k / n_routed_experts, the output head included, the embedding table excluded (a token reads one
  row of it). `active_with_embedding` adds the table back. Published "activated" figures are
  rounded and do not state their convention; see docs/analysis.md for how each compares.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ds_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter kind: `shape` of a single copy, matmul input axis first."""
  name: str
  shape: tuple[int, ...]
  copies: int = 1
  group: str = "other"  # embedding | attention | mlp | routed | shared | router | norm | head | mtp
  kind: str = "matmul"  # matmul | embed | vector (norm scales, biases)
  active: float = 1.0

  @property
  def size(self) -> int:
    return math.prod(self.shape) * self.copies

  @property
  def active_size(self) -> float:
    return self.size * self.active


def attention_tensors(mc: ModelConfig, prefix: str, copies: int) -> list[Tensor]:
  """q/k/v/o (GQA) or the MLA projections, for `copies` layers."""
  d, h = mc.hidden_size, mc.num_attention_heads
  t = lambda n, s, kind="matmul": Tensor(f"{prefix}.{n}", s, copies, "attention", kind)
  if mc.attention_type == "mla":
    qk = mc.qk_nope_head_dim + mc.qk_rope_head_dim
    out = []
    if mc.q_lora_rank:
      out += [t("q_a_proj", (d, mc.q_lora_rank)), t("q_a_layernorm", (mc.q_lora_rank,), "vector"),
              t("q_b_proj", (mc.q_lora_rank, h * qk))]
    else:
      out.append(t("q_proj", (d, h * qk)))
    out += [t("kv_a_proj_with_mqa", (d, mc.kv_lora_rank + mc.qk_rope_head_dim)),
            t("kv_a_layernorm", (mc.kv_lora_rank,), "vector"),
            t("kv_b_proj", (mc.kv_lora_rank, h * (mc.qk_nope_head_dim + mc.v_head_dim))),
            t("o_proj", (h * mc.v_head_dim, d))]
    if mc.attention_bias:  # as HF DeepSeek: on the down-projections and o_proj
      out += [t("kv_a_proj_with_mqa.bias", (mc.kv_lora_rank + mc.qk_rope_head_dim,), "vector"),
              t("o_proj.bias", (d,), "vector")]
      if mc.q_lora_rank:
        out.append(t("q_a_proj.bias", (mc.q_lora_rank,), "vector"))
    return out
  g, k = mc.num_key_value_heads, mc.head_size
  out = [t("q_proj", (d, h * k)), t("k_proj", (d, g * k)), t("v_proj", (d, g * k)),
         t("o_proj", (h * k, d))]
  if mc.attention_bias:
    out += [t("q_proj.bias", (h * k,), "vector"), t("k_proj.bias", (g * k,), "vector"),
            t("v_proj.bias", (g * k,), "vector")]
  return out


def mlp_tensors(d: int, f: int, prefix: str, copies: int, group: str,
                active: float = 1.0) -> list[Tensor]:
  """SwiGLU gate/up/down."""
  return [Tensor(f"{prefix}.gate_proj", (d, f), copies, group, "matmul", active),
          Tensor(f"{prefix}.up_proj", (d, f), copies, group, "matmul", active),
          Tensor(f"{prefix}.down_proj", (f, d), copies, group, "matmul", active)]


def moe_tensors(mc: ModelConfig, prefix: str, copies: int) -> list[Tensor]:
  """Router, routed experts (active k/E) and shared experts of `copies` MoE layers."""
  d, e = mc.hidden_size, mc.n_routed_experts
  out = [Tensor(f"{prefix}.gate.kernel", (d, e), copies, "router")]
  if mc.topk_method == "noaux_tc":
    out.append(Tensor(f"{prefix}.gate.e_score_correction_bias", (e,), copies, "router", "vector"))
  out += mlp_tensors(d, mc.moe_intermediate_size, f"{prefix}.experts", copies * e, "routed",
                     mc.num_experts_per_tok / e)
  if mc.n_shared_experts:
    out += mlp_tensors(d, mc.n_shared_experts * mc.moe_intermediate_size,
                       f"{prefix}.shared_experts", copies, "shared")
  return out


def block_tensors(mc: ModelConfig, moe: bool, prefix: str, copies: int) -> list[Tensor]:
  """One pre-norm decoder block (attention + dense MLP or MoE), stacked `copies` times."""
  d = mc.hidden_size
  out = [Tensor(f"{prefix}.input_layernorm", (d,), copies, "norm", "vector"),
         Tensor(f"{prefix}.post_attention_layernorm", (d,), copies, "norm", "vector")]
  out += attention_tensors(mc, f"{prefix}.self_attn", copies)
  if moe:
    out += moe_tensors(mc, f"{prefix}.mlp", copies)
  else:
    out += mlp_tensors(d, mc.intermediate_size, f"{prefix}.mlp", copies, "mlp")
  return out


def mtp_tensors(mc: ModelConfig) -> list[Tensor]:
  """DeepSeek-V3 MTP modules: enorm, hnorm, eh_proj [2D, D], one block, a final norm each.

  The block is an MoE block when the main model's last layer is one (layer index
  num_hidden_layers follows the HF layer rule). Embedding and head are shared, so not counted.
  """
  n, d = mc.num_nextn_predict_layers, mc.hidden_size
  if not n:
    return []
  out = [Tensor("mtp.enorm", (d,), n, "mtp", "vector"),
         Tensor("mtp.hnorm", (d,), n, "mtp", "vector"),
         Tensor("mtp.eh_proj", (2 * d, d), n, "mtp"),
         Tensor("mtp.norm", (d,), n, "mtp", "vector")]
  block = block_tensors(mc, mc.is_moe_layer(mc.num_hidden_layers), "mtp.block", n)
  return out + [dataclasses.replace(t, group="mtp") for t in block]


def param_table(mc: ModelConfig, mtp: bool = True) -> list[Tensor]:
  """Every parameter of the model (MTP modules last, included when `mtp`)."""
  d, v, n = mc.hidden_size, mc.vocab_size, mc.num_hidden_layers
  out = [Tensor("embed_tokens", (v, d), 1, "embedding", "embed")]
  n_moe = sum(mc.is_moe_layer(i) for i in range(n))
  if n - n_moe:
    out += block_tensors(mc, False, "dense_layers", n - n_moe)
  if n_moe:
    out += block_tensors(mc, True, "moe_layers", n_moe)
  out.append(Tensor("norm", (d,), 1, "norm", "vector"))
  if not mc.tie_word_embeddings:
    out.append(Tensor("lm_head", (d, v), 1, "head"))
  return out + (mtp_tensors(mc) if mtp else [])


def count_params(mc: ModelConfig) -> dict[str, Any]:
  """Total and active parameter counts, and a breakdown by group (see module docstring)."""
  table = param_table(mc)
  main = [t for t in table if t.group != "mtp"]
  by_group: dict[str, int] = {}
  for t in main:
    by_group[t.group] = by_group.get(t.group, 0) + t.size
  total = sum(t.size for t in main)
  mtp = sum(t.size for t in table if t.group == "mtp")
  embedding = by_group.get("embedding", 0)
  return dict(
      total=total,
      active=int(round(sum(t.active_size for t in main if t.kind != "embed"))),
      active_with_embedding=int(round(sum(t.active_size for t in main))),
      embedding=embedding,
      non_embedding=total - embedding,
      head=by_group.get("head", 0),
      attention=by_group.get("attention", 0),
      dense_mlp=by_group.get("mlp", 0),
      routed_experts=by_group.get("routed", 0),
      shared_experts=by_group.get("shared", 0),
      router=by_group.get("router", 0),
      norms=by_group.get("norm", 0),
      mtp=mtp,
      total_with_mtp=total + mtp,
  )


def tree_size(params: Any) -> int:
  """Number of elements in a parameter pytree (arrays or ShapeDtypeStructs)."""
  import jax
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def abstract_params(mc: ModelConfig) -> Any:
  """The model's parameter tree as ShapeDtypeStructs, without allocating (jax.eval_shape)."""
  import jax
  from ds_jax.models import lm
  if mc.num_nextn_predict_layers:
    # Import outside the trace: its imports compute module-level constants with jnp.
    import ds_jax.nn.mtp  # noqa: F401
  return jax.eval_shape(lambda k: lm.init(mc, k), jax.random.key(0))
