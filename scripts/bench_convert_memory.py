"""Peak memory of HF -> ds_jax conversion on a synthetic multi-shard DeepSeek-V2-style checkpoint.

    python scripts/bench_convert_memory.py [--experts 48] [--shard-mb 100] [--dir /tmp/x]

Writes random float32 tensors one at a time into safetensors shards (never the whole model in
memory), then converts in fresh subprocesses and reports each child's peak RSS (VmHWM) against
its RSS just before converting (JAX and the model code imported), the largest shard and the
output size. Modes: `load` (load_pretrained, host numpy output), `load_jax` (device arrays) and
`save` (save_pretrained of the loaded params back to shards). Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

MB = 2 ** 20


def model_dict(experts: int) -> dict:
  """An HF deepseek_v2 config: 4 layers (1 dense), MLA, `experts` routed experts of width 256."""
  return dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"],
              vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=8, q_lora_rank=None, kv_lora_rank=128,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=experts,
              n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=256,
              first_k_dense_replace=1, topk_method="greedy", max_position_embeddings=1024,
              tie_word_embeddings=False, hidden_act="silu")


def write_checkpoint(path: str, experts: int, shard_mb: int) -> dict:
  from ds_jax.config import model_config
  from ds_jax.convert import hf, hf_params as hp
  from ds_jax.convert.hf_config import from_hf_config
  hfc = model_dict(experts)
  mc = model_config(from_hf_config(hfc))
  shapes = hf.abstract_params(mc)
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  writer = hf.ShardWriter(path, shard_mb * MB)
  for e in hp.param_entries(mc, interleaved=True):
    shape = hp.hf_shape(e, shapes[e.path][len(e.index):])
    writer.add(e.hf, rng.standard_normal(shape, dtype=np.float32) * 0.02)
  files = writer.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hfc, f)
  sizes = [os.path.getsize(os.path.join(path, n)) for n in files]
  return {"shards": len(files), "largest_shard_mb": max(sizes) / MB,
          "checkpoint_mb": sum(sizes) / MB}


CHILD = r"""
import json, os, resource, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, numpy as np
from ds_jax.convert import hf
from ds_jax.models import lm  # noqa: F401  (import cost belongs to the baseline)
def rss(key):
  for line in open("/proc/self/status"):
    if line.startswith(key):
      return int(line.split()[1]) / 1024
mode, src, out = sys.argv[1:4]
if mode == "save":
  mc, params = hf.load_pretrained(src, as_numpy=True)
  base = rss("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (Linux >= 4.0)
    f.write("5")
  hf.save_pretrained(mc, params, out, max_shard_bytes=100 * 2 ** 20)
else:
  base = rss("VmRSS")
  mc, params = hf.load_pretrained(src, as_numpy=(mode == "load"))
  jax.block_until_ready(params)
size = sum(int(np.prod(np.shape(x))) * 4 for x in jax.tree.leaves(params))
print(json.dumps({"mode": mode, "baseline_mb": base, "peak_mb": rss("VmHWM"),
                  "output_mb": size / 2 ** 20}))
"""


def run_child(mode: str, src: str, out: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", CHILD, mode, src, out], capture_output=True,
                     text=True, env=env, timeout=1800)
  if r.returncode:
    raise RuntimeError(r.stderr[-2000:])
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--experts", type=int, default=48)
  p.add_argument("--shard-mb", type=int, default=100)
  p.add_argument("--dir", default="")
  p.add_argument("--modes", default="load,load_jax,save")
  args = p.parse_args(argv)
  root = args.dir or tempfile.mkdtemp(prefix="ds_jax_convert_bench_")
  src = os.path.join(root, "hf")
  info = write_checkpoint(src, args.experts, args.shard_mb)
  results = []
  for mode in args.modes.split(","):
    r = {**info, **run_child(mode, src, os.path.join(root, "out"))}
    budget = 1.5 * r["largest_shard_mb"] + r["output_mb"]
    r["peak_above_baseline_mb"] = r["peak_mb"] - r["baseline_mb"]
    r["budget_mb"] = budget  # the bound: 1.5 x largest shard + output
    r["within_budget"] = r["peak_above_baseline_mb"] <= budget
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}),
          flush=True)
    results.append(r)
  return results


if __name__ == "__main__":
  main()
