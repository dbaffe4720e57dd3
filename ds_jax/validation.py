"""Config validation: every check runs before anything compiles and names the offending field.

`validate(cfg, n_devices)` checks a whole experiment config for a run on `n_devices` and returns
the frozen ModelConfig; `validate_model` checks the model alone. Failures raise `ConfigError`.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

from ds_jax.config import (ATTENTION_TYPES, DTYPES, MOE_DISPATCH, MOE_MATMUL, REMAT_POLICIES,
                           ROPE_TYPES, SCHEDULES, SCORING_FUNCS, TOPK_METHODS, ConfigDict,
                           ConfigError, ModelConfig, model_config)


def _choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ConfigError(field, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(field: str, value: float, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(field, f"must be {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def validate_model(m: ModelConfig) -> None:
  """Consistency checks of a ModelConfig; raises ConfigError naming the field."""
  for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings"):
    _positive("model." + f, getattr(m, f))
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.remat", m.remat, REMAT_POLICIES)
  _choice("model.attention_type", m.attention_type, ATTENTION_TYPES)
  _choice("model.rope_scaling.type", m.rope_scaling.type, ROPE_TYPES)
  _positive("model.rope_theta", m.rope_theta)
  _positive("model.rms_norm_eps", m.rms_norm_eps)
  if m.attention_type == "gqa":
    if not m.head_dim and m.hidden_size % m.num_attention_heads:
      raise ConfigError("model.hidden_size", f"must be divisible by num_attention_heads "
                        f"({m.num_attention_heads}); got {m.hidden_size}")
    if m.num_attention_heads % m.num_key_value_heads:
      raise ConfigError("model.num_key_value_heads", f"must divide num_attention_heads "
                        f"({m.num_attention_heads}); got {m.num_key_value_heads}")
    if m.head_size % 2:
      raise ConfigError("model.head_dim", f"must be even for RoPE; got {m.head_size}")
  else:
    for f in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
      _positive("model." + f, getattr(m, f))
    _positive("model.qk_nope_head_dim", m.qk_nope_head_dim, allow_zero=True)
    _positive("model.q_lora_rank", m.q_lora_rank, allow_zero=True)
    if m.qk_rope_head_dim % 2:
      raise ConfigError("model.qk_rope_head_dim", f"must be even; got {m.qk_rope_head_dim}")
  if m.rope_scaling.type != "none":
    _positive("model.rope_scaling.factor", m.rope_scaling.factor)
    if m.rope_scaling.type == "yarn":
      _positive("model.rope_scaling.original_max_position_embeddings",
                m.rope_scaling.original_max_position_embeddings)
  if m.intermediate_size <= 0 and m.num_dense_layers > 0:
    raise ConfigError("model.intermediate_size", "must be > 0 when the model has dense layers")
  if m.is_moe:
    _choice("model.topk_method", m.topk_method, TOPK_METHODS)
    _choice("model.scoring_func", m.scoring_func, SCORING_FUNCS)
    _choice("model.moe_dispatch", m.moe_dispatch, MOE_DISPATCH)
    _choice("model.moe_matmul", m.moe_matmul, MOE_MATMUL)
    _positive("model.moe_intermediate_size", m.moe_intermediate_size)
    _positive("model.moe_layer_freq", m.moe_layer_freq)
    if not 1 <= m.num_experts_per_tok <= m.n_routed_experts:
      raise ConfigError("model.num_experts_per_tok", f"must be in [1, n_routed_experts="
                        f"{m.n_routed_experts}]; got {m.num_experts_per_tok}")
    if m.n_group < 1 or m.n_routed_experts % m.n_group:
      raise ConfigError("model.n_group", f"must divide n_routed_experts ({m.n_routed_experts});"
                        f" got {m.n_group}")
    if not 1 <= m.topk_group <= m.n_group:
      raise ConfigError("model.topk_group", f"must be in [1, n_group={m.n_group}]; "
                        f"got {m.topk_group}")
    if m.topk_method == "noaux_tc":
      if m.scoring_func != "sigmoid":
        raise ConfigError("model.scoring_func", "noaux_tc routing needs scoring_func='sigmoid'")
      if m.n_routed_experts // m.n_group < 2:
        raise ConfigError("model.n_group", "noaux_tc scores groups by their top-2 experts, so "
                          "each group needs >= 2 experts")
    if m.topk_method in ("group_limited_greedy", "noaux_tc"):
      per_group = m.n_routed_experts // m.n_group
      if m.topk_group * per_group < m.num_experts_per_tok:
        raise ConfigError("model.topk_group", f"topk_group * experts per group ({per_group}) "
                          f"must be >= num_experts_per_tok ({m.num_experts_per_tok})")
    if m.moe_dispatch == "capacity":
      _positive("model.capacity_factor", m.capacity_factor)
      _positive("model.eval_capacity_factor", m.eval_capacity_factor)
    _positive("model.moe_block_size", m.moe_block_size)
    for f in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha",
              "seq_aux_loss_alpha", "router_z_loss_coef", "bias_update_speed"):
      _positive("model." + f, getattr(m, f), allow_zero=True)
  if m.num_nextn_predict_layers < 0:
    raise ConfigError("model.num_nextn_predict_layers", "must be >= 0")


# ----------------------------------------------------------------------------------------------
# Whole-config validation.


def mesh_shape(cfg: ConfigDict, n_devices: int) -> dict[str, int]:
  """Resolve the mesh sizes (one -1 entry takes the remaining devices) and check the product."""
  names = ("data", "fsdp", "expert", "tensor")
  sizes = {n: int(cfg.mesh[n]) for n in names}
  free = [n for n in names if sizes[n] == -1]
  for n in names:
    if sizes[n] == 0 or sizes[n] < -1:
      raise ConfigError(f"mesh.{n}", f"must be a positive size or -1; got {sizes[n]}")
  if len(free) > 1:
    raise ConfigError(f"mesh.{free[1]}", "at most one mesh axis may be -1")
  fixed = 1
  for n in names:
    if sizes[n] != -1:
      fixed *= sizes[n]
  if free:
    if n_devices % fixed:
      raise ConfigError(f"mesh.{free[0]}", f"the other axes multiply to {fixed}, which does not "
                        f"divide the {n_devices} devices")
    sizes[free[0]] = n_devices // fixed
  total = 1
  for n in names:
    total *= sizes[n]
  if total != n_devices:
    raise ConfigError("mesh", f"data*fsdp*expert*tensor = {total} must equal the device count "
                      f"{n_devices} ({sizes})")
  return sizes


def validate(cfg: ConfigDict, n_devices: int) -> ModelConfig:
  """Check the whole config for a run on `n_devices`; returns the frozen ModelConfig."""
  m = model_config(cfg.model)
  for f in ("steps", "batch_size", "seq_len", "log_every"):
    _positive(f, cfg[f])
  o = cfg.optimizer
  _positive("optimizer.learning_rate", o.learning_rate)
  _positive("optimizer.warmup_steps", o.warmup_steps, allow_zero=True)
  _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
  _positive("optimizer.grad_clip", o.grad_clip, allow_zero=True)
  _positive("optimizer.accumulation_steps", o.accumulation_steps)
  _choice("optimizer.schedule", o.schedule, SCHEDULES)
  _choice("optimizer.name", o.name, ("adamw", "adam", "sgd", "lion"))
  if not 0 <= o.min_lr_ratio <= 1:
    raise ConfigError("optimizer.min_lr_ratio", f"must be in [0, 1]; got {o.min_lr_ratio}")
  if cfg.batch_size % o.accumulation_steps:
    raise ConfigError("optimizer.accumulation_steps", f"must divide batch_size "
                      f"({cfg.batch_size}); got {o.accumulation_steps}")
  sizes = mesh_shape(cfg, n_devices)
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  micro = cfg.batch_size // o.accumulation_steps
  if micro % shards:
    raise ConfigError("batch_size", f"each micro-batch ({micro}) must be divisible by "
                      f"data*fsdp*expert = {shards}")
  if m.is_moe and m.n_routed_experts % sizes["expert"]:
    raise ConfigError("model.n_routed_experts", f"must be divisible by mesh.expert "
                      f"({sizes['expert']}); got {m.n_routed_experts}")
  if m.max_devices_per_token and not 1 <= m.max_devices_per_token <= sizes["expert"]:
    raise ConfigError("model.max_devices_per_token", f"must be in [1, mesh.expert="
                      f"{sizes['expert']}]; got {m.max_devices_per_token}")
  heads = m.num_attention_heads
  if heads % sizes["tensor"]:
    raise ConfigError("mesh.tensor", f"must divide num_attention_heads ({heads}); "
                      f"got {sizes['tensor']}")
  if cfg.seq_len > m.max_position_embeddings and m.rope_scaling.type == "none":
    raise ConfigError("seq_len", f"{cfg.seq_len} exceeds model.max_position_embeddings "
                      f"({m.max_position_embeddings}) and no rope_scaling is set")
  if cfg.get("task", "lm") == "lm":
    _choice("data.tokenizer", cfg.data.tokenizer, ("byte", "hf"))
    _choice("data.source", cfg.data.source.split(":")[0], ("pydoc", "files", "tfds"))
    if cfg.data.tokenizer == "byte" and m.vocab_size < 259:
      raise ConfigError("model.vocab_size", f"the byte tokenizer needs >= 259 ids; got "
                        f"{m.vocab_size}")
    if cfg.data.source == "files":
      pattern = os.path.expanduser(cfg.data.path) if cfg.data.path else ""
      files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)] if pattern else []
      if not files:
        hint = (f"; for a directory use {os.path.join(cfg.data.path, '*.txt')!r}"
                if pattern and os.path.isdir(pattern) else "")
        raise ConfigError("data.path", f"no files match {cfg.data.path!r}; expected a glob of "
                          f".txt, .md or .jsonl files{hint}")
  _positive("checkpoint.keep", cfg.checkpoint.keep)
  _positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
  return m
