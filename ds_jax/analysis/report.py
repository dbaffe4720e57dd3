"""`ds-jax analyze`: print the parameter, FLOP and memory accounting of an experiment config.

    ds-jax analyze --config experiments/deepseek_v2.py [--seq_len 4096] [--group_size 128]
                   [--json] [--config.model.num_hidden_layers=30 ...]
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from ds_jax.analysis.cost import summary
from ds_jax.config import ModelConfig, load_config, model_config


def human(x: float, unit: str = "") -> str:
  """1234567 -> '1.23M'; bytes use binary units (GiB)."""
  if unit == "B":
    for u, s in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
      if abs(x) >= s:
        return f"{x / s:.2f} {u}"
    return f"{x:.0f} B"
  for u, s in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(x) >= s:
      return f"{x / s:.3g}{u}{unit}"
  return f"{x:.3g}{unit}"


def format_summary(mc: ModelConfig, seq_len: int, s: dict[str, Any]) -> str:
  """A readable two-column table of `cost.summary`."""
  p, f, w, a, kv = s["params"], s["flops"], s["weights"], s["activations"], s["kv_cache"]
  rows: list[tuple[str, str]] = [
      ("model", f"{mc.model_type}, {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, "
                f"{mc.attention_type}" + (f", {mc.n_routed_experts} experts top-"
                                          f"{mc.num_experts_per_tok}" if mc.is_moe else "")),
      ("parameters, total", f"{p['total']:,} ({human(p['total'])})"),
      ("parameters, active/token", f"{p['active']:,} ({human(p['active'])}, embedding excluded)"),
      ("  embedding / head", f"{human(p['embedding'])} / {human(p['head'])}"),
      ("  attention", human(p["attention"])),
      ("  dense MLP", human(p["dense_mlp"])),
      ("  routed / shared experts", f"{human(p['routed_experts'])} / {human(p['shared_experts'])}"),
      ("  router / norms", f"{human(p['router'])} / {human(p['norms'])}"),
  ]
  if p["mtp"]:
    rows.append(("  MTP modules (not in total)", f"{human(p['mtp'])}; with MTP "
                                                 f"{human(p['total_with_mtp'])}"))
  rows += [
      (f"FLOPs/token forward @ {seq_len}", f"{human(f['forward'])} (attention "
                                            f"{100 * f['attention'] / f['forward']:.1f}%)"),
      (f"FLOPs/token train @ {seq_len}", human(f["train"]) + " (3x forward"
       + (" incl. MTP)" if f["mtp_forward"] else ")")),
      ("weights f32 / bf16", f"{human(w['float32'], 'B')} / {human(w['bfloat16'], 'B')}"),
      ("weights int8 / int4", f"{human(w['int8'], 'B')} / {human(w['int4'], 'B')}"),
      ("", f"(int8 per-channel, int4 group {s['group_size']}; bf16 scales, embedding, norms)"),
      ("AdamW train state (f32)", human(s["train_state"]["total"], "B")
       + " (params, grads, mu, nu)"),
      (f"activations/token @ {seq_len}", f"{human(a['no_remat'], 'B')} no remat, "
                                          f"{human(a['full_remat'], 'B')} full remat, "
                                          f"+{human(a['logits'], 'B')} logits (estimate)"),
      ("KV cache/token", f"{kv['values']:,} values = {human(kv['bytes'], 'B')} bf16"
       + (f" (decompressed: {human(kv['decompressed_bytes'], 'B')})"
          if mc.attention_type == "mla" else "")),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cli(argv: Sequence[str]) -> int:
  """Entry point of `ds-jax analyze`; returns the exit code."""
  ap = argparse.ArgumentParser(prog="ds-jax analyze", description=__doc__.strip().splitlines()[0])
  ap.add_argument("--config", required=True, help="experiments/X.py[:arg]")
  ap.add_argument("--seq_len", type=int, default=0, help="context length (default: config's)")
  ap.add_argument("--group_size", type=int, default=128, help="int4 quantization group size")
  ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
  args, rest = ap.parse_known_args(list(argv))
  overrides = []
  for r in rest:
    if not r.startswith("--config."):
      ap.error(f"unrecognised argument {r!r}")
    overrides.append(r[2:])
  cfg = load_config(args.config, overrides)
  mc = model_config(cfg.model)
  seq_len = args.seq_len or int(cfg.seq_len)
  s = summary(mc, seq_len, args.group_size)
  if args.json:
    print(json.dumps(s, indent=1))
  else:
    print(format_summary(mc, seq_len, s))
  return 0
