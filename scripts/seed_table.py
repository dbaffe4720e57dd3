"""Recompute the seed's comparison of DeepSeek-V2, Llama 3 70B, Falcon 180B and Mixtral 8x22B.

    python scripts/seed_table.py                    # print the Markdown tables
    python scripts/seed_table.py --write docs/analysis.md   # replace the marked block there

Every number comes from ds_jax.analysis applied to the experiment configs (published shapes), and
the published training-token counts below. Runs in about a second; no device needed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ds_jax import analysis
from ds_jax.config import load_config, model_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

# name, experiment, published training tokens (None: not published), pre-training sequence
# length and where both come from.
MODELS = [
    ("DeepSeek-V2", "deepseek_v2", 8.1e12, 4096, "DeepSeek-V2 paper: 8.1T tokens, 4k sequences"),
    ("Llama 3 70B", "llama3_70b", 15e12, 8192, "Llama 3 paper: 15T tokens, 8k sequences"),
    ("Falcon 180B", "falcon_180b", 3.5e12, 2048, "Falcon-180B model card: 3.5T tokens, 2k"),
    ("Mixtral 8x22B", "mixtral_8x22b", None, 4096,
     "tokens not published; 4k sequence assumed"),
]
KV_CONTEXT = 32768  # context length for the KV-cache column
HBM_BYTES_PER_S = 3.35e12  # H100 SXM HBM3 bandwidth (NVIDIA datasheet), for the decode bound
START, END = "<!-- seed_table:start -->", "<!-- seed_table:end -->"


def falcon_exact_params(mc) -> int:
  """Falcon-180B as published: fused QKV, GELU MLP of 4*hidden (2 matrices), LayerNorms with bias
  (two per layer + final), tied embedding; ds_jax's config approximates it with SwiGLU."""
  d, v, n = mc.hidden_size, mc.vocab_size, mc.num_hidden_layers
  h, g, k = mc.num_attention_heads, mc.num_key_value_heads, mc.head_size
  layer = d * (h + 2 * g) * k + h * k * d + 2 * d * 4 * d + 2 * 2 * d
  return v * d + n * layer + 2 * d


def rows() -> list[dict]:
  out = []
  for label, exp, tokens, seq, source in MODELS:
    mc = model_config(load_config(os.path.join(ROOT, "experiments", exp + ".py")).model)
    p = analysis.count_params(mc)
    f = analysis.flops_per_token(mc, seq)
    kv = analysis.kv_cache_per_token(mc)
    bf16 = analysis.weight_bytes(mc, "bfloat16")
    int4 = analysis.weight_bytes(mc, "int4", 128)
    # Batch-1 decode reads every active weight (bf16) and the KV cache once per token.
    decode_bytes = 2 * (p["active"] + p["embedding"] / mc.vocab_size) + kv["bytes"] * KV_CONTEXT
    out.append(dict(
        label=label, exp=exp, tokens=tokens, seq=seq, source=source, total=p["total"],
        active=p["active"], train_fpt=f["train"], six_n=6 * p["active"],
        train_total=f["train"] * tokens if tokens else None,
        six_nt=6 * p["active"] * tokens if tokens else None,
        bf16=bf16, int4=int4, kv_token=kv["bytes"], kv_ctx=kv["bytes"] * KV_CONTEXT,
        decode_ms=1e3 * decode_bytes / HBM_BYTES_PER_S,
        falcon_exact=falcon_exact_params(mc) if mc.model_type == "falcon" else None))
  return out


def _e(x) -> str:
  return "n/p" if x is None else f"{x:.2e}"


