"""ESFT-style expert selection (Wang et al. 2024, "Let the Expert Stick to His Last: Expert-
Specialized Fine-Tuning for Sparse Architectural Large Language Models"): measure how much of
the target domain each routed expert serves with the frozen base, then adapt only the top ones
(`LoraConfig(expert_mode="subset", expert_subset=...)`).

The affinity used here is ESFT's *token selection ratio*: the fraction of routed token-slots
that go to each expert, the model's own router telemetry (`aux["moe"]["load"]` of
`ds_jax.nn.moe`, stacked over MoE layers in layer order), averaged over the domain's tokens.
Nothing in the model changes; the forward is the ordinary `lm.Transformer` apply.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.models import lm


def expert_affinity(model_cfg: Any, params: Any, batches: Iterable[np.ndarray]) -> np.ndarray:
  """[MoE layers, E]: per MoE layer (in layer order), each routed expert's share of the routed
  token-slots over all tokens of `batches` (int token arrays [B, L]); rows sum to 1."""
  f = jax.jit(lambda p, t: lm.Transformer(model_cfg).apply({"params": p}, t)[1]["moe"]["load"])
  total, n = 0.0, 0
  for tokens in batches:
    tokens = jnp.asarray(tokens)
    total = total + np.asarray(jax.device_get(f(params, tokens)), np.float64) * tokens.size
    n += tokens.size
  if not n:
    raise ValueError("expert_affinity needs at least one batch")
  return total / n


def top_experts(affinity: np.ndarray, k: int) -> tuple[tuple[int, ...], ...]:
  """The k experts with the highest affinity in every layer (row), each row sorted by index:
  an `expert_subset` for a kernel whose stacked layers are the rows of `affinity`."""
  affinity = np.asarray(affinity)
  if not 1 <= k <= affinity.shape[-1]:
    raise ValueError(f"k must be in [1, {affinity.shape[-1]}]; got {k}")
  order = np.argsort(-affinity, axis=-1, kind="stable")[:, :k]
  return tuple(tuple(sorted(int(e) for e in row)) for row in order)


def subset_params(subset: tuple, n_in_out: Iterable[tuple[int, int]], r: int) -> int:
  """Trainable parameters of a subset adapter: (chosen experts) · r · (D + F) summed over the
  expert weights' (D, F)."""
  n = sum(len(row) for row in subset)
  return sum(n * r * (d + f) for d, f in n_in_out)
