"""LoRA configuration (PEFT field names) and the rule that picks which parameters get adapters.

Parameters are addressed by their '/'-joined path in the parameter pytree, e.g.
`layers_0/block/self_attn/q_proj/kernel` or `layers_1/block/mlp/experts/gate_proj`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np
from ml_collections import ConfigDict

ALL_LINEAR = "all-linear"
INITS = ("gaussian", "kaiming", "pissa")
EXPERT_MODES = ("per_expert", "shared", "subset")
EXPERT_SCALES = ("none", "expert", "rank")
# Never adapted by "all-linear": the output layer (as in PEFT), embeddings and the MoE router,
# whose logits are computed outside `ds_jax.nn.linear.einsum`.
_ALL_LINEAR_EXCLUDE = ("lm_head", "embed_tokens", "gate")
_IDENT = re.compile(r"^[A-Za-z0-9_]+$")
_STACK = re.compile(r"^layers_\d+$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """One adapter's hyper-parameters.

  target_modules: module names (any path component, e.g. "q_proj", "experts"), the string
    "all-linear", or a single regex string matched (fullmatch) against the parameter path or
    its module path (the path without a trailing "/kernel").
  use_rslora: scale = lora_alpha / sqrt(r) (Kalajdzievski 2023) instead of lora_alpha / r.
  use_dora: weight-decomposed LoRA (Liu et al. 2024): W' = m * (W + sBA) / ||W + sBA||_col.
  init: "gaussian" (A ~ N(0, 1/r), B = 0, as PEFT), "kaiming" (PEFT default, uniform A),
    or "pissa" (principal singular vectors into A, B; the base keeps the residual).
  expert_mode: how stacked routed-expert weights [E, D, F] are adapted. "per_expert" (default):
    one A, B per expert (E · r · (D + F) parameters). "shared": one A [D, r], B [r, F] per
    weight, the same ΔW = s·B·A added to every expert (r · (D + F) parameters).
  expert_scale: with expert_mode="shared", a trainable per-expert gain (initialised to 1):
    "none"; "expert": a scalar g_e, ΔW_e = g_e · s·A·B (E more parameters per weight); "rank":
    a vector g_e of r gains, ΔW_e = s·A·diag(g_e)·B — every expert gets its own mixture of the
    r shared rank-1 directions (E·r more parameters per weight).
  """
  target_modules: Any = ("q_proj", "v_proj")
  exclude_modules: Any = ()
  r: int = 8
  lora_alpha: float = 8.0
  lora_dropout: float = 0.0
  use_rslora: bool = False
  use_dora: bool = False
  init: str = "gaussian"
  expert_mode: str = "per_expert"
  expert_scale: str = "none"
  expert_subset: Any = ()
  subset_r: int = 0

  def __post_init__(self):
    for f in ("target_modules", "exclude_modules"):
      v = getattr(self, f)
      if v is None:
        v = ()
      if isinstance(v, (list, tuple)):
        object.__setattr__(self, f, tuple(v))
    if self.r < 1:
      raise ValueError(f"LoraConfig.r must be >= 1; got {self.r}")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1); got {self.lora_dropout}")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init must be one of {INITS}; got {self.init!r}")
    if self.expert_mode not in EXPERT_MODES:
      raise ValueError(f"LoraConfig.expert_mode must be one of {EXPERT_MODES}; "
                       f"got {self.expert_mode!r}")
    if self.expert_scale not in EXPERT_SCALES:
      raise ValueError(f"LoraConfig.expert_scale must be one of {EXPERT_SCALES}; "
                       f"got {self.expert_scale!r}")
    if self.expert_scale != "none" and self.expert_mode != "shared":
      raise ValueError("LoraConfig.expert_scale needs expert_mode='shared'")
    sub = self.expert_subset
    try:  # lists (JSON, ConfigDict) -> a hashable tuple of tuples of ints
      sub = tuple(tuple(int(e) for e in row) for row in (sub or ()))
    except TypeError:
      raise ValueError("LoraConfig.expert_subset must be a sequence (one per stacked layer) of "
                       f"sequences of expert indices; got {self.expert_subset!r}") from None
    object.__setattr__(self, "expert_subset", sub)
    if sub:
      if self.expert_mode not in ("subset", "shared"):
        raise ValueError("LoraConfig.expert_subset needs expert_mode='subset' or 'shared'; "
                         f"got expert_mode={self.expert_mode!r}")
      for row in sub:
        if any(e < 0 for e in row) or len(set(row)) != len(row):
          raise ValueError("LoraConfig.expert_subset: expert indices must be distinct and "
                           f">= 0; got {row!r}")
      if self.use_dora:
        raise ValueError("LoraConfig.expert_subset does not support use_dora")
    if self.expert_mode == "subset" and not any(sub):
      raise ValueError("LoraConfig.expert_subset must name at least one expert with "
                       "expert_mode='subset'; got " + repr(self.expert_subset))
    if self.expert_mode == "subset" and self.init == "pissa":
      raise ValueError("LoraConfig.expert_mode='subset' does not support init='pissa'")
    if self.subset_r < 0 or (self.subset_r and not (self.expert_mode == "shared" and any(sub))):
      raise ValueError("LoraConfig.subset_r must be >= 0 and needs expert_mode='shared' with an "
                       f"expert_subset; got subset_r={self.subset_r}")
    if self.expert_mode == "shared" and self.init == "pissa":
      raise ValueError("init='pissa' is per weight; it cannot be shared across experts")

  @property
  def scale(self) -> float:
    return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for f in ("target_modules", "exclude_modules"):
      if isinstance(d[f], tuple):
        d[f] = list(d[f])
    d["expert_subset"] = [list(row) for row in self.expert_subset]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "LoraConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def LoRAAdapter(target_modules: Sequence[str] | str = ("q_proj", "v_proj"), r: int = 8,
                lora_alpha: float = 8.0, dropout: float = 0.0, **kw: Any) -> LoraConfig:
  """The seed's spelling: `LoRAAdapter(target_modules=[...], r=64, lora_alpha=32, dropout=0.1)`."""
  kw.setdefault("lora_dropout", dropout)
  return LoraConfig(target_modules=target_modules, r=r, lora_alpha=lora_alpha, **kw)


