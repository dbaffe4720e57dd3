"""Hugging Face `config.json` <-> ds_jax model config, for llama / mixtral / deepseek_v2 / v3.

ds_jax model fields already carry the HF names, so most fields copy over; the exceptions are
spelled out here: HF `null` <-> ds_jax 0 (q_lora_rank, n_group, topk_group, head_dim), rope
settings (`rope_parameters` of transformers 5.x or `rope_scaling` + top-level `rope_theta` of
published checkpoints), Mixtral's `num_local_experts` / `router_aux_loss_coef`, and DeepSeek's
`seq_aux` switch (the balance loss is per sequence when set: ds_jax `seq_aux_loss_alpha`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from ds_jax.config import ConfigDict, ModelConfig, model_config, model_defaults

log = logging.getLogger("ds_jax")

SUPPORTED = ("llama", "mixtral", "deepseek_v2", "deepseek_v3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Values transformers assumes when a key is absent from config.json (per family).
_FAMILY_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=4096 * 32,
                    num_experts_per_tok=2, num_local_experts=8, router_aux_loss_coef=0.001),
    "deepseek_v2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                        routed_scaling_factor=1.0, first_k_dense_replace=0, moe_layer_freq=1),
    "deepseek_v3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, moe_layer_freq=1,
                        n_group=8, topk_group=4),
}


class ConvertError(ValueError):
  """A checkpoint ds_jax cannot convert; the message is one line naming the tensor or field."""


class UnsupportedModelError(ConvertError):
  """A model_type, architecture or config value ds_jax does not implement."""


class MissingTensorError(ConvertError):
  """A tensor the config requires is absent from the checkpoint."""


class ShapeMismatchError(ConvertError):
  """A tensor's shape disagrees with the one config.json implies."""


def _get(hf: dict, key: str, family: str, default: Any = None) -> Any:
  v = hf.get(key)
  if v is None:
    v = _FAMILY_DEFAULTS[family].get(key, default)
  return v


