"""The `ds-jax` command: `ds-jax <subcommand> [args]`; each subcommand lives in its own module.

Config and input errors print one line (`error: ...`) and exit with code 2, no traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> (module, function, one-line help). Functions take argv and return an exit code.
COMMANDS = {
    "train": ("ds_jax.train_cli", "train_main", "train a model from an experiment config"),
    "eval": ("ds_jax.train_cli", "eval_main", "evaluate a workdir's latest checkpoint"),
    "generate": ("ds_jax.generate", "cli", "sample text from a workdir or HF directory"),
    "convert": ("ds_jax.convert.cli", "cli", "convert Hugging Face checkpoints to/from ds_jax"),
    "quantize": ("ds_jax.quant.cli", "cli", "post-training int4/int8 quantization and export"),
    "analyze": ("ds_jax.analysis", "cli", "parameter, FLOP and memory accounting of a config"),
    "zero-shot": ("ds_jax.multimodal_eval", "zero_shot_cli",
                  "zero-shot classification of an audio/image folder"),
}


def usage() -> str:
  lines = ["usage: ds-jax <command> [options]", "", "commands:"]
  for name, (_, _, text) in COMMANDS.items():
    lines.append(f"  {name:<10} {text}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  module, func, _ = COMMANDS[name]
  from ds_jax.config import ConfigError
  try:
    return int(getattr(importlib.import_module(module), func)(rest) or 0)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:  # a run halted on a non-finite step (skip_nonfinite=False)
    print(f"error: {e}", file=sys.stderr)
    return 1


class UsageError(Exception):
  """A bad command line or input file; printed as one line, exit code 2."""


if __name__ == "__main__":
  sys.exit(main())