def default_lora_config() -> ConfigDict:
  """The `config.lora` section of an experiment file (disabled by default)."""
  return ConfigDict(dict(
      enabled=False, adapter_name="default", r=8, lora_alpha=16.0,
      target_modules=["q_proj", "v_proj"], exclude_modules=[], dropout=0.0,
      use_rslora=False, use_dora=False, init="gaussian", expert_mode="per_expert",
      expert_scale="none", expert_subset=[], subset_r=0, seed=0))


def from_config_dict(c: ConfigDict | dict) -> LoraConfig:
  """Freeze a `config.lora` section into a LoraConfig."""
  c = c.to_dict() if isinstance(c, ConfigDict) else dict(c)
  tm = c.get("target_modules", ("q_proj", "v_proj"))
  return LoraConfig(target_modules=tm, exclude_modules=c.get("exclude_modules", ()),
                    r=int(c["r"]), lora_alpha=float(c["lora_alpha"]),
                    lora_dropout=float(c.get("dropout", c.get("lora_dropout", 0.0))),
                    use_rslora=bool(c.get("use_rslora", False)),
                    use_dora=bool(c.get("use_dora", False)), init=c.get("init", "gaussian"),
                    expert_mode=c.get("expert_mode", "per_expert"),
                    expert_scale=c.get("expert_scale", "none"),
                    expert_subset=c.get("expert_subset", ()),
                    subset_r=int(c.get("subset_r", 0)))


# ----------------------------------------------------------------------------------------------
# Path matching.


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a jax key path (DictKey / GetAttrKey / str)."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", k))))
  return "/".join(parts)


def is_expert_path(path: str) -> bool:
  return "experts" in path.split("/")


def is_weight_path(path: str, leaf: Any) -> bool:
  """A matmul weight: a Linear `kernel`, or a stacked expert weight under `experts/`."""
  parts = path.split("/")
  ndim = len(np.shape(leaf)) if not hasattr(leaf, "einsum") else 2
  if parts[-1] == "kernel":
    return ndim >= 2
  return is_expert_path(path) and ndim >= 3


def stack_axes(path: str) -> int:
  """Leading stacked axes of a parameter: 1 under a scanned segment `layers_<s>`, else 0."""
  return sum(1 for p in path.split("/") if _STACK.match(p))


def _matches(spec: Any, path: str) -> bool:
  if not spec:
    return False
  module = path[:-len("/kernel")] if path.endswith("/kernel") else path
  parts = module.split("/")
  if isinstance(spec, str):
    if spec == ALL_LINEAR:
      return not any(p in _ALL_LINEAR_EXCLUDE for p in parts)
    if _IDENT.match(spec):
      return spec in parts
    return bool(re.fullmatch(spec, path) or re.fullmatch(spec, module))
  return any(_matches(s, path) for s in spec)


def is_target(cfg: LoraConfig, path: str, leaf: Any) -> bool:
  """Whether the parameter at `path` gets an adapter under `cfg`."""
  if not is_weight_path(path, leaf):
    return False
  return _matches(cfg.target_modules, path) and not _matches(cfg.exclude_modules, path)
