"""Run an ablation sweep and tabulate it: every run x seed, sequentially, skipping finished ones.

    python scripts/sweep.py --sweep experiments/sweeps/routing.py --seeds 3 [--out runs/sweeps]
    python scripts/sweep.py --sweep ... --dry-run        # print the plan
    python scripts/sweep.py --sweep ... --commands       # one `ds-jax train` line per run (cluster)
    python scripts/sweep.py --sweep ... --report-only    # only gather existing results

A sweep file defines `get_sweep(arg=None) -> dict` with
  base:   the experiment spec every run starts from ("experiments/tiny_moe.py[:arg]");
  common: overrides applied to every run (["steps=300", "model.first_k_dense_replace=0"]);
  runs:   {run name: [overrides]}, and/or grid: {field: [values]} (Cartesian product);
  metric: the column to rank and plot (default "val_loss").
Run r with seed s trains in OUT/<sweep>/<r>/seed_<s> with `seed=s`; a workdir whose metrics.jsonl
holds the final evaluation (a `val_loss` row at the last step) is skipped. Results: OUT/<sweep>/
results.md and results.csv (mean ± std over seeds), loss_curves.png and bars.png.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import math
import os
import shlex
import sys
from typing import Any, Optional

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
COLUMNS = ("val_loss", "val_accuracy", "loss", "tokens_per_s", "mfu", "moe/maxvio",
           "moe/drop_frac")


def load_sweep(path: str) -> dict[str, Any]:
  """Import a sweep file (`path[:arg]`) and expand it into {name, base, runs: {name: overrides}}."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("ds_jax_sweep", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  s = dict(mod.get_sweep(arg or None))
  common = list(s.get("common", []))
  runs = {name: common + list(ov) for name, ov in s.get("runs", {}).items()}
  grid = s.get("grid", {})
  if grid:
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
      ov = [f"{k}={v}" for k, v in zip(keys, values)]
      runs[",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))] = common + ov
  if not runs:
    raise ValueError(f"{path}: the sweep defines no runs and no grid")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
  return dict(name=name, base=s["base"], runs=runs, metric=s.get("metric", "val_loss"),
              doc=(mod.__doc__ or "").strip())


def run_config(sweep: dict, overrides: list[str], seed: int):
  from ds_jax.config import load_config
  base = sweep["base"]
  if not os.path.isabs(base.partition(":")[0]) and not os.path.exists(base.partition(":")[0]):
    base = os.path.join(ROOT, base)
  return load_config(base, list(overrides) + [f"seed={seed}"])


def read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by preemption
        pass
  return rows


def finished(workdir: str, steps: int) -> bool:
  """True when the run wrote its final evaluation (a val_loss row at step >= steps)."""
  return any("val_loss" in r and r.get("step", 0) >= steps for r in read_rows(workdir))


def train_one(cfg, workdir: str) -> None:
  """Call the train entry point (ds_jax.loop.train, or ds_jax.train.train in older trees)."""
  try:
    from ds_jax.loop import train
  except ImportError:
    from ds_jax.train import train
  train(cfg, workdir, progress=False)


def run_sweep(sweep: dict, seeds: int, out: str, dry_run: bool = False,
              only: Optional[str] = None) -> list[tuple[str, int, str]]:
  """Train every (run, seed) not finished yet; returns [(run, seed, status)]."""
  done = []
  for run, ov in sweep["runs"].items():
    if only and run != only:
      continue
    for seed in range(seeds):
      wd = os.path.join(out, sweep["name"], run, f"seed_{seed}")
      cfg = run_config(sweep, ov, seed)
      if finished(wd, cfg.steps):
        done.append((run, seed, "skipped (finished)"))
        continue
      if dry_run:
        done.append((run, seed, "would run"))
        continue
      print(f"[sweep {sweep['name']}] {run} seed {seed} -> {wd}", flush=True)
      train_one(cfg, wd)
      done.append((run, seed, "ran"))
  return done


def commands(sweep: dict, seeds: int, out: str) -> list[str]:
  """One `ds-jax train` command per (run, seed), for a cluster's job array."""
  lines = []
  for run, ov in sweep["runs"].items():
    for seed in range(seeds):
      wd = os.path.join(out, sweep["name"], run, f"seed_{seed}")
      args = ["ds-jax", "train", "--config", sweep["base"]] + [
          f"--config.{o}" for o in list(ov) + [f"seed={seed}"]] + ["--workdir", wd,
                                                                  "--no-progress"]
      lines.append(" ".join(shlex.quote(a) for a in args))
  return lines


def final_metrics(rows: list[dict]) -> dict[str, float]:
  """Last value of each column; tokens/s and MFU as the median over logged rows after the first
  (which includes compilation)."""
  out: dict[str, float] = {}
  for r in rows:
    for k in COLUMNS:
      v = r.get(k)
      if isinstance(v, list) and v:  # per-MoE-layer values: mean over layers
        v = sum(v) / len(v)
      if isinstance(v, (int, float)):
        out[k] = float(v)
  for k in ("tokens_per_s", "mfu"):
    vals = sorted(float(r[k]) for r in rows[1:] if isinstance(r.get(k), (int, float)))
    if vals:
      out[k] = vals[len(vals) // 2]
  return out


def mean_std(xs: list[float]) -> tuple[float, float]:
  m = sum(xs) / len(xs)
  sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, sd


def gather(sweep: dict, seeds: int, out: str) -> list[dict]:
  """One row per run: analysis columns and mean ± std over the seeds that finished."""
  from ds_jax import analysis
  from ds_jax.config import model_config
  table = []
  for run, ov in sweep["runs"].items():
    cfg = run_config(sweep, ov, 0)
    mc = model_config(cfg.model)
    p = analysis.count_params(mc)
    row: dict[str, Any] = dict(run=run, params=p["total"], active=p["active"],
                               train_mflops_per_token=analysis.flops_per_token(
                                   mc, cfg.seq_len)["train"] / 1e6, seeds=0, curves=[])
    per_seed: dict[str, list[float]] = {}
    for seed in range(seeds):
      wd = os.path.join(out, sweep["name"], run, f"seed_{seed}")
      if not finished(wd, cfg.steps):
        continue
      rows = read_rows(wd)
      row["seeds"] += 1
      row["curves"].append([(r["step"], r["loss"]) for r in rows if "loss" in r])
      for k, v in final_metrics(rows).items():
        per_seed.setdefault(k, []).append(v)
    for k, vs in per_seed.items():
      row[k], row[k + "_std"] = mean_std(vs)
    table.append(row)
  return table


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"


def write_tables(table: list[dict], sweep: dict, out_dir: str) -> tuple[str, str]:
  """results.md (mean ± std) and results.csv (mean and std columns)."""
  metrics = [k for k in COLUMNS if any(k in r for r in table)]
  md = [f"| run | params | active | train MFLOPs/token | seeds | "
        + " | ".join(metrics) + " |", "|---" * (5 + len(metrics)) + "|"]
  for r in table:
    cells = [f"{_fmt(r[k])} ± {_fmt(r[k + '_std'])}" if k in r else "–" for k in metrics]
    md.append(f"| {r['run']} | {r['params']:,} | {r['active']:,} | "
              f"{r['train_mflops_per_token']:.2f} | {r['seeds']} | " + " | ".join(cells) + " |")
  md_path = os.path.join(out_dir, "results.md")
  with open(md_path, "w") as f:
    f.write(f"# Sweep {sweep['name']}\n\nBase: `{sweep['base']}`; mean ± std over seeds "
            f"(sample std). Metric: `{sweep['metric']}`.\n\n" + "\n".join(md) + "\n")
  csv_path = os.path.join(out_dir, "results.csv")
  fields = ["run", "params", "active", "train_mflops_per_token", "seeds"] + [
      x for k in metrics for x in (k, k + "_std")]
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in table:
      w.writerow(r)
  return md_path, csv_path


def plot(table: list[dict], sweep: dict, out_dir: str) -> list[str]:
  """loss_curves.png (mean over seeds, min-max band) and bars.png (metric, ± std)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in table:
    curves = [c for c in r["curves"] if c]
    if not curves:
      continue
    n = min(len(c) for c in curves)
    steps = np.array([s for s, _ in curves[0][:n]])
    ys = np.array([[v for _, v in c[:n]] for c in curves])
    line, = ax.plot(steps, ys.mean(0), label=r["run"])
    if len(curves) > 1:
      ax.fill_between(steps, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (nats/token)")
  ax.set_title(f"{sweep['name']}: mean over seeds, band = min..max")
  if ax.lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "loss_curves.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  metric = sweep["metric"]
  have = [r for r in table if metric in r]
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(have) + 2), 4))
  if have:
    x = np.arange(len(have))
    ax.bar(x, [r[metric] for r in have], yerr=[r[metric + "_std"] for r in have], capsize=4)
    ax.set_xticks(x, [r["run"] for r in have], rotation=20, ha="right", fontsize=8)
    lo = min(r[metric] - r[metric + "_std"] for r in have)
    hi = max(r[metric] + r[metric + "_std"] for r in have)
    pad = 0.5 * (hi - lo) + 1e-3
    ax.set_ylim(lo - pad, hi + pad)  # differences are small; a zero baseline hides them
  ax.set_ylabel(f"{metric} (mean ± std)")
  ax.set_title(sweep["name"])
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "bars.png"))
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def report(sweep: dict, seeds: int, out: str) -> str:
  out_dir = os.path.join(out, sweep["name"])
  os.makedirs(out_dir, exist_ok=True)
  table = gather(sweep, seeds, out)
  md_path, csv_path = write_tables(table, sweep, out_dir)
  pngs = plot(table, sweep, out_dir)
  print(open(md_path).read())
  print("wrote", md_path, csv_path, *pngs)
  return md_path


def main(argv: Optional[list[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  ap.add_argument("--sweep", required=True, help="experiments/sweeps/NAME.py[:arg]")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--out", default="runs/sweeps")
  ap.add_argument("--only", default=None, help="run only this run name")
  ap.add_argument("--dry-run", action="store_true")
  ap.add_argument("--commands", action="store_true", help="print one train command per run")
  ap.add_argument("--report-only", action="store_true")
  args = ap.parse_args(argv)
  sweep = load_sweep(args.sweep)
  if args.commands:
    print("\n".join(commands(sweep, args.seeds, args.out)))
    return 0
  if not args.report_only:
    for run, seed, status in run_sweep(sweep, args.seeds, args.out, args.dry_run, args.only):
      print(f"{run:<28} seed {seed}: {status}", flush=True)
  if not args.dry_run:
    report(sweep, args.seeds, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
