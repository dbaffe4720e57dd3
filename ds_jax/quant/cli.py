"""`ds-jax quantize`: round-to-nearest post-training quantization of a workdir's latest checkpoint.

    ds-jax quantize --workdir W --bits 4 --group-size 128 --out Q

reads `W/config.json` and the newest orbax checkpoint under `W/checkpoints/`, and writes `Q/`:
`model.safetensors` (format in `ds_jax.quant.pack`), `quant.json` (its metadata) and `config.json`
(the experiment config, with the quant section filled in) so `load_packed(Q)` + the model config
rebuild the model. Prints the true bytes on disk and their ratio to float32.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from ds_jax.quant.config import QuantConfig, quant_config
from ds_jax.quant.fake import quantized_paths
from ds_jax.quant.pack import file_bytes, quantize_params, save_packed


def _usage_error(msg: str) -> Exception:
  from ds_jax.cli import UsageError
  return UsageError(msg)


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    raise _usage_error(f"quantize: {message}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = _Parser(prog="ds-jax quantize", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints)")
  p.add_argument("--out", required=True, help="output directory for the packed model")
  p.add_argument("--bits", type=int, default=4, choices=(4, 8))
  p.add_argument("--group-size", type=int, default=128, help="0: per output channel")
  p.add_argument("--asymmetric", action="store_true", help="min/max grid with zero points")
  p.add_argument("--calibration", default="absmax", choices=("absmax", "mse"))
  p.add_argument("--act-bits", type=int, default=0, choices=(0, 4, 8),
                 help="activation bits recorded in the rules (the int8 backend uses >= 8 if 0)")
  p.add_argument("--scale-dtype", default="bfloat16", choices=("bfloat16", "float32"))
  return p.parse_args(list(argv))


def restore_params(workdir: str) -> tuple[dict, Any, int]:
  """(experiment config dict, params, step) of a workdir's newest checkpoint."""
  from ds_jax import checkpoint as ckpt
  import orbax.checkpoint as ocp
  if not os.path.isdir(workdir):
    raise _usage_error(f"no workdir at {workdir}")
  cfg = ckpt.read_config(workdir)
  if cfg is None:
    raise _usage_error(f"{workdir} has no config.json (not a ds_jax workdir)")
  mngr = ckpt.manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise _usage_error(f"{workdir} has no checkpoint under checkpoints/")
  state = mngr.restore(step, args=ocp.args.StandardRestore())
  params = state["params"] if isinstance(state, dict) and "params" in state else state
  if isinstance(state, dict) and state.get("frozen"):
    raise _usage_error(f"{workdir} holds adapters over a frozen base; merge them first")
  return cfg, params, int(step)


def quantize_checkpoint(config: dict, params: Any, out: str, qcfg: QuantConfig,
                        backend: str = "auto") -> dict:
  """Quantize `params` with `qcfg`, write the export to `out`; returns a size report."""
  params = jax.tree.map(np.asarray, params)
  paths = quantized_paths(params, qcfg)
  if not paths:
    raise _usage_error("no parameter matched a quantizing rule")
  leaves = {p: v for p, v in _flat(params).items() if p in paths}
  qparams = quantize_params(params, qcfg, backend=backend)
  model = json.dumps(config.get("model", {}), sort_keys=True)
  path = save_packed(out, qparams, qcfg, {"model_config": model})
  config = dict(config)
  config["quant"] = json.loads(qcfg.to_json())
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  n_q = sum(v.size for v in leaves.values())
  all_f32 = sum(4 * np.asarray(v).size for v in _flat(params).values())
  total = file_bytes(path)
  return dict(tensors=len(paths), quantized_params=int(n_q), file_bytes=int(total),
              float32_bytes=int(all_f32), ratio=total / all_f32, path=path)


def _flat(tree: Any) -> dict[str, Any]:
  from ds_jax.quant.config import path_str
  return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def cli(argv: Optional[Sequence[str]] = None) -> int:
  a = parse_args(argv or [])
  if a.group_size < 0:
    raise _usage_error(f"quantize: --group-size must be >= 0; got {a.group_size}")
  cfg, params, step = restore_params(a.workdir)
  qcfg = quant_config(a.bits, a.group_size, symmetric=not a.asymmetric,
                      calibration=a.calibration, act_bits=a.act_bits,
                      scale_dtype=a.scale_dtype)
  try:
    r = quantize_checkpoint(cfg, params, a.out, qcfg)
  except ValueError as e:  # e.g. a contraction axis not divisible by the group size
    raise _usage_error(f"quantize: {e}") from None
  print(f"step {step}: {r['tensors']} tensors ({r['quantized_params']:,} parameters) -> int"
        f"{a.bits} g{a.group_size}; {r['path']}: {r['file_bytes']:,} bytes = {r['ratio']:.3f}x "
        f"the float32 parameters ({r['float32_bytes']:,} bytes)")
  return 0
