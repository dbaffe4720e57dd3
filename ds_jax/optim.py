"""Optax chains: AdamW (or Adam/SGD/Lion), schedules, global-norm clipping, decay and freeze masks.

Gradient accumulation is done by the train step itself (a scan over micro-batches), so that the
accumulated gradient is *exactly* the gradient of the large batch.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

# Parameters that are state, not weights: they never receive optimizer updates. DeepSeek-V3's
# expert-selection bias is updated by its own rule after each step (`ds_jax.nn.moe`).
FROZEN_PATTERNS = (r"e_score_correction_bias",)
NO_DECAY_PATTERNS = (r"norm", r"bias", r"embed_tokens", r"layernorm")


def schedule(o, total_steps: int) -> optax.Schedule:
  """Warmup then cosine / warmup-stable-decay / constant / linear decay to min_lr_ratio."""
  peak, warm = o.learning_rate, o.warmup_steps
  decay_steps = o.decay_steps or total_steps
  floor = peak * o.min_lr_ratio
  warmup = optax.linear_schedule(0.0 if warm else peak, peak, max(warm, 1))
  rest = max(decay_steps - warm, 1)
  if o.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=o.min_lr_ratio)
  elif o.schedule == "linear":
    main = optax.linear_schedule(peak, floor, rest)
  elif o.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif o.schedule == "wsd":
    decay = max(int(round(rest * o.wsd_decay_fraction)), 1)
    main = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [rest - decay])
  else:
    raise ValueError(f"unknown schedule {o.schedule!r}")
  return optax.join_schedules([warmup, main], [warm])


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def path_mask(params: Any, patterns: tuple[str, ...]) -> Any:
  """True where the '/'-joined parameter path matches one of the regexes."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(re.search(pat, _path_str(p)) for pat in patterns), params)


def make_optimizer(o, total_steps: int, params: Any) -> optax.GradientTransformation:
  lr = schedule(o, total_steps)
  decay_mask = jax.tree.map(lambda no: not no, path_mask(params, NO_DECAY_PATTERNS))
  chain = []
  frozen = path_mask(params, FROZEN_PATTERNS)
  if any(jax.tree.leaves(frozen)):
    # Zero gradient + no weight decay leaves a parameter bit-identical under Adam-type updates,
    # and keeps the optimizer state shaped like the parameters (for sharding it alike).
    chain.append(optax.masked(optax.set_to_zero(), frozen))
    decay_mask = jax.tree.map(lambda d, f: d and not f, decay_mask, frozen)
  if o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(_base(o, lr, decay_mask))
  return optax.chain(*chain)


def _base(o, lr, decay_mask) -> optax.GradientTransformation:
  if o.name == "adamw":
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                       mask=decay_mask)
  if o.name == "adam":
    return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  if o.name == "lion":
    return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
  return optax.sgd(lr)
