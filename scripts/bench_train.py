"""Whole train step of `bench_dsv2_tiny`: ds_jax vs transformers' PyTorch DeepseekV2ForCausalLM.

  python scripts/bench_train.py [--steps 20] [--threads 2] [--config experiments/bench_dsv2_tiny.py]
                                [--skip-torch] [--config.model.moe_dispatch=capacity ...]
                                [--platform cpu|gpu|tpu] [--dtype float32|bfloat16]
                                [--profile-torch]

Both sides run forward + backward + AdamW on the same shape, batch and sequence, one process, in
this one run; the device's matmul peak in the compute dtype is measured in the same run and MFU
is reported against it (FLOPs per token from `ds_jax.analysis`). The defaults are the CPU
benchmark of docs/benchmarks.md (float32, `--threads` CPU threads). `--platform gpu` runs JAX on
the GPU and transformers on CUDA; `--dtype bfloat16` is mixed precision on both sides (ds_jax:
float32 parameters, bfloat16 compute, `model.dtype`; torch: `torch.autocast`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set_platform(platform: str) -> None:
  """Pin JAX to `platform` before it is imported (XLA:CPU uses every core of the machine; torch
  is given `--threads`)."""
  if platform != "auto":
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(platform, platform)


def bench_ds_jax(cfg, steps: int) -> dict:
  import jax
  from ds_jax import config as cfglib
  from ds_jax import sharding as shd
  from ds_jax.data.text import PackedText
  from ds_jax.train import Trainer
  import numpy as np
  cfg.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  mc = cfglib.validate(cfg, 1)
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, 1), jax.devices()[:1])
  tr = Trainer(cfg, mc, mesh)
  state = tr.init_state()
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, mc.vocab_size, size=200_000).astype(np.int32)
  data = PackedText(tokens, cfg.seq_len)
  t0 = time.perf_counter()
  state, m = tr.step(state, data.train_batch(0, 0, cfg.batch_size))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for s in range(1, steps + 1):
    batch = data.train_batch(0, s, cfg.batch_size)
    t = time.perf_counter()
    state, m = tr.step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {"step_s": statistics.median(times), "compile_s": compile_s,
          "loss": float(m["loss"])}


def bench_torch(mc, batch: int, seq: int, steps: int, threads: int, device: str = "cpu",
                dtype: str = "float32", profile: bool = False) -> dict:
  import contextlib
  import torch
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  hf = DeepseekV2Config(
      vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
      intermediate_size=mc.intermediate_size, moe_intermediate_size=mc.moe_intermediate_size,
      num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
      num_key_value_heads=mc.num_attention_heads, n_shared_experts=mc.n_shared_experts,
      n_routed_experts=mc.n_routed_experts, num_experts_per_tok=mc.num_experts_per_tok,
      first_k_dense_replace=mc.first_k_dense_replace, kv_lora_rank=mc.kv_lora_rank,
      q_lora_rank=mc.q_lora_rank or None, qk_rope_head_dim=mc.qk_rope_head_dim,
      qk_nope_head_dim=mc.qk_nope_head_dim, v_head_dim=mc.v_head_dim,
      topk_method="greedy", norm_topk_prob=mc.norm_topk_prob,
      routed_scaling_factor=mc.routed_scaling_factor, max_position_embeddings=1024,
      n_group=1, topk_group=1, tie_word_embeddings=False)
  model = DeepseekV2ForCausalLM(hf).float().train().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  ids = torch.randint(0, mc.vocab_size, (batch, seq)).to(device)
  cast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16"
          else contextlib.nullcontext())

  def step():
    opt.zero_grad(set_to_none=True)
    with cast:
      out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    return float(out.loss)

  step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  if profile:  # where torch's step goes: its ops by self time, over 3 more steps
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
      for _ in range(3):
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"experts implementation: {getattr(model.config, '_experts_implementation', None)}")
  return {"step_s": statistics.median(times), "loss": loss}


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="experiments/bench_dsv2_tiny.py")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "tpu", "auto"),
                 help="JAX platform; torch runs on CUDA when gpu (default cpu)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of both sides (parameters stay float32)")
  p.add_argument("--profile-torch", action="store_true",
                 help="also print torch's op profile (self time) over 3 extra steps")
  args, rest = p.parse_known_args()
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --config.KEY=VALUE)")
  overrides = [a[2:] for a in rest] + [f"model.dtype={args.dtype}"]
  _set_platform(args.platform)
  from ds_jax import analysis
  from ds_jax import config as cfglib
  from ds_jax.metrics import measure_peak_flops
  cfg = cfglib.load_config(args.config, overrides)
  mc = cfglib.model_config(cfg.model)
  tokens = cfg.batch_size * cfg.seq_len
  fpt = analysis.flops_per_token(mc, cfg.seq_len)["train"]
  import jax
  peak = measure_peak_flops(dtype=args.dtype)
  short = {"float32": "f32", "bfloat16": "bf16"}[args.dtype]
  ours = bench_ds_jax(cfg, args.steps)
  rows = [(f"ds_jax (jit, {short})", ours["step_s"])]
  theirs = None
  if not args.skip_torch:
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    theirs = bench_torch(mc, cfg.batch_size, cfg.seq_len, args.steps, args.threads, device,
                         args.dtype, args.profile_torch)
    rows.append((f"transformers DeepseekV2ForCausalLM (torch {device}, {short})",
                 theirs["step_s"]))
  print(f"config {args.config}: batch {cfg.batch_size} x seq {cfg.seq_len} = {tokens} tokens/step,"
        f" {fpt / 1e6:.1f} MFLOP/token (train), {short} matmul peak {peak / 1e9:.1f} GFLOP/s"
        f" ({jax.default_backend()}: {jax.devices()[0].device_kind})")
  print(f"{'system':<54} {'step ms':>9} {'tokens/s':>10} {'MFU':>7}")
  for name, s in rows:
    print(f"{name:<54} {s * 1e3:9.1f} {tokens / s:10.0f} {fpt * tokens / s / peak:7.1%}")
  if theirs:
    print(f"ds_jax / transformers tokens/s ratio: {theirs['step_s'] / ours['step_s']:.2f}x")
  print(f"(ds_jax compile {ours['compile_s']:.1f} s; medians of {args.steps} steps)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