def _rope(hf: dict, family: str) -> tuple[float, dict]:
  """(rope_theta, ds_jax rope_scaling dict) from `rope_parameters` or `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  if any(isinstance(v, dict) for v in params.values()):
    raise UnsupportedModelError("config.json rope_parameters: per-layer-type rope is unsupported")
  rp = {**legacy, **params}
  theta = rp.get("rope_theta", hf.get("rope_theta")) or _get(hf, "rope_theta", family)
  kind = rp.get("rope_type", rp.get("type")) or "default"
  out = dict(model_defaults().rope_scaling.to_dict())
  if kind == "default":
    return float(theta), out
  if kind not in ("linear", "yarn"):
    raise UnsupportedModelError(f"config.json rope_scaling.type: {kind!r} is unsupported "
                                f"(ds_jax implements default, linear and yarn)")
  if rp.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedModelError("config.json partial_rotary_factor: only 1.0 is supported")
  out["type"] = kind
  max_pos = int(_get(hf, "max_position_embeddings", family))
  if kind == "linear":
    out["factor"] = float(rp["factor"])
    return float(theta), out
  orig = int(hf.get("original_max_position_embeddings") or
             rp.get("original_max_position_embeddings") or max_pos)
  factor = rp.get("factor")
  factor = float(factor) if factor is not None else max_pos / orig
  if rp.get("truncate", True) is False:
    raise UnsupportedModelError("config.json rope_scaling.truncate: only true is supported")
  out.update(factor=factor, original_max_position_embeddings=orig,
             beta_fast=float(rp.get("beta_fast") or 32.0),
             beta_slow=float(rp.get("beta_slow") or 1.0),
             mscale=float(rp["mscale"]) if rp.get("mscale") is not None else 1.0,
             mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0))
  if rp.get("attention_factor") is not None:
    from ds_jax.config import RopeScaling
    from ds_jax.nn.rope import yarn_attention_factor
    implied = yarn_attention_factor(RopeScaling(**out))
    if not math.isclose(float(rp["attention_factor"]), implied, rel_tol=1e-6):
      raise UnsupportedModelError(
          f"config.json rope_scaling.attention_factor: {rp['attention_factor']} differs from the "
          f"value implied by factor/mscale ({implied:.6g}); ds_jax derives it")
  return float(theta), out


def from_hf_config(hf: dict) -> ConfigDict:
  """The ds_jax `config.model` section (a locked copy of `model_defaults()`) for an HF config."""
  family = hf.get("model_type")
  if family not in SUPPORTED:
    raise UnsupportedModelError(f"config.json model_type: {family!r} is unsupported; ds_jax "
                                f"converts {', '.join(SUPPORTED)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"config.json hidden_act: {act!r} is unsupported (only silu)")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError("config.json mlp_bias: true is unsupported")
  m = model_defaults()
  m.model_type = family
  for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
    if hf.get(k) is None:
      raise ConvertError(f"config.json {k}: missing")
    m[k] = int(hf[k])
  m.intermediate_size = int(hf.get("intermediate_size") or 0)
  m.num_key_value_heads = int(hf.get("num_key_value_heads") or m.num_attention_heads)
  m.max_position_embeddings = int(_get(hf, "max_position_embeddings", family))
  m.rms_norm_eps = float(_get(hf, "rms_norm_eps", family))
  m.tie_word_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.attention_bias = bool(hf.get("attention_bias", False))
  m.initializer_range = float(hf.get("initializer_range") or 0.02)
  theta, rs = _rope(hf, family)
  m.rope_theta = theta
  m.rope_scaling = ConfigDict(rs)
  if family in ("llama", "mixtral"):
    if m.attention_bias:
      raise UnsupportedModelError(f"config.json attention_bias: true is unsupported for "
                                  f"{family} (ds_jax GQA has no o_proj bias)")
    m.head_dim = int(hf.get("head_dim") or 0)
    if m.head_dim * m.num_attention_heads == m.hidden_size:
      m.head_dim = 0  # canonical: 0 means hidden_size // num_attention_heads
    if hf.get("sliding_window"):
      log.warning("config.json sliding_window=%s ignored: ds_jax attends to the full context "
                  "(identical for sequences up to the window)", hf["sliding_window"])
  if family == "mixtral":
    m.n_routed_experts = int(_get(hf, "num_local_experts", family))
    m.num_experts_per_tok = int(_get(hf, "num_experts_per_tok", family))
    m.moe_intermediate_size = m.intermediate_size
    m.topk_method, m.scoring_func, m.norm_topk_prob = "mixtral", "softmax", True
    m.aux_loss_alpha = float(_get(hf, "router_aux_loss_coef", family))
  if family.startswith("deepseek"):
    _deepseek(hf, family, m)
  m.lock()
  model_config(m)  # validate now: a bad HF config fails here, naming the ds_jax field
  return m


def _deepseek(hf: dict, family: str, m: ConfigDict) -> None:
  m.attention_type = "mla"
  m.num_key_value_heads = m.num_attention_heads  # MLA has one latent, not KV heads
  m.head_dim = 0
  m.q_lora_rank = int(hf.get("q_lora_rank") or 0)
  for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
    if hf.get(k) is None:
      raise ConvertError(f"config.json {k}: missing")
    m[k] = int(hf[k])
  m.n_routed_experts = int(hf.get("n_routed_experts") or 0)
  m.n_shared_experts = int(hf.get("n_shared_experts") or 0)
  m.num_experts_per_tok = int(hf.get("num_experts_per_tok") or 0)
  m.moe_intermediate_size = int(hf.get("moe_intermediate_size") or 0)
  m.first_k_dense_replace = int(_get(hf, "first_k_dense_replace", family))
  m.moe_layer_freq = int(_get(hf, "moe_layer_freq", family))
  m.routed_scaling_factor = float(_get(hf, "routed_scaling_factor", family))
  m.norm_topk_prob = bool(_get(hf, "norm_topk_prob", family))
  m.scoring_func = str(_get(hf, "scoring_func", family))
  m.topk_method = str(_get(hf, "topk_method", family))
  m.n_group = int(_get(hf, "n_group", family, 1))
  m.topk_group = int(_get(hf, "topk_group", family, 1))
  alpha = float(hf.get("aux_loss_alpha") or 0.0)
  if hf.get("seq_aux"):
    m.seq_aux_loss_alpha = alpha
  else:
    m.aux_loss_alpha = alpha
  m.num_nextn_predict_layers = int(hf.get("num_nextn_predict_layers") or 0)


def rope_interleaved(hf: dict) -> bool:
  """Whether the checkpoint stores MLA rope columns interleaved (pairs 2i, 2i+1).

  DeepSeek-V2 checkpoints always do; V3 unless transformers' `rope_interleave` is false."""
  t = hf.get("model_type")
  if t == "deepseek_v2":
    return True
  if t == "deepseek_v3":
    return hf.get("rope_interleave", True) is not False
  return False


