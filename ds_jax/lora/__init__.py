"""LoRA adapters over parameter pytrees (PEFT semantics, pure functions).

    params = lora.add_adapter(params, "fin", lora.LoraConfig(target_modules=["q_proj", "v_proj"],
                              r=8, lora_alpha=16), rng)      # targeted kernels -> LoraKernel
    logits = lm.apply(cfg, params, tokens)                    # the model is unchanged
    trainable, frozen = lora.split_trainable(params)          # differentiate w.r.t. trainable
    params = lora.combine(trainable, frozen)
    lora.save_adapter("out/fin", params, "fin")               # adapter-only file
    plain = lora.merge_and_unload(params)

`AdapterMixin` gives a model object the seed's method API (`model.add_adapter(name, cfg)`).
See docs/lora.md.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from ds_jax.lora.config import (ALL_LINEAR, LoRAAdapter, LoraConfig, default_lora_config,
                                from_config_dict, is_target)
from ds_jax.lora.io import load_adapter, save_adapter
from ds_jax.lora.kernel import LoraKernel, dense
from ds_jax.lora.train import (combine, combine_or_full, count_params, count_trainable,
                               partition_shardings,
                               lora_train_partition, split_trainable, trainable_mask,
                               tree_bytes)
from ds_jax.lora.transforms import (active_adapter, adapter_names, add_adapter, delete_adapter,
                                    disable_adapters, lora_kernels, merge, merge_and_requantize,
                                    merge_and_unload, set_adapter, unload, unmerge)

__all__ = [
    "ALL_LINEAR", "LoRAAdapter", "LoraConfig", "LoraKernel", "AdapterMixin", "active_adapter",
    "adapter_names", "add_adapter", "combine", "combine_or_full", "count_params",
    "count_trainable", "default_lora_config", "delete_adapter", "dense", "disable_adapters",
    "from_config_dict", "is_target", "load_adapter", "lora_kernels", "lora_train_partition",
    "merge", "merge_and_requantize", "merge_and_unload", "partition_shardings", "save_adapter",
    "set_adapter",
    "split_trainable", "trainable_mask", "tree_bytes", "unload", "unmerge",
]


class AdapterMixin:
  """PEFT-style methods for a model object holding `self.params` (and optionally `self.rng`).

  Each method replaces `self.params` with the transformed tree, e.g.
  `model.add_adapter("financial_domain", LoRAAdapter(target_modules=["q_proj", "v_proj"],
  r=64, lora_alpha=32, dropout=0.1))`.
  """
  params: Any

  def _next_rng(self) -> jax.Array:
    rng = getattr(self, "rng", None)
    if rng is None:
      rng = jax.random.key(0)
    rng, sub = jax.random.split(rng)
    self.rng = rng
    return sub

  def add_adapter(self, name: str, config: LoraConfig, rng: Optional[jax.Array] = None,
                  activate: bool = True) -> None:
    self.params = add_adapter(self.params, name, config,
                              self._next_rng() if rng is None else rng, activate)

  def set_adapter(self, name: Optional[str]) -> None:
    self.params = set_adapter(self.params, name)

  def disable_adapters(self) -> None:
    self.params = disable_adapters(self.params)

  def delete_adapter(self, name: str) -> None:
    self.params = delete_adapter(self.params, name)

  def merge_adapter(self) -> None:
    self.params = merge(self.params)

  def unmerge_adapter(self) -> None:
    self.params = unmerge(self.params)

  def merge_and_unload(self) -> None:
    self.params = merge_and_unload(self.params)

  def save_adapter(self, path: str, name: Optional[str] = None) -> dict[str, int]:
    return save_adapter(path, self.params, name or self.active_adapter)

  def load_adapter(self, path: str, name: Optional[str] = None) -> None:
    self.params = load_adapter(path, self.params, name)

  @property
  def active_adapter(self) -> Optional[str]:
    return active_adapter(self.params)

  @property
  def adapters(self) -> list[str]:
    return adapter_names(self.params)

  def num_trainable_parameters(self) -> dict[str, int]:
    return count_params(self.params)
