"""Apply the round-3 / round-4 selection rule (docs/multimodal.md "Round 3", "Round 4") to
validation-voice runs.

  python scripts/mm_select.py --root runs/mm_r3/val [--base base] [--seeds 0,1]      # round 3
  python scripts/mm_select.py --root runs/mm_r4/val --base utt --seeds 0,1,2         # round 4

Reads `<root>/<name>/softmax/seed<s>/eval.json` for every candidate directory. Score = mean over
the seeds of mean(audio→text zero-shot, image→audio R@1, audio→image R@1); a candidate passes if
its score is >= the base's + 1.0 point and its image→text zero-shot is >= the base's - 1.0 point.
Prints one Markdown table (candidates with every seed finished), the passing candidates, and the
candidates with some but not all seeds finished (these cannot pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SCORE_KEYS = ("zeroshot_audio_text", "R@1_image_audio", "R@1_audio_image")
MARGIN = 1.0  # points


def load(root: str, name: str, seeds, arm: str = "softmax"):
  out = []
  for s in seeds:
    p = os.path.join(root, name, arm, f"seed{s}", "eval.json")
    if not os.path.exists(p):
      return None
    with open(p) as f:
      out.append(json.load(f))
  return out


def summary(runs) -> dict:
  pct = lambda k: 100 * float(np.mean([r[k] for r in runs]))
  score = 100 * float(np.mean([np.mean([r[k] for k in SCORE_KEYS]) for r in runs]))
  return {"score": score, "i2t": pct("zeroshot_image_text"), "a2t": pct("zeroshot_audio_text"),
          "i2a": pct("R@1_image_audio"), "a2i": pct("R@1_audio_image"),
          "per_seed": [round(100 * float(np.mean([r[k] for k in SCORE_KEYS])), 1) for r in runs]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--root", default="runs/mm_r3/val")
  p.add_argument("--base", default="base")
  p.add_argument("--seeds", default="0,1")
  a = p.parse_args(argv)
  seeds = [int(s) for s in a.seeds.split(",")]
  rows, unfinished = {}, []
  for name in sorted(os.listdir(a.root)):
    if not os.path.isdir(os.path.join(a.root, name, "softmax")):
      continue
    runs = load(a.root, name, seeds)
    if runs:
      rows[name] = summary(runs)
    else:
      done = [s for s in seeds if os.path.exists(os.path.join(a.root, name, "softmax", f"seed{s}",
                                                               "eval.json"))]
      unfinished.append(f"{name} (seeds finished: {','.join(map(str, done)) or 'none'})")
  if a.base not in rows:
    print(f"base {a.base!r} not finished for seeds {seeds}")
    return 1
  b = rows[a.base]
  print("| candidate | img→txt ZS | aud→txt ZS | img→aud R@1 | aud→img R@1 | score (per seed) | "
        "passes |")
  print("|---|---|---|---|---|---|---|")
  passing = []
  for name, r in sorted(rows.items(), key=lambda kv: (kv[0] != a.base, -kv[1]["score"])):
    ok = (name != a.base and r["score"] >= b["score"] + MARGIN and r["i2t"] >= b["i2t"] - MARGIN)
    if ok:
      passing.append(name)
    print(f"| {name} | {r['i2t']:.1f} | {r['a2t']:.1f} | {r['i2a']:.1f} | {r['a2i']:.1f} | "
          f"{r['score']:.1f} ({' / '.join(map(str, r['per_seed']))}) | "
          f"{'base' if name == a.base else ('yes' if ok else 'no')} |")
  print(f"\npassing (score >= {b['score']:.1f} + {MARGIN}, img→txt >= {b['i2t']:.1f} - {MARGIN}): "
        + (", ".join(passing) if passing else "none"))
  if unfinished:
    print("unfinished (not judged): " + "; ".join(unfinished))
  return 0


if __name__ == "__main__":
  sys.exit(main())
