"""Experiment configs: load `experiments/<name>.py:arg`, apply CLI overrides, validate, freeze.

An experiment file defines `get_config(arg=None) -> ml_collections.ConfigDict`, usually by editing
`base_config()`. The ConfigDict stops at the program's edge: models receive the frozen
`ModelConfig` dataclass built by `model_config()`. Model fields use the Hugging Face names.

Every check here runs before anything compiles; a failed check raises `ConfigError`, which the CLI
prints as one line naming the field (exit code 2).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A bad config value. `field` is the dotted path, e.g. `model.hidden_size`."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config.{field}: {message}")
    self.field = field


# ----------------------------------------------------------------------------------------------
# Defaults.

DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc", "mixtral")
SCORING_FUNCS = ("softmax", "sigmoid")
MOE_DISPATCH = ("dropless", "capacity")
MOE_MATMUL = ("auto", "block_loop", "padded_einsum", "ragged_dot", "dense_mask")
ATTENTION_TYPES = ("gqa", "mla")
SCHEDULES = ("cosine", "wsd", "constant", "linear")
ROPE_TYPES = ("none", "yarn", "linear")


def model_defaults() -> ConfigDict:
  """A tiny dense Llama-style decoder; every MoE / MLA field present (off) so overrides work."""
  m = ConfigDict()
  m.model_type = "llama"
  m.vocab_size = 512
  m.hidden_size = 128
  m.intermediate_size = 384
  m.num_hidden_layers = 4
  m.num_attention_heads = 4
  m.num_key_value_heads = 2
  m.head_dim = 0  # 0: hidden_size // num_attention_heads
  m.max_position_embeddings = 2048
  m.rope_theta = 10000.0
  m.rms_norm_eps = 1e-6
  m.tie_word_embeddings = False
  m.attention_bias = False
  m.initializer_range = 0.02
  m.rope_scaling = ConfigDict(dict(
      type="none", factor=1.0, original_max_position_embeddings=0, beta_fast=32.0,
      beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0))
  # Attention: "gqa" (Llama/Mixtral) or "mla" (DeepSeek-V2/V3 multi-head latent attention).
  m.attention_type = "gqa"
  m.q_lora_rank = 0  # 0: no query compression (HF: null)
  m.kv_lora_rank = 0
  m.qk_nope_head_dim = 0
  m.qk_rope_head_dim = 0
  m.v_head_dim = 0
  # Mixture of experts (n_routed_experts == 0: dense model).
  m.n_routed_experts = 0
  m.n_shared_experts = 0
  m.num_experts_per_tok = 0
  m.moe_intermediate_size = 0
  m.first_k_dense_replace = 0
  m.moe_layer_freq = 1
  m.routed_scaling_factor = 1.0
  m.norm_topk_prob = False
  m.scoring_func = "softmax"
  m.topk_method = "greedy"
  m.n_group = 1
  m.topk_group = 1
  m.max_devices_per_token = 0  # DeepSeek-V2 device-limited routing M; 0: off
  # Balance: V2 expert/device/communication losses, V3 sequence-wise loss, router z-loss.
  m.aux_loss_alpha = 0.0
  m.device_aux_loss_alpha = 0.0
  m.comm_aux_loss_alpha = 0.0
  m.seq_aux_loss_alpha = 0.0
  m.router_z_loss_coef = 0.0
  m.bias_update_speed = 0.0  # V3 aux-loss-free gamma; 0: no update
  m.bias_update_stop_step = -1  # step after which gamma = 0; -1: never stops
  # Dispatch.
  m.moe_dispatch = "dropless"
  m.capacity_factor = 1.25
  m.eval_capacity_factor = 2.0
  m.moe_matmul = "auto"
  m.moe_block_size = 64
  # DeepSeek-V3 multi-token prediction.
  m.num_nextn_predict_layers = 0
  m.mtp_loss_weight = 0.3
  # Numerics and compilation.
  m.dtype = "float32"  # compute dtype; parameters are always float32
  m.scan_layers = True
  m.remat = "none"
  return m


def base_config() -> ConfigDict:
  """Every section with defaults; experiments edit a copy of this."""
  c = ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.steps = 200
  c.batch_size = 8
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 4
  c.peak_flops = 0.0  # per-device peak for MFU; 0: measure an f32 matmul at start-up
  c.model = model_defaults()
  c.optimizer = ConfigDict(dict(
      name="adamw", learning_rate=3e-3, warmup_steps=20, schedule="cosine", decay_steps=0,
      min_lr_ratio=0.1, wsd_decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip=1.0, accumulation_steps=1, z_loss=0.0, skip_nonfinite=True))
  c.data = ConfigDict(dict(
      source="pydoc", path="", text_key="text", tokenizer="byte", tokenizer_path="",
      validation_fraction=0.1, include="", exclude="", tfds_split="train",
      tfds_validation_split="test"))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  # directory: "" keeps checkpoints in <workdir>/checkpoints; or e.g. "gs://bucket/run" (orbax).
  c.checkpoint = ConfigDict(dict(every_steps=100, keep=3, async_save=False, directory=""))
  # Optional parts, off by default: QAT fake-quant (docs/quant.md), LoRA adapters (docs/lora.md).
  from ds_jax.lora.config import default_lora_config
  from ds_jax.quant.config import default_quant_config
  c.quant = default_quant_config()
  c.lora = default_lora_config()
  return c


# ----------------------------------------------------------------------------------------------
# Loading and overrides.


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """`spec` is `path/to/exp.py` or `path/to/exp.py:arg`; overrides are `model.hidden_size=64`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError("file", f"no experiment file at {path!r}")
  name = "ds_jax_experiment_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError("file", f"{path} defines no get_config(arg=None)")
  try:
    cfg = module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise ConfigError("file", f"{path}:{arg} rejected its argument: {e}") from None
  cfg.lock()
  for ov in overrides:
    apply_override(cfg, ov)
  return cfg


