"""`ds-jax convert`: Hugging Face model directory <-> ds_jax workdir.

    ds-jax convert --from-hf DIR --workdir OUT [--no-scan-layers]
    ds-jax convert --to-hf --workdir W --out DIR [--dtype bfloat16] [--max-shard-gb 5]

A converted workdir holds `config.json` (the full experiment config: `base_config()` with the
model section filled from the HF config, `data.tokenizer = "hf"` when the directory has a
`tokenizer.json`, which is copied next to it) and `params/`, an orbax StandardCheckpointer save of
the parameter tree. `load_params(W)` reads the parameters of either a converted workdir or a
training workdir's newest checkpoint; `ds-jax train --init-from W` starts from them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Any, Sequence

PARAMS_DIR = "params"


def _usage(msg: str) -> Exception:
  from ds_jax.cli import UsageError
  return UsageError(msg)


def save_params(workdir: str, params: Any) -> str:
  """Write a parameter tree to `W/params/` (orbax StandardCheckpointer); returns the path."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
  if os.path.exists(path):
    shutil.rmtree(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params)
    ckptr.wait_until_finished()
  return path


def load_params(workdir: str) -> Any:
  """Parameters of a converted workdir (`W/params/`) or of a training workdir's newest checkpoint
  (`W/checkpoints/<step>/`, the TrainState's `params` only), as host numpy arrays."""
  path = os.path.abspath(os.path.join(workdir, PARAMS_DIR))
  if os.path.isdir(path):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    from ds_jax.inference import load_params as load_training_params
    return load_training_params(workdir)
  raise _usage(f"{workdir}: neither params/ (converted) nor checkpoints/ (trained) found")


def from_hf(src: str, workdir: str, scan_layers: bool = True) -> str:
  """Convert a Hugging Face model directory into a ds_jax workdir; returns the params path."""
  from ds_jax import checkpoint as ckpt
  from ds_jax.convert import hf
  mc, params = hf.load_pretrained(src, scan_layers=scan_layers, as_numpy=True)
  os.makedirs(workdir, exist_ok=True)
  tok = ""
  if os.path.exists(os.path.join(src, "tokenizer.json")):
    for name in hf.TOKENIZER_FILES:
      if os.path.exists(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(workdir, name))
    tok = os.path.abspath(workdir)
  cfg = hf.experiment_config(mc, tokenizer_path=tok)
  out = save_params(workdir, params)
  ckpt.write_config(workdir, cfg.to_dict())
  return out


def to_hf(workdir: str, out: str, dtype: str = "float32",
          max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Export a ds_jax workdir (converted or trained) as a Hugging Face model directory."""
  from ds_jax import checkpoint as ckpt
  from ds_jax.convert import hf
  d = ckpt.read_config(workdir)
  if d is None:
    raise _usage(f"--workdir {workdir}: no config.json (not a ds_jax workdir)")
  params = load_params(workdir)
  data = d.get("data", {})
  tok = data.get("tokenizer_path", "") if data.get("tokenizer") == "hf" else ""
  return hf.save_pretrained(d["model"], params, out, dtype=dtype,
                            max_shard_bytes=max_shard_bytes, tokenizer_dir=tok)


def cli(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog="ds-jax convert", description=__doc__.split("\n\n")[0])
  p.add_argument("--from-hf", default="", metavar="DIR", help="Hugging Face model directory")
  p.add_argument("--to-hf", action="store_true", help="export --workdir to --out")
  p.add_argument("--workdir", required=True, help="ds_jax workdir (written or read)")
  p.add_argument("--out", default="", help="output Hugging Face directory (with --to-hf)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--max-shard-gb", type=float, default=5.0)
  p.add_argument("--no-scan-layers", action="store_true",
                 help="store layers unstacked (layer_<i>) instead of scanned segments")
  args = p.parse_args(list(argv))
  from ds_jax.convert.hf_config import ConvertError
  try:
    if bool(args.from_hf) == args.to_hf:
      raise _usage("give exactly one of --from-hf DIR or --to-hf")
    if args.from_hf:
      if not os.path.isdir(args.from_hf):
        raise _usage(f"--from-hf {args.from_hf}: not a directory")
      path = from_hf(args.from_hf, args.workdir, scan_layers=not args.no_scan_layers)
      print(f"wrote {os.path.join(args.workdir, 'config.json')} and {path}")
    else:
      if not args.out:
        raise _usage("--to-hf needs --out DIR")
      files = to_hf(args.workdir, args.out, args.dtype, int(args.max_shard_gb * 2 ** 30))
      print(f"wrote {args.out}: config.json, {', '.join(files)}")
  except ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
