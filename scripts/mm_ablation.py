"""Tri-modal digits ablation: loss (softmax / sigmoid / contrastive_mse) x CMAA (on / off) and the
image-anchored pairing, several seeds, one Markdown table.

  python scripts/mm_ablation.py --out runs/mm_ablation --seeds 0,1,2 [--epochs 30]
      [--shard 0/2]            # run every 2nd run only (two processes, one core each)
      [--arms a,b]             # a subset of the arms (e.g. one process per group of arms)
      [--report]               # only (re)write <out>/ablation.md from the finished runs

Every run is `experiments/mm_digits.py:<arm>` with `seed=<s>`, in `<out>/<arm>/seed<s>/`; all runs
share one generated data set (`data.seed = 0`, cached in `<out>/data_cache`), so seeds vary the
initialisation, batch order, pairing and augmentation only. Runs with an `eval.json` are skipped,
so the script resumes. Runs of one arm share one compiled train step (same process). Metrics are
on the held-out test voices / test images unless `--eval-split val` (training voices) or
`--eval-split voices` (validation voices held out of training: choose recipes on this one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (name, experiments/mm_digits.py argument, description)
ARMS = (
    ("contrastive_mse+cmaa", "cmaa", "softmax InfoNCE + 0.5 MSE (ramped), CMAA (ramped)"),
    ("contrastive_mse", "nocmaa", "softmax InfoNCE + 0.5 MSE (ramped), no CMAA (the default)"),
    ("softmax+cmaa", "softmax,cmaa", "softmax InfoNCE only, CMAA"),
    ("softmax", "softmax,nocmaa", "softmax InfoNCE only, no CMAA"),
    ("sigmoid+cmaa", "sigmoid,cmaa", "SigLIP sigmoid only (bias at the batch prior), CMAA"),
    ("sigmoid", "sigmoid,nocmaa", "SigLIP sigmoid only (bias at the batch prior), no CMAA"),
    ("anchored", "softmax,nocmaa,anchored",
     "softmax InfoNCE only, no CMAA, image-anchored pairs (audio-text emergent; vs `softmax`)"),
)
ANCHOR_REF = "softmax"  # the fully paired arm with the anchored arm's loss
COLUMNS = (("zeroshot_image_text", "img→txt ZS"), ("zeroshot_audio_text", "aud→txt ZS"),
           ("R@1_image_audio", "img→aud R@1"), ("R@1_audio_image", "aud→img R@1"),
           ("R@1_audio_text", "aud→txt R@1"), ("R@1_text_audio", "txt→aud R@1"))
TARGETS = {"zeroshot_image_text": 0.97, "zeroshot_audio_text": 0.95, "R@1_image_audio": 0.95,
           "R@1_audio_image": 0.95}


def run_one(arm_arg: str, seed: int, workdir: str, a) -> dict:
  from ds_jax import multimodal_eval as E
  from ds_jax import multimodal_train as T
  from ds_jax.config import load_config
  here = os.path.dirname(os.path.abspath(__file__))
  spec = os.path.join(here, "..", "experiments", "mm_digits.py") + (f":{arm_arg}" if arm_arg
                                                                      else "")
  c = load_config(spec, [f"seed={seed}", f"epochs={a.epochs}",
                         f"data.cache_dir={os.path.join(a.out, 'data_cache')}",
                         f"data.eval_split={a.eval_split}", *a.override])
  t0 = time.time()
  T.train(c, workdir, progress=False)
  train_s = time.time() - t0
  _, mcfg, params = T.restore_params(workdir)
  _, test_set = T.load_data(c, workdir)
  out, e, raw = E.evaluate(mcfg, params, test_set, c.text_len, return_raw=True)
  E.plot(e, raw, workdir)
  out.update(seed=seed, arm_arg=arm_arg, train_seconds=train_s, eval_split=a.eval_split)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=1)
  return out


def collect(out_dir: str, seeds) -> dict:
  res = {}
  for name, _, _ in ARMS:
    for s in seeds:
      p = os.path.join(out_dir, name, f"seed{s}", "eval.json")
      if os.path.exists(p):
        with open(p) as f:
          res[(name, s)] = json.load(f)
  return res


def fmt(vals) -> str:
  if not vals:
    return "–"
  m = 100 * np.mean(vals)
  return f"{m:.1f} ± {100 * np.std(vals):.1f}" if len(vals) > 1 else f"{m:.1f}"


def report(a, seeds) -> str:
  res = collect(a.out, seeds)
  lines = [f"Eval split: `{a.eval_split}`; seeds {','.join(map(str, seeds))}; mean ± std over the "
           f"seeds that finished (n), in %.", "",
           "| arm | n | " + " | ".join(h for _, h in COLUMNS) + " | train s |",
           "|---|---|" + "---|" * len(COLUMNS) + "---|"]
  for name, _, desc in ARMS:
    runs = [res[(name, s)] for s in seeds if (name, s) in res]
    cells = [fmt([r[k] for r in runs]) for k, _ in COLUMNS]
    ts = f"{np.mean([r['train_seconds'] for r in runs]):.0f}" if runs else "–"
    lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {ts} |")
  lines += ["", "Per seed (img→txt / aud→txt zero-shot, img→aud / aud→img R@1, %):", ""]
  for name, _, _ in ARMS:
    per = [f"s{s}: " + " / ".join(f"{100 * res[(name, s)][k]:.1f}" for k in TARGETS)
           for s in seeds if (name, s) in res]
    lines.append(f"- {name}: " + ("; ".join(per) if per else "not run"))
  ratios = []
  for s in seeds:
    full, anch = res.get((ANCHOR_REF, s)), res.get(("anchored", s))
    if full and anch:
      ratios.append((s, anch["zeroshot_audio_text"] / max(full["zeroshot_audio_text"], 1e-9)))
  lines += ["", "Emergent audio→text (zero-shot, image-anchored / fully paired, same seed): " +
            (", ".join(f"s{s}: {r:.3f}" for s, r in ratios) +
             f"; mean {np.mean([r for _, r in ratios]):.3f} (target ≥ 0.75)" if ratios
             else "not run")]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="runs/mm_ablation")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--epochs", type=int, default=30)  # round 4 (was 20 through round 3)
  p.add_argument("--eval-split", default="test", choices=("test", "val", "voices"))
  p.add_argument("--arms", default="", help="comma-separated arm names (default: all)")
  p.add_argument("--shard", default="0/1", help="i/n: run every n-th run starting at i")
  p.add_argument("--override", action="append", default=[], help="extra config override k=v")
  p.add_argument("--report", action="store_true")
  a = p.parse_args(argv)
  seeds = [int(s) for s in a.seeds.split(",")]
  by_name = {x[0]: x for x in ARMS}
  arms = [by_name[n] for n in a.arms.split(",")] if a.arms else list(ARMS)  # in the given order
  i, n = map(int, a.shard.split("/"))
  if not a.report:
    from ds_jax import multimodal_train as T
    T.enable_compile_cache()
    # seed-major: every arm's first seed finishes before any arm's second one
    todo = [(s, arm) for s in seeds for arm in arms][i::n]
    for s, (name, arg, _) in todo:
      wd = os.path.join(a.out, name, f"seed{s}")
      if os.path.exists(os.path.join(wd, "eval.json")):
        continue
      t0 = time.time()
      r = run_one(arg, s, wd, a)
      print(f"{name} seed {s}: " + " ".join(f"{k}={r[k]:.3f}" for k, _ in COLUMNS) +
            f" ({time.time() - t0:.0f} s)", flush=True)
  md = report(a, seeds)
  with open(os.path.join(a.out, "ablation.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