def _parse_value(text: str, old: Any, field: str) -> Any:
  if isinstance(old, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(field, f"expected a bool (true/false), got {text!r}")
  if isinstance(old, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(field, f"expected an int, got {text!r}") from None
  if isinstance(old, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(field, f"expected a float, got {text!r}") from None
  if isinstance(old, str):
    return text
  if isinstance(old, (tuple, list)) or old is None:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      if old is None:
        return text
      raise ConfigError(field, f"expected a Python literal list/tuple, got {text!r}") from None
    if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
      raise ConfigError(field, f"expected a list/tuple, got {text!r}")
    return type(old)(value) if isinstance(old, (tuple, list)) else value
  raise ConfigError(field, f"cannot override a field of type {type(old).__name__}")


def apply_override(cfg: ConfigDict, override: str) -> None:
  """Apply `a.b.c=value` to a locked config; unknown keys and wrong types raise ConfigError."""
  key, sep, text = override.partition("=")
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config."):]
  if not sep or not key:
    raise ConfigError(key or "?", f"override must look like field=value, got {override!r}")
  parts = key.split(".")
  node = cfg
  for i, p in enumerate(parts[:-1]):
    if not isinstance(node, ConfigDict) or p not in node:
      raise ConfigError(".".join(parts[:i + 1]), _unknown(node, p))
    node = node[p]
  leaf = parts[-1]
  if not isinstance(node, ConfigDict) or leaf not in node:
    raise ConfigError(key, _unknown(node, leaf))
  old = node[leaf]
  if isinstance(old, ConfigDict):
    raise ConfigError(key, "is a section; override one of its fields: " + ", ".join(sorted(old)))
  with node.unlocked():
    node[leaf] = _parse_value(text, old, key)


def _unknown(node: Any, name: str) -> str:
  if isinstance(node, ConfigDict):
    import difflib
    close = difflib.get_close_matches(name, list(node.keys()), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown key {name!r}{hint}"
  return f"unknown key {name!r}"


# ----------------------------------------------------------------------------------------------
# Frozen model config.


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  type: str = "none"
  factor: float = 1.0
  original_max_position_embeddings: int = 0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Frozen model hyper-parameters (Hugging Face names). See `model_defaults()` for meanings."""
  model_type: str = "llama"
  vocab_size: int = 512
  hidden_size: int = 128
  intermediate_size: int = 384
  num_hidden_layers: int = 4
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int = 0
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  initializer_range: float = 0.02
  rope_scaling: RopeScaling = RopeScaling()
  attention_type: str = "gqa"
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  routed_scaling_factor: float = 1.0
  norm_topk_prob: bool = False
  scoring_func: str = "softmax"
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  max_devices_per_token: int = 0
  aux_loss_alpha: float = 0.0
  device_aux_loss_alpha: float = 0.0
  comm_aux_loss_alpha: float = 0.0
  seq_aux_loss_alpha: float = 0.0
  router_z_loss_coef: float = 0.0
  bias_update_speed: float = 0.0
  bias_update_stop_step: int = -1
  moe_dispatch: str = "dropless"
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  moe_matmul: str = "auto"
  moe_block_size: int = 64
  num_nextn_predict_layers: int = 0
  mtp_loss_weight: float = 0.3
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"

  # Derived quantities used across the code base.
  @property
  def is_moe(self) -> bool:
    return self.n_routed_experts > 0

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  def is_moe_layer(self, i: int) -> bool:
    """HF DeepSeek rule: MoE at layer i if i >= first_k_dense_replace and i % freq == 0."""
    return (self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0)

  @property
  def num_dense_layers(self) -> int:
    return sum(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    d = dict(d)
    rs = d.pop("rope_scaling", None) or {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError("model." + unknown[0], "unknown model field")
    return cls(rope_scaling=RopeScaling(**dict(rs)), **d)


def model_config(cfg: ConfigDict | dict) -> ModelConfig:
  """Freeze `config.model` (a ConfigDict or dict) into a validated ModelConfig."""
  d = cfg.to_dict() if isinstance(cfg, ConfigDict) else dict(cfg)
  mc = ModelConfig.from_dict(d)
  validate_model(mc)
  return mc


def to_json_dict(cfg: ConfigDict) -> dict:
  return cfg.to_dict()


def from_json_dict(d: dict) -> ConfigDict:
  cfg = ConfigDict(d)
  cfg.lock()
  return cfg


def optional(v: int) -> Optional[int]:
  """HF uses null where ds_jax uses 0 (e.g. q_lora_rank)."""
  return v or None


# Validation lives in its own module; re-exported here so `ds_jax.config` is the one entry point.
from ds_jax.validation import mesh_shape, validate, validate_model  # noqa: E402,F401
