"""`make demo`: train the default tiny model on the embedded corpus, evaluate, sample, report.

  python scripts/demo.py --workdir runs/demo [--config experiments/tiny_moe.py] [--config.steps=50]

Rerunning resumes (or, when finished, just evaluates and samples again).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_jax import config as cfglib  # noqa: E402


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default="experiments/tiny_moe.py")
  p.add_argument("--prompt", default="The with statement")
  args, overrides = p.parse_known_args()
  overrides = [o[2:] for o in overrides if o.startswith("--config.")]
  cfg = cfglib.load_config(args.config, overrides)
  from ds_jax.generate import generate_text
  from ds_jax.loop import train
  t = time.time()
  out = train(cfg, args.workdir)
  m = out["metrics"]
  state, data = out["state"], out["data"]
  mc = out["trainer"].mc
  if "loss" in m:
    print(f"\ntrained to step {int(m['step'])} in {time.time() - t:.0f} s: train loss "
          f"{m['loss']:.3f}, {m['tokens_per_s']:.0f} tokens/s, MFU {m['mfu']:.1%}")
  else:
    print(f"\nthe workdir already holds the finished run ({cfg.steps} steps)")
  print(f"validation loss {m['val_loss']:.3f} nats/byte (perplexity {m['val_ppl']:.2f}), "
        f"next-byte accuracy {m['val_accuracy']:.1%}")
  import jax
  params = jax.device_get(state.params)
  text = generate_text(mc, params, data.tokenizer, args.prompt, max_tokens=160,
                       temperature=0.7, seed=cfg.seed)
  print(f"\nsample (temperature 0.7):\n{args.prompt}{text}\n")
  wd = os.path.abspath(args.workdir)
  print(f"workdir: {wd}")
  for name in ("config.json", "metrics.jsonl", "checkpoints", "loss.png", "moe_load.png", "tb"):
    if os.path.exists(os.path.join(wd, name)):
      print(f"  {name}")
  return 0


if __name__ == "__main__":
  from ds_jax.cli import UsageError
  try:
    sys.exit(main())
  except (cfglib.ConfigError, UsageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
