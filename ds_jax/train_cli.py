"""`ds-jax train` and `ds-jax eval`.

  ds-jax train --config experiments/tiny_lm.py[:arg] [--config.model.hidden_size=128 ...]
               --workdir DIR [--init-from W] [--no-progress]
  ds-jax eval  --workdir DIR [--eval-steps N]

Rerunning `train` with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ds_jax import config as cfglib


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit code 2, no usage dump
    from ds_jax.cli import UsageError
    raise UsageError(message)


def parse_train_args(argv: Sequence[str]):
  """Split `--config.a.b=v` overrides from the ordinary options."""
  overrides, rest = [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config."):
      if "=" not in a:
        nxt = next(it, None)
        if nxt is None:
          raise cfglib.ConfigError(a[len("--config."):], "override needs a value")
        a = f"{a}={nxt}"
      overrides.append(a[2:])
    else:
      rest.append(a)
  p = _Parser(prog="ds-jax train")
  p.add_argument("--config", required=True, help="experiments/<name>.py[:arg]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--init-from", default="", help="a ds_jax workdir whose parameters to start from")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(rest)
  return args, overrides


def train_main(argv: Sequence[str]) -> int:
  args, overrides = parse_train_args(argv)
  cfg = cfglib.load_config(args.config, overrides)
  import jax
  from ds_jax import sharding
  sharding.initialize()
  if cfg.get("task", "lm") == "multimodal":  # tri-modal alignment has its own loop
    from ds_jax.multimodal_train import train as train_multimodal
    train_multimodal(cfg, args.workdir)
    return 0
  cfglib.validate(cfg, jax.device_count())  # before anything compiles
  init_params = None
  if args.init_from:
    from ds_jax.convert.cli import load_params  # converted (W/params) or trained workdirs
    init_params = load_params(args.init_from)
  from ds_jax.loop import train
  out = train(cfg, args.workdir, progress=not args.no_progress, init_params=init_params)
  m = out["metrics"]
  if jax.process_index() == 0:
    print(f"step {int(m.get('step', 0))}: loss {m.get('loss', float('nan')):.4f}  "
          f"val_loss {m.get('val_loss', float('nan')):.4f}  "
          f"tokens/s {m.get('tokens_per_s', 0):.0f}  mfu {m.get('mfu', 0):.1%}")
    print(f"workdir: {os.path.abspath(args.workdir)}")
  return 0


def eval_main(argv: Sequence[str]) -> int:
  p = _Parser(prog="ds-jax eval")
  p.add_argument("--workdir", required=True)
  p.add_argument("--eval-steps", type=int, default=0)
  args = p.parse_args(list(argv))
  from ds_jax import checkpoint as ckpt
  d = ckpt.read_config(args.workdir)
  if d is None:
    from ds_jax.cli import UsageError
    raise UsageError(f"--workdir {args.workdir}: no config.json (not a ds_jax workdir)")
  cfg = cfglib.from_json_dict(d)
  if args.eval_steps:
    cfglib.apply_override(cfg, f"eval_steps={args.eval_steps}")
  import jax
  from ds_jax import sharding as shd
  from ds_jax.data.text import TextData
  from ds_jax.train import Trainer
  mc = cfglib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  trainer = Trainer(cfg, mc, mesh)
  mngr = ckpt.manager(args.workdir, cfg.checkpoint.keep,
                      directory=cfg.checkpoint.get("directory", ""))
  step, state = ckpt.restore_latest(mngr, trainer.abstract_state)
  if state is None and os.path.isdir(os.path.join(args.workdir, "params")):
    from ds_jax.convert.cli import load_params  # a workdir written by `ds-jax convert`
    step, state = 0, trainer.init_state(load_params(args.workdir))
  if state is None:
    from ds_jax.cli import UsageError
    raise UsageError(f"--workdir {args.workdir}: no checkpoint to evaluate")
  data = TextData(cfg)
  ev = trainer.evaluate(state, (data.eval_batch(k) for k in range(cfg.eval_steps)))
  print(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
  return 0


if __name__ == "__main__":
  from ds_jax.cli import main
  sys.exit(main(["train"] + sys.argv[1:]))
