"""Quantization rules: which parameters are quantized, and how.

A `QuantConfig` is an ordered tuple of `QuantRule`s; the first rule whose regex matches (`re.search`)
the '/'-joined parameter path decides. `bits == 0` keeps the parameter in float. The defaults keep
the MoE router (`gate/kernel`), norms, embeddings and `lm_head` in float and quantize every other
matmul kernel (dense, attention, stacked experts) to 4 bits in groups of 128.

Contraction axis: ds_jax kernels are `[*stacked, K, *out]` where the stacked axes are the scan
layer axis (`layers_<i>` in the path) and the expert axis (`experts` in the path); K, the first
non-stacked axis, is the one a matmul sums over, so groups run along it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional, Sequence

import ml_collections

CALIBRATIONS = ("absmax", "mse", "lsq")
SCALE_DTYPES = ("bfloat16", "float32")

# Leaf names of matmul kernels: Linear's `kernel`, MoE's stacked `experts/<name>_proj`.
KERNEL_PATTERN = r"(kernel|experts/(gate|up|down)_proj)$"
KEEP_FLOAT_PATTERN = r"((^|/)gate/kernel$|norm|embed|lm_head)"


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """How parameters whose path matches `pattern` are quantized.

  bits: 4 or 8 (0: keep float). group_size: 0 = one scale per output channel (and per stacked
  index), else groups of that many along the contraction axis (an axis shorter than the group is
  one group). act_bits: dynamic per-token activation quantization at this kernel's input (0: off).
  stacked_axes: leading non-contracted axes; -1 infers them from the path (see module doc).
  """
  pattern: str
  bits: int = 4
  group_size: int = 128
  symmetric: bool = True
  calibration: str = "absmax"
  act_bits: int = 0
  stacked_axes: int = -1

  def __post_init__(self):
    re.compile(self.pattern)
    if self.bits not in (0, 4, 8):
      raise ValueError(f"quant rule {self.pattern!r}: bits must be 0, 4 or 8; got {self.bits}")
    if self.act_bits not in (0, 4, 8):
      raise ValueError(f"quant rule {self.pattern!r}: act_bits must be 0, 4 or 8; "
                       f"got {self.act_bits}")
    if self.group_size < 0:
      raise ValueError(f"quant rule {self.pattern!r}: group_size must be >= 0")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"quant rule {self.pattern!r}: calibration must be one of "
                       f"{', '.join(CALIBRATIONS)}; got {self.calibration!r}")
    if self.calibration == "lsq" and not self.symmetric:
      raise ValueError(f"quant rule {self.pattern!r}: lsq calibration needs symmetric=True")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Ordered rules (first match wins) plus settings shared by all of them.

  scale_dtype: dtype scales and zero points are stored in; fake quantization rounds them to it
  too, so fake-quant and packed outputs agree. start_step: QAT is active from this step on.
  """
  rules: tuple[QuantRule, ...]
  scale_dtype: str = "bfloat16"
  start_step: int = 0

  def __post_init__(self):
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES}; got {self.scale_dtype!r}")

  def rule_for(self, path: str) -> Optional[QuantRule]:
    """The first rule matching `path`, or None (keep float)."""
    for r in self.rules:
      if re.search(r.pattern, path):
        return r if r.bits else None
    return None

  def active(self, step: int) -> bool:
    """Python-side switch for QAT: the train loop compiles the quantized step from here on."""
    return step >= self.start_step

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "QuantConfig":
    d = json.loads(text)
    return cls(rules=tuple(QuantRule(**r) for r in d.pop("rules")), **d)


def default_rules(bits: int = 4, group_size: int = 128, symmetric: bool = True,
                  calibration: str = "absmax", act_bits: int = 0,
                  keep_float: str = KEEP_FLOAT_PATTERN) -> tuple[QuantRule, ...]:
  return (QuantRule(keep_float, bits=0),
          QuantRule(KERNEL_PATTERN, bits=bits, group_size=group_size, symmetric=symmetric,
                    calibration=calibration, act_bits=act_bits))


def quant_config(bits: int = 4, group_size: int = 128, **kw: Any) -> QuantConfig:
  """Default rules with the given settings; kw: symmetric, calibration, act_bits, scale_dtype."""
  shared = {k: kw.pop(k) for k in ("scale_dtype", "start_step") if k in kw}
  return QuantConfig(default_rules(bits, group_size, **kw), **shared)


def default_quant_config() -> ml_collections.ConfigDict:
  """The `config.quant` section of an experiment (off by default)."""
  return ml_collections.ConfigDict(dict(
      enabled=False, bits=4, group_size=128, symmetric=True, calibration="absmax", act_bits=0,
      start_step=0, scale_dtype="bfloat16", keep_float=KEEP_FLOAT_PATTERN, rules=""))


def parse_rules(text: str) -> tuple[QuantRule, ...]:
  """Extra rules from a string: `regex:bits=8,group_size=0,symmetric=false;regex2:bits=0`."""
  rules = []
  for item in filter(None, (s.strip() for s in text.split(";"))):
    pattern, _, opts = item.rpartition(":") if "=" in item else (item, "", "")
    kw: dict[str, Any] = {}
    for opt in filter(None, (o.strip() for o in opts.split(","))):
      key, _, value = opt.partition("=")
      if key in ("bits", "group_size", "act_bits", "stacked_axes"):
        kw[key] = int(value)
      elif key == "symmetric":
        kw[key] = value.lower() in ("1", "true", "yes")
      elif key == "calibration":
        kw[key] = value
      else:
        raise ValueError(f"quant rule {item!r}: unknown option {key!r}")
    rules.append(QuantRule(pattern, **kw))
  return tuple(rules)


def from_config(cfg: ml_collections.ConfigDict | dict) -> Optional[QuantConfig]:
  """QuantConfig from a `config.quant` section; None when `enabled` is false."""
  c = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
  if not c.get("enabled", False):
    return None
  extra = parse_rules(c.get("rules", ""))
  base = default_rules(c.get("bits", 4), c.get("group_size", 128), c.get("symmetric", True),
                       c.get("calibration", "absmax"), c.get("act_bits", 0),
                       c.get("keep_float", KEEP_FLOAT_PATTERN))
  return QuantConfig(extra + base, scale_dtype=c.get("scale_dtype", "bfloat16"),
                     start_step=c.get("start_step", 0))


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a jax.tree_util key path."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def stacked_axes(path: str, rule: QuantRule) -> int:
  """Leading non-contracted axes of the kernel at `path` (scan layer axis, expert axis)."""
  if rule.stacked_axes >= 0:
    return rule.stacked_axes
  segs = path.split("/")
  return int(any(re.fullmatch(r"layers_\d+", s) for s in segs)) + int("experts" in segs)