def markdown(rs: list[dict]) -> str:
  gib = 2 ** 30
  lines = [
      "| model | total params | active params | train FLOPs/token (at seq) | 6·N_active |"
      " tokens | train FLOPs total | 6·N_active·T | weights bf16 | weights int4 g128 |"
      f" KV cache/token bf16 | KV at {KV_CONTEXT // 1024}k ctx | decode bound, batch 1 |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rs:
    tokens = "n/p" if r["tokens"] is None else f"{r['tokens'] / 1e12:g}T"
    lines.append(
        f"| {r['label']} | {r['total'] / 1e9:.1f}B | {r['active'] / 1e9:.1f}B | "
        f"{r['train_fpt'] / 1e9:.0f} GF ({r['seq']}) | {r['six_n'] / 1e9:.0f} GF | "
        f"{tokens} | "
        f"{_e(r['train_total'])} | {_e(r['six_nt'])} | {r['bf16'] / gib:.0f} GiB | "
        f"{r['int4'] / gib:.0f} GiB | {r['kv_token'] / 1024:.1f} KiB | "
        f"{r['kv_ctx'] / gib:.2f} GiB | {r['decode_ms']:.1f} ms |")
  notes = [
      "",
      "Sources and conventions: " + "; ".join(f"{r['label']}: {r['source']}" for r in rs) + ".",
      "Active parameters exclude the embedding table (one row is read per token) and include the "
      "output head. Train FLOPs/token = 3 × (matmuls + attention scores over the full context); "
      "6·N_active omits attention. KV cache: GQA 2·G·head_dim per layer, MLA "
      "kv_lora_rank + qk_rope_head_dim per layer. Decode bound: bytes of bf16 active weights plus "
      f"a {KV_CONTEXT // 1024}k-token KV cache read once per token at {HBM_BYTES_PER_S / 1e12:.2f}"
      " TB/s (one H100 SXM; divide by the number of devices holding the weights), batch 1 — a "
      "lower bound on latency, not a measurement. n/p: not published.",
  ]
  for r in rs:
    if r["falcon_exact"]:
      notes.append(f"Falcon 180B with its exact published layer (GELU MLP 4·hidden, LayerNorm "
                   f"biases): {r['falcon_exact']:,} parameters; the ds_jax SwiGLU approximation "
                   f"in the table: {r['total']:,} "
                   f"({100 * (r['total'] / r['falcon_exact'] - 1):+.4f}%).")
  return "\n".join(lines + notes)


# experiment, published total, published active (None: dense), where the figures come from.
PUBLISHED = [
    ("deepseek_v2_lite", 15.7e9, 2.4e9, "DeepSeek-V2 paper"),
    ("deepseek_v2", 236e9, 21e9, "DeepSeek-V2 paper"),
    ("deepseek_v3", 671e9, 37e9, "DeepSeek-V3 report (without the MTP module)"),
    ("mixtral_8x22b", 141e9, 39e9, "Mistral AI"),
    ("llama3_70b", 70.6e9, None, "Meta (HF model card)"),
    ("falcon_180b", 180e9, None, "TII (HF model card)"),
]


def published_table() -> str:
  """Computed totals/actives beside the published ones, with the relative difference."""
  lines = ["| config | total (computed) | published | diff | active (computed) | published | "
           "diff | source |", "|---|---|---|---|---|---|---|---|"]
  for exp, total, active, source in PUBLISHED:
    mc = model_config(load_config(os.path.join(ROOT, "experiments", exp + ".py")).model)
    p = analysis.count_params(mc)
    act = (f"{p['active'] / 1e9:.3f}B | {active / 1e9:g}B | "
           f"{100 * (p['active'] / active - 1):+.2f}%"
           if active else f"{p['active'] / 1e9:.3f}B | – | –")
    lines.append(f"| {exp} | {p['total'] / 1e9:.3f}B | {total / 1e9:g}B | "
                 f"{100 * (p['total'] / total - 1):+.2f}% | {act} | {source} |")
  return "\n".join(lines)


def claims_table() -> str:
  """Left for the lead: the seed's claimed figures are not available to this script."""
  return "\n".join([
      "",
      "| quantity | computed here (table above) | seed's claim (to fill) | agrees? |",
      "|---|---|---|---|",
      "| training FLOPs, DeepSeek-V2 vs Llama 3 70B (total) | | | |",
      "| training FLOPs/token, MoE vs dense | | | |",
      "| weight memory bf16 / int4 | | | |",
      "| KV cache per token, MLA vs GQA | | | |",
      "| active parameters | | | |",
      "| latency | | | |",
  ])


def write_block(path: str, text: str) -> None:
  """Replace the text between the seed_table markers in `path` (append the block if absent)."""
  block = f"{START}\n{text}\n{END}"
  old = open(path).read() if os.path.exists(path) else ""
  if START in old and END in old:
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
  else:
    new = old + ("\n" if old else "") + block + "\n"
  with open(path, "w") as f:
    f.write(new)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
  ap.add_argument("--write", default="", help="Markdown file whose marked block to replace")
  args = ap.parse_args(argv)
  text = (published_table() + "\n\n" + markdown(rows()) + "\n" + claims_table())
  if args.write:
    write_block(args.write, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