def _rope_to_hf(mc: ModelConfig) -> Optional[dict]:
  s = mc.rope_scaling
  if s.type == "none":
    return None
  if s.type == "linear":
    return {"type": "linear", "rope_type": "linear", "factor": s.factor}
  out = {"type": "yarn", "rope_type": "yarn", "factor": s.factor,
         "original_max_position_embeddings": s.original_max_position_embeddings,
         "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "mscale": s.mscale}
  if s.mscale_all_dim:
    out["mscale_all_dim"] = s.mscale_all_dim
  return out


def to_hf_config(mc: ModelConfig, dtype: str = "float32") -> dict:
  """config.json for a ds_jax model (the published-checkpoint layout: `rope_scaling` and a
  top-level `rope_theta`, which transformers 4.x and 5.x both read)."""
  t = mc.model_type
  if t not in SUPPORTED:
    raise UnsupportedModelError(f"config.model.model_type: {t!r} cannot be exported; choose one "
                                f"of {', '.join(SUPPORTED)}")
  hf: dict[str, Any] = dict(
      architectures=[ARCHITECTURES[t]], model_type=t, vocab_size=mc.vocab_size,
      hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
      num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
      num_key_value_heads=mc.num_key_value_heads,
      max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.rms_norm_eps,
      rope_theta=mc.rope_theta, rope_scaling=_rope_to_hf(mc),
      tie_word_embeddings=mc.tie_word_embeddings, attention_bias=mc.attention_bias,
      initializer_range=mc.initializer_range, hidden_act="silu", torch_dtype=dtype,
      use_cache=True)
  gqa = mc.attention_type == "gqa"
  if t == "llama":
    _require(gqa and not mc.is_moe, "llama exports need a dense GQA model")
    hf.update(head_dim=mc.head_size, mlp_bias=False, pretraining_tp=1)
  elif t == "mixtral":
    _require(gqa and mc.is_moe and mc.topk_method == "mixtral" and not mc.n_shared_experts
             and mc.num_dense_layers == 0, "mixtral exports need GQA and only routed MoE layers "
             "with topk_method='mixtral'")
    hf.update(head_dim=mc.head_size, num_local_experts=mc.n_routed_experts,
              num_experts_per_tok=mc.num_experts_per_tok,
              intermediate_size=mc.moe_intermediate_size,
              router_aux_loss_coef=mc.aux_loss_alpha, sliding_window=None)
  else:
    _require(mc.attention_type == "mla", f"{t} exports need attention_type='mla'")
    seq = mc.seq_aux_loss_alpha > 0
    hf.update(
        num_key_value_heads=mc.num_attention_heads, head_dim=mc.qk_rope_head_dim,
        q_lora_rank=mc.q_lora_rank or None, kv_lora_rank=mc.kv_lora_rank,
        qk_nope_head_dim=mc.qk_nope_head_dim, qk_rope_head_dim=mc.qk_rope_head_dim,
        v_head_dim=mc.v_head_dim, n_routed_experts=mc.n_routed_experts or None,
        n_shared_experts=mc.n_shared_experts or None,
        num_experts_per_tok=mc.num_experts_per_tok or None,
        moe_intermediate_size=mc.moe_intermediate_size,
        first_k_dense_replace=mc.first_k_dense_replace, moe_layer_freq=mc.moe_layer_freq,
        routed_scaling_factor=mc.routed_scaling_factor, norm_topk_prob=mc.norm_topk_prob,
        scoring_func=mc.scoring_func, topk_method=mc.topk_method, n_group=mc.n_group,
        topk_group=mc.topk_group, seq_aux=seq,
        aux_loss_alpha=mc.seq_aux_loss_alpha if seq else mc.aux_loss_alpha, mlp_bias=False)
    if t == "deepseek_v3":
      hf.update(rope_interleave=True, num_nextn_predict_layers=mc.num_nextn_predict_layers)
  return hf


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise UnsupportedModelError("config.model: " + message)
