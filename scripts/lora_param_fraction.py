"""Trainable fraction of a LoRA adapter on full-size published models, counted without allocating
them (`jax.eval_shape` of `lora.add_adapter` on abstract parameters).

    python scripts/lora_param_fraction.py [--configs deepseek_v2_lite,deepseek_v3,lora_moe] [--r 8]

Why: at a fixed rank the adapter's share of a weight [D, F] is r·(D+F)/(D·F), so the same adapter
is a much smaller fraction of a wide model than of the 7.8M-parameter experiment model of
docs/lora.md. Prints one Markdown table (seconds, no device work).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (target_modules, expert_mode, what)
ADAPTERS = (
    (("q_proj", "kv_b_proj"), "per_expert", "q, v (q_proj, kv_b_proj)"),
    ("all-linear", "shared", "all-linear, routed experts tied (one A, B per expert weight)"),
    (("experts",), "per_expert", "routed experts only, one A, B per expert"),
    ("all-linear", "per_expert", "all-linear, one A, B per routed expert"),
)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="deepseek_v2_lite,deepseek_v3,lora_moe")
  p.add_argument("--r", type=int, default=8)
  a = p.parse_args()
  import jax
  from ds_jax import config as cfglib
  from ds_jax import lora
  from ds_jax.analysis.params import abstract_params
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
  names = a.configs.split(",")
  rows = {}
  totals = {}
  for name in names:
    mc = cfglib.model_config(cfglib.load_config(os.path.join(here, name + ".py")).model)
    params = abstract_params(mc)
    for targets, mode, what in ADAPTERS:
      cfg = lora.LoraConfig(target_modules=list(targets) if isinstance(targets, tuple)
                            else targets, r=a.r, lora_alpha=2 * a.r, expert_mode=mode)
      ad = jax.eval_shape(lambda q, c=cfg: lora.add_adapter(q, "a", c, jax.random.key(0)),
                          params)
      c = lora.count_params(ad)
      totals[name] = c["base"]
      rows.setdefault(what, {})[name] = c["trainable"]
  print(f"| LoRA r = {a.r} | " + " | ".join(
      f"{n} ({totals[n] / 1e9:.3f}B)" if totals[n] >= 1e8 else f"{n} ({totals[n]:,})"
      for n in names) + " |")
  print("|---|" + "---|" * len(names))
  for what, per in rows.items():
    print(f"| {what} | " + " | ".join(
        f"{per[n]:,} ({100 * per[n] / totals[n]:.2f}%)" for n in names) + " |")


if __name__ == "__main__":
  main()
