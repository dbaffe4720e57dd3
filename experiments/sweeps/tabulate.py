"""Markdown table of a finished sweep for docs/results.md, with per-seed and paired values.

    python experiments/sweeps/tabulate.py runs/sweeps/routing --ref softmax_aux

Not a sweep file: reads what `scripts/sweep.py` wrote (OUT/<sweep>/results.csv for the parameter
counts, the means and the stds; each run's seed_<s>/metrics.jsonl for the per-seed final
val_loss). Runs with the same seed share the data order (config.seed seeds both the
initialisation and the batch order), so a paired difference, val_loss(run, s) - val_loss(ref, s)
per seed, removes the part of the seed-to-seed spread that comes from the data order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os


def final_val_loss(path: str) -> float | None:
  if not os.path.exists(path):
    return None
  vals = []
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "val_loss" in r:
        vals.append(float(r["val_loss"]))
  return vals[-1] if vals else None


def mean_std(xs: list[float]) -> tuple[float, float]:
  m = sum(xs) / len(xs)
  return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  ap.add_argument("sweep_dir", help="OUT/<sweep>, e.g. runs/sweeps/routing")
  ap.add_argument("--ref", default=None, help="run to pair against (default: the first run)")
  ap.add_argument("--seeds", type=int, default=3)
  args = ap.parse_args()
  rows = list(csv.DictReader(open(os.path.join(args.sweep_dir, "results.csv"))))
  ref = args.ref or rows[0]["run"]
  per_seed = {r["run"]: [final_val_loss(os.path.join(args.sweep_dir, r["run"], f"seed_{s}",
                                                     "metrics.jsonl"))
                         for s in range(args.seeds)] for r in rows}

  def ms(r: dict, k: str, fmt: str) -> str:
    if r.get(k) in (None, ""):
      return "–"
    return f"{float(r[k]):{fmt}} ± {float(r[k + '_std']):{fmt}}"

  print(f"| run | total params | active params | train MFLOPs/token | val_loss | val_loss per seed "
        f"| paired Δ vs {ref} | val_accuracy | moe/maxvio | tokens/s |")
  print("|---" * 10 + "|")
  for r in rows:
    vs = per_seed[r["run"]]
    seeds = ", ".join("–" if v is None else f"{v:.3f}" for v in vs)
    pairs = [v - w for v, w in zip(vs, per_seed[ref]) if v is not None and w is not None]
    if r["run"] == ref or not pairs:
      delta = "–"
    else:
      m, sd = mean_std(pairs)
      delta = f"{m:+.3f} ± {sd:.3f} ({sum(d < 0 for d in pairs)}/{len(pairs)} lower)"
    print(f"| {r['run']} | {int(r['params']):,} | {int(r['active']):,} | "
          f"{float(r['train_mflops_per_token']):.2f} | {ms(r, 'val_loss', '.3f')} | {seeds} | "
          f"{delta} | {ms(r, 'val_accuracy', '.3f')} | {ms(r, 'moe/maxvio', '.2f')} | "
          f"{ms(r, 'tokens_per_s', '.0f')} |")


if __name__ == "__main__":
  main()
