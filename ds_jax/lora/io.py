"""Adapter-only checkpoints: `<dir>/adapter_model.safetensors` + `<dir>/adapter_config.json`.

Tensor names are `<param path>.<lora_a|lora_b|magnitude|expert_scale>` in ds_jax's layout (A [.., D, r],
B [.., r, *O]); the JSON holds the PEFT-named LoraConfig plus each kernel's layout (and that kernel's own
LoraConfig where it differs: one adapter added in parts with different settings), so loading
needs only the base parameters. A shared expert adapter (expert_mode="shared") is stored once
per weight (A [.., D, r] without the expert axis) and broadcast to every expert on loading.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from ds_jax.lora.config import LoraConfig
from ds_jax.lora.kernel import LoraKernel, kernel_shape
from ds_jax.lora.transforms import TRAINABLE_KEYS, lora_kernels, map_params, set_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(path: str, params: Any, name: str) -> dict[str, int]:
  """Write adapter `name` (only its arrays) to directory `path`; returns file sizes in bytes."""
  tensors: dict[str, np.ndarray] = {}
  layout: dict[str, dict] = {}
  cfg: Optional[LoraConfig] = None
  inits: set[str] = set()
  for p, k in lora_kernels(params).items():
    if name not in k.adapters:
      continue
    kcfg = k.config(name)
    cfg = cfg or kcfg
    inits.add(kcfg.init)
    kn = k.replace(active=name)
    for key, a in k.adapters[name].items():
      if key in TRAINABLE_KEYS:  # a shared expert adapter: one copy of A, B
        tensors[f"{p}.{key}"] = np.asarray(kn.share(key, a), np.float32)
    layout[p] = {"n_batch": k.n_batch, "n_out": k.n_out, "base_shape": list(k.shape)}
    if kcfg != cfg:  # one adapter made of several LoraConfigs (add_adapter per part)
      layout[p]["config"] = kcfg.to_dict()
  if cfg is None:
    raise KeyError(f"no adapter {name!r} in params")
  if "pissa" in inits:
    raise ValueError("a PiSSA adapter changed its base (residual); save the merged model "
                     "with merge_and_unload() instead")
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "ds_jax-lora"})
  meta = {"peft_type": "LORA", "adapter_name": name, **cfg.to_dict(), "layout": layout}
  with open(os.path.join(path, CONFIG), "w") as f:
    json.dump(meta, f, indent=1)
  return {f: os.path.getsize(os.path.join(path, f)) for f in (WEIGHTS, CONFIG)}


def load_adapter(path: str, params: Any, name: Optional[str] = None,
                 activate: bool = True) -> Any:
  """Add the adapter saved in `path` to `params` (under `name`, default: the saved name)."""
  with open(os.path.join(path, CONFIG)) as f:
    meta = json.load(f)
  tensors = load_file(os.path.join(path, WEIGHTS))
  name = name or meta["adapter_name"]
  layout = meta.pop("layout")
  cfg = LoraConfig.from_dict(meta)
  seen = set()

  def fn(p, leaf):
    if p not in layout:
      return leaf
    seen.add(p)
    lay = layout[p]
    kcfg = LoraConfig.from_dict(lay["config"]) if "config" in lay else cfg
    k = leaf if isinstance(leaf, LoraKernel) else None
    base = k.base if k is not None else leaf
    if list(kernel_shape(base)) != lay["base_shape"]:
      raise ValueError(f"{p}: adapter was made for shape {lay['base_shape']}, "
                       f"base has {list(kernel_shape(base))}")
    ad = {key: jnp.asarray(tensors[f"{p}.{key}"]) for key in TRAINABLE_KEYS
          if f"{p}.{key}" in tensors}
    if k is None:
      new = LoraKernel(base=base, adapters={name: ad}, configs=((name, kcfg),),
                       n_batch=lay["n_batch"], n_out=lay["n_out"])
    elif name in k.adapters:
      raise ValueError(f"adapter {name!r} already exists at {p}")
    else:
      new = k.replace(adapters={**k.adapters, name: ad}, configs=k.configs + ((name, kcfg),))
    tmp = new.replace(active=name)  # broadcast a shared expert adapter's A, B to every expert
    ad = {key: tmp.unshare(key, v) for key, v in ad.items()}
    return new.replace(adapters={**new.adapters, name: ad})

  out = map_params(params, fn)
  missing = sorted(set(layout) - seen)
  if missing:
    raise ValueError(f"adapter weights for missing parameters: {missing[:5]}")
  return set_adapter(out, name) if activate else out
