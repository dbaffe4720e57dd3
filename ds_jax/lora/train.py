"""Training with adapters: split params into (trainable adapter tree, frozen rest) and back.

A train step differentiates `loss(combine(trainable, frozen))` w.r.t. `trainable` only, so
gradients and optimizer state exist only for the active adapter's arrays; the frozen base is
never touched by the update and stays bit-identical.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ds_jax.lora.config import from_config_dict
from ds_jax.lora.kernel import LoraKernel, kernel_shape
from ds_jax.lora.transforms import TRAINABLE_KEYS, add_adapter, is_kernel_object, map_params


def _is_trainable(k: Any) -> bool:
  return isinstance(k, LoraKernel) and k.active is not None and k.merged is None


def _trainable_kernels(params: Any) -> list:
  found: list = []
  map_params(params, lambda p, v: found.append(v) if _is_trainable(v) else v)
  return found


def split_trainable(params: Any) -> tuple[dict, Any]:
  """(trainable, frozen): trainable = {path...: {lora_a, lora_b[, magnitude, expert_scale]}} of
  the active adapter (nested dicts mirroring params); frozen = params with those arrays set to
  None. A shared expert adapter (expert_mode="shared") contributes one copy of A and B (no
  expert axes); `combine` broadcasts it back to every expert. A subset adapter
  (expert_mode="subset") contributes the chosen experts' A, B ([N, D, r], [N, r, *O]); `combine`
  scatters them back, the other experts' A, B stay 0."""
  trainable: dict = {}

  def fn(path, leaf):
    if not _is_trainable(leaf):
      return leaf
    ad = leaf.adapters[leaf.active]
    node = trainable
    for p in path.split("/"):
      node = node.setdefault(p, {})
    node.update({k: leaf.share(k, v) for k, v in ad.items() if k in TRAINABLE_KEYS})
    hole = {k: (None if k in TRAINABLE_KEYS else v) for k, v in ad.items()}
    return leaf.replace(adapters={**leaf.adapters, leaf.active: hole})
  frozen = map_params(params, fn)
  return trainable, frozen


def combine(trainable: dict, frozen: Any) -> Any:
  """Inverse of split_trainable: put the adapter arrays back into the frozen tree."""
  def fn(path, leaf):
    if not _is_trainable(leaf):
      return leaf
    node = trainable
    for p in path.split("/"):
      node = node[p]
    ad = {**leaf.adapters[leaf.active], **{k: leaf.unshare(k, v) for k, v in node.items()}}
    return leaf.replace(adapters={**leaf.adapters, leaf.active: ad})
  return map_params(frozen, fn)


def trainable_mask(params: Any) -> Any:
  """Bool pytree shaped like `params`: True on the active adapter's arrays (for optax.masked).

  Not for shared expert adapters (expert_mode="shared"): an update through the mask would
  change each expert's stored copy separately; train them through split_trainable / combine."""
  if any(k.is_shared(k.active) for k in _trainable_kernels(params)):
    raise ValueError("trainable_mask cannot keep a shared expert adapter tied; use "
                     "split_trainable / combine")
  if any(k.is_subset(k.active) for k in _trainable_kernels(params)):
    raise ValueError("trainable_mask would train every expert of a subset expert adapter "
                     "(expert_mode='subset'); use split_trainable / combine")
  trainable, frozen = split_trainable(params)
  return combine(jax.tree.map(lambda _: True, trainable),
                 jax.tree.map(lambda _: False, frozen))


def _size(x: Any) -> int:
  if isinstance(x, LoraKernel):
    return math.prod(kernel_shape(x.base)) + sum(
        int(np.size(a)) for ad in x.adapters.values() for a in jax.tree.leaves(ad))
  if is_kernel_object(x):
    return math.prod(kernel_shape(x))
  return int(np.size(x))


def count_params(params: Any) -> dict[str, int]:
  """{'trainable': active-adapter parameters, 'base': base parameters, 'total': all}.

  Works on abstract trees too (`jax.eval_shape` of `add_adapter` on a full-size model's
  abstract parameters), so an adapter's size can be counted before anything is allocated."""
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(params)):
    trainable = jax.eval_shape(lambda p: split_trainable(p)[0], params)
  else:
    trainable, _ = split_trainable(params)
  n_train = sum(int(np.size(a)) for a in jax.tree.leaves(trainable))
  total, base = [0], [0]

  def fn(path, leaf):
    total[0] += _size(leaf)
    base[0] += math.prod(kernel_shape(leaf.base)) if isinstance(leaf, LoraKernel) else _size(leaf)
    return leaf
  map_params(params, fn)
  return {"trainable": n_train, "base": base[0], "total": total[0]}


def count_trainable(params: Any) -> int:
  return count_params(params)["trainable"]


def tree_bytes(tree: Any) -> int:
  return sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def lora_train_partition(params: Any, lora_cfg: Any, rng: jax.Array) -> tuple[dict, Any]:
  """From a `config.lora` section: add the adapter (if `enabled`) and split.

  Returns (trainable, frozen); with lora disabled, (params, {}) so callers can always
  `combine` — see `combine_or_full`.
  """
  if not lora_cfg.get("enabled", False):
    return params, {}
  name = lora_cfg.get("adapter_name", "default")
  params = add_adapter(params, name, from_config_dict(lora_cfg), rng)
  return split_trainable(params)


def combine_or_full(trainable: Any, frozen: Any) -> Any:
  """combine() for a LoRA partition; the trainable tree itself when there is no frozen part."""
  if isinstance(frozen, dict) and not frozen:
    return trainable
  return combine(trainable, frozen)


def partition_shardings(param_sh: Any, trainable: dict, frozen: Any, replicated: Any
                        ) -> tuple[Any, Any]:
  """(trainable shardings, frozen shardings) from the plain params' sharding tree.

  A wrapped base keeps its kernel's sharding; adapter arrays (small) are replicated.
  """
  def lookup(path):
    node = param_sh
    for p in path.split("/"):
      node = node[p]
    return node

  def fn(path, leaf):
    if leaf is None:
      return None
    sh = lookup(path)
    if isinstance(leaf, LoraKernel):
      base_sh = jax.tree.map(lambda _: sh, leaf.base)
      return leaf.replace(base=base_sh,
                          adapters=jax.tree.map(lambda _: replicated, leaf.adapters),
                          merged_norm=None if leaf.merged_norm is None else replicated)
    return jax.tree.map(lambda _: sh, leaf)
  return jax.tree.map(lambda _: replicated, trainable), map_params(frozen, fn)
