"""Pure transforms over parameter pytrees: add / set / delete adapters, merge, trainable split.

Every function takes a parameter tree (nested dicts, as `ds_jax.models.lm.init` returns) and
returns a new one; targeted weights become `LoraKernel` values, nothing in the model changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.lora.config import (LoraConfig, is_expert_path, is_target, is_weight_path,
                                stack_axes)
from ds_jax.lora.kernel import (LoraKernel, broadcast_experts, column_norm, dense, kernel_shape,
                                lora_delta, subset_index)

TRAINABLE_KEYS = ("lora_a", "lora_b", "magnitude", "expert_scale", "subset_a", "subset_b")


def is_kernel_object(x: Any) -> bool:
  return hasattr(x, "einsum")


def map_params(params: Any, fn: Callable[[str, Any], Any]) -> Any:
  """Rebuild nested dicts, calling fn(path, leaf) on every non-dict value (kernel objects too)."""
  def rec(node, prefix):
    if isinstance(node, Mapping) and not is_kernel_object(node):
      return {k: rec(v, prefix + (str(k),)) for k, v in node.items()}
    return fn("/".join(prefix), node)
  return rec(params, ())


def lora_kernels(params: Any) -> dict[str, LoraKernel]:
  """{path: LoraKernel} of every wrapped weight."""
  found: dict[str, LoraKernel] = {}
  map_params(params, lambda p, v: found.setdefault(p, v) if isinstance(v, LoraKernel) else v)
  return found


def _init_adapter(cfg: LoraConfig, w_shape: tuple[int, ...], n_out: int, noise: jax.Array,
                  w: Optional[jax.Array]) -> tuple[dict, Optional[jax.Array]]:
  """New adapter arrays from standard-normal / uniform[0,1) `noise` of A's shape (+ the new
  base for PiSSA, else None)."""
  lead, d, outs = w_shape[:-n_out - 1], w_shape[-n_out - 1], w_shape[-n_out:]
  r = cfg.r
  b = jnp.zeros((*lead, r, *outs), jnp.float32)
  new_base = None
  if cfg.init == "gaussian":
    a = noise / r
  elif cfg.init == "kaiming":
    bound = 1.0 / d ** 0.5  # PEFT's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(D), 1/sqrt(D))
    a = (2.0 * noise - 1.0) * bound
  else:  # pissa: the r principal directions go to the adapter, the residual stays in the base
    if w is None:
      raise ValueError("init='pissa' needs a plain float base kernel (not a packed one)")
    w2 = w.astype(jnp.float32).reshape(*lead, d, -1)
    u, s, vh = jnp.linalg.svd(w2, full_matrices=False)
    root = jnp.sqrt(s[..., :r] / cfg.scale)
    a = u[..., :, :r] * root[..., None, :]
    b = (root[..., :, None] * vh[..., :r, :]).reshape(*lead, r, *outs)
    new_base = (w - cfg.scale * lora_delta(a, b, n_out)).astype(w.dtype)
  return {"lora_a": a, "lora_b": b}, new_base


@jax.jit
def _merged_weights(kernels: dict[str, LoraKernel]) -> dict[str, tuple]:
  """{path: (W', DoRA norm or None)} for the active adapters, in one compiled call."""
  return {p: k.merged_weight(k.active) for p, k in kernels.items()}


@jax.jit
def _unmerged_weights(kernels: dict[str, LoraKernel]) -> dict[str, jax.Array]:
  out = {}
  for p, k in kernels.items():
    name, w = k.merged, k.base.astype(jnp.float32)
    if k.config(name).use_dora:
      s = k.merged_norm / k.adapters[name]["magnitude"]
      w = w * jnp.expand_dims(s, w.ndim - k.n_out - 1)
    out[p] = (w - k.delta(name)).astype(k.base.dtype)
  return out


def _subset_mask(cfg: LoraConfig, shape: tuple, n_out: int, nb: int) -> np.ndarray:
  """[*S, *E, 1, 1]: 1 on cfg.expert_subset's experts, 0 elsewhere (masks an A [*S, *E, D, r])."""
  lead = len(shape) - n_out - 1 - nb
  keep = np.zeros(math.prod(shape[:lead + nb]), np.float32)
  keep[subset_index(cfg.expert_subset, shape[:lead], shape[lead:lead + nb])] = 1.0
  return keep.reshape(*shape[:lead + nb], 1, 1)


def _new_adapters(cfg: LoraConfig, layout: tuple, rng: jax.Array, bases: dict) -> dict:
  """{path: (adapter arrays, new base or None)} for every (path, shape, n_out, n_batch) in
  layout.

  One random draw for all A matrices (a draw per kernel makes XLA compile one threefry each).
  With expert_mode="shared" an expert kernel draws one A without its expert axes and stores it
  broadcast over them (B likewise), plus expert_scale = 1 ([*S, *E, 1 or r]) if enabled."""
  def shared(shape, n_out, n_batch):
    return cfg.expert_mode == "shared" and n_batch > 0

  def drawn_shape(shape, n_out, n_batch):  # the kernel shape whose A is drawn
    if shared(shape, n_out, n_batch):
      lead = len(shape) - n_out - 1 - n_batch
      return shape[:lead] + shape[lead + n_batch:]
    return shape
  a_shapes = [(*drawn_shape(shape, n_out, nb)[:-n_out], cfg.r) for _, shape, n_out, nb in layout]
  sizes = [math.prod(s) for s in a_shapes]
  draw = jax.random.uniform if cfg.init == "kaiming" else jax.random.normal
  flat = draw(rng, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)
  out = {}
  for (path, shape, n_out, nb), a_shape, o in zip(layout, a_shapes, offsets):
    noise = flat[o:o + math.prod(a_shape)].reshape(a_shape)
    base = bases.get(path)
    plain = base if base is not None and not is_kernel_object(base) else None
    ad, new_base = _init_adapter(cfg, drawn_shape(shape, n_out, nb), n_out, noise, plain)
    if shared(shape, n_out, nb):
      lead = len(shape) - n_out - 1 - nb
      experts = shape[lead:lead + nb]
      ad = {"lora_a": broadcast_experts(ad["lora_a"], experts),
            "lora_b": broadcast_experts(
                ad["lora_b"].reshape(*ad["lora_b"].shape[:lead + 1], -1), experts
            ).reshape(*shape[:lead + nb], cfg.r, *shape[-n_out:])}
      if cfg.expert_scale != "none":
        k = cfg.r if cfg.expert_scale == "rank" else 1
        ad["expert_scale"] = jnp.ones((*shape[:lead + nb], k), jnp.float32)
      if any(cfg.expert_subset):  # tied + per-expert A_e, B_e on the chosen experts
        rs = cfg.subset_r or cfg.r
        noise = draw(jax.random.fold_in(rng, 0x5B), (*shape[:-n_out], rs), jnp.float32)
        sub, _ = _init_adapter(dataclasses.replace(cfg, r=rs), shape, n_out, noise, None)
        ad["subset_a"] = sub["lora_a"] * _subset_mask(cfg, shape, n_out, nb)
        ad["subset_b"] = sub["lora_b"]
    if cfg.expert_mode == "subset" and nb > 0:  # only the chosen experts keep their A
      ad["lora_a"] = ad["lora_a"] * _subset_mask(cfg, shape, n_out, nb)
    if cfg.use_dora:
      ad["magnitude"] = column_norm(dense(base) if new_base is None else new_base, n_out)
    out[path] = (ad, new_base)
  return out


_new_adapters_jit = jax.jit(_new_adapters, static_argnums=(0, 1))


def add_adapter(params: Any, name: str, cfg: LoraConfig, rng: jax.Array,
                activate: bool = True) -> Any:
  """Wrap every targeted weight in a LoraKernel holding a new adapter `name`.

  Raises if nothing matches (like PEFT) or if `name` exists. With `activate` (default, as
  transformers' `add_adapter`) the new adapter becomes the active one everywhere.
  """
  targets: dict[str, tuple] = {}

  def find(path, leaf):
    if not is_target(cfg, path, leaf):
      return leaf
    k = leaf if isinstance(leaf, LoraKernel) else None
    if k is not None and k.merged is not None:
      raise ValueError(f"{path}: unmerge adapter {k.merged!r} before adding {name!r}")
    if k is not None and name in k.adapters:
      raise ValueError(f"adapter {name!r} already exists at {path}")
    base = k.base if k is not None else leaf
    shape = kernel_shape(base)
    n_batch = 1 if is_expert_path(path) else 0
    n_out = k.n_out if k is not None else len(shape) - stack_axes(path) - n_batch - 1
    if n_out < 1:
      raise ValueError(f"{path}: kernel of shape {shape} has no output axis")
    if cfg.expert_mode == "subset" and n_batch:  # the chosen experts must fit this weight
      lead = len(shape) - n_out - 1 - n_batch
      try:
        subset_index(cfg.expert_subset, shape[:lead], shape[lead:lead + n_batch])
      except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    targets[path] = (base, shape, n_batch, n_out)
    return leaf

  map_params(params, find)
  if not targets:
    weights = []
    map_params(params, lambda p, v: weights.append(p) if is_weight_path(p, v) else v)
    raise ValueError(f"target_modules={cfg.target_modules!r} matched no weight; weights are: "
                     + ", ".join(weights[:12]) + (" ..." if len(weights) > 12 else ""))
  layout = tuple((p, t[1], t[3], t[2]) for p, t in targets.items())
  need_base = cfg.use_dora or cfg.init == "pissa"
  made = _new_adapters_jit(cfg, layout, rng,
                           {p: t[0] for p, t in targets.items()} if need_base else {})

  def wrap(path, leaf):
    if path not in targets:
      return leaf
    base, _, n_batch, n_out = targets[path]
    ad, new_base = made[path]
    base = base if new_base is None else new_base
    if not isinstance(leaf, LoraKernel):
      return LoraKernel(base=base, adapters={name: ad}, configs=((name, cfg),),
                        active=name if activate else None, n_batch=n_batch, n_out=n_out)
    return leaf.replace(base=base, adapters={**leaf.adapters, name: ad},
                        configs=leaf.configs + ((name, cfg),),
                        active=name if activate else leaf.active)

  out = map_params(params, wrap)
  if activate:
    out = set_adapter(out, name)
  return out


def adapter_names(params: Any) -> list[str]:
  names: dict[str, None] = {}
  for k in lora_kernels(params).values():
    names.update(dict.fromkeys(k.adapters))
  return sorted(names)


def active_adapter(params: Any) -> Optional[str]:
  actives = {k.active for k in lora_kernels(params).values()} - {None}
  return actives.pop() if len(actives) == 1 else None


def set_adapter(params: Any, name: Optional[str]) -> Any:
  """Make `name` the active adapter (kernels without it run plain); None disables adapters."""
  if name is not None and name not in adapter_names(params):
    raise KeyError(f"no adapter {name!r}; have {adapter_names(params)}")

  def fn(path, leaf):
    if not isinstance(leaf, LoraKernel):
      return leaf
    if leaf.merged is not None and leaf.merged != name:
      raise ValueError(f"{path}: adapter {leaf.merged!r} is merged; unmerge() first")
    return leaf.replace(active=name if name in leaf.adapters else None)
  return map_params(params, fn)


def disable_adapters(params: Any) -> Any:
  return set_adapter(params, None)


def delete_adapter(params: Any, name: str) -> Any:
  """Drop adapter `name`; a kernel left without adapters becomes its plain base again."""
  if name not in adapter_names(params):
    raise KeyError(f"no adapter {name!r}")

  def fn(path, leaf):
    if not isinstance(leaf, LoraKernel) or name not in leaf.adapters:
      return leaf
    if leaf.merged == name:
      raise ValueError(f"{path}: adapter {name!r} is merged; unmerge() first")
    ads = {k: v for k, v in leaf.adapters.items() if k != name}
    if not ads:
      return leaf.base
    return leaf.replace(adapters=ads, configs=tuple(c for c in leaf.configs if c[0] != name),
                        active=None if leaf.active == name else leaf.active)
  return map_params(params, fn)


def merge(params: Any) -> Any:
  """Fold the active adapter into each float base (forward unchanged, no adapter FLOPs)."""
  todo = {}
  for p, k in lora_kernels(params).items():
    if k.active is not None and k.merged is None:
      if is_kernel_object(k.base):
        raise ValueError(f"{p}: base is a packed kernel; use merge_and_requantize()")
      todo[p] = k
  done = _merged_weights(todo)

  def fn(path, leaf):
    if path not in done:
      return leaf
    w, norm = done[path]
    return leaf.replace(base=w.astype(leaf.base.dtype), merged=leaf.active, merged_norm=norm)
  return map_params(params, fn)


def unmerge(params: Any) -> Any:
  """Inverse of `merge` (exact up to float rounding)."""
  done = _unmerged_weights({p: k for p, k in lora_kernels(params).items()
                            if k.merged is not None})

  def fn(path, leaf):
    if path not in done:
      return leaf
    return leaf.replace(base=done[path], merged=None, merged_norm=None)
  return map_params(params, fn)


def merge_and_unload(params: Any) -> Any:
  """Plain parameters with the active adapter folded in; all adapters are dropped."""
  merged = merge(params)
  return map_params(merged, lambda p, v: v.base if isinstance(v, LoraKernel) else v)


def unload(params: Any) -> Any:
  """Plain base parameters, adapters dropped without merging."""
  return map_params(unmerge(params), lambda p, v: v.base if isinstance(v, LoraKernel) else v)


def merge_and_requantize(params: Any, quantize_fn: Optional[Callable[[str, jax.Array, Any], Any]]
                         = None) -> tuple[Any, dict[str, dict[str, float]]]:
  """QLoRA merge: W' = deq(base) + sBA, re-quantized by quantize_fn(path, W', old_base)
  (default: `requantize`, the old kernel's grid layout, bits and backend).

  Returns the unloaded params and, per weight, the re-quantization error
  `rel_weight` = ||deq(Q(W')) − W'|| / ||W'|| and `rel_update` = the same error over ||sBA||
  (how much of the learned update the 4-bit grid loses).
  """
  report: dict[str, dict[str, float]] = {}

  def fn(path, leaf):
    if not isinstance(leaf, LoraKernel):
      return leaf
    if leaf.active is None:
      return leaf.base
    w, _ = leaf.merged_weight(leaf.active)
    upd = w - dense(leaf.base).astype(jnp.float32)
    if not is_kernel_object(leaf.base):
      return w.astype(leaf.base.dtype)
    q = (quantize_fn or requantize)(path, w, leaf.base)
    err = jnp.linalg.norm(dense(q).astype(jnp.float32) - w)
    report[path] = {"rel_weight": float(err / jnp.linalg.norm(w)),
                    "rel_update": float(err / jnp.maximum(jnp.linalg.norm(upd), 1e-30))}
    return q
  return map_params(params, fn), report


def requantize(path: str, w: jax.Array, old: Any) -> Any:
  """Round-to-nearest re-quantization of W' like the packed kernel `old` (ds_jax.quant):
  same bits, group size, symmetry, scale dtype, backend and activation bits."""
  from ds_jax.quant.config import QuantConfig, QuantRule
  from ds_jax.quant.pack import quantize_params
  k = old.qweight.shape[-len(old.out_dims) - 1]
  groups = old.scale.shape[-2]
  rule = QuantRule(pattern=".*", bits=old.bits, group_size=k // groups if groups > 1 else 0,
                   symmetric=old.zero is None, act_bits=old.act_bits,
                   stacked_axes=w.ndim - len(old.out_dims) - 1)
  qcfg = QuantConfig(rules=(rule,), scale_dtype=jnp.dtype(old.scale.dtype).name)
  return quantize_params({"w": w}, qcfg, backend=old.backend, act_bits=old.act_bits)["w"]
