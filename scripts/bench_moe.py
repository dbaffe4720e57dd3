"""MoE layer forward+backward time against a dense SwiGLU MLP of the same active FLOPs.

    python scripts/bench_moe.py [--tokens 2048] [--hidden 256] [--active 384] [--iters 5]
                                [--blocks 16,64] [--slow-iters 1] [--dtype float32|bfloat16]
                                [--strategies block_loop,padded_einsum,capacity,ragged_dot,dense_mask]

Prints one table: each MoE shape (fine-grained 64 experts top-6, coarse 8 experts top-2, equal
active width `--active`) under each grouped-matmul strategy, with its time over the dense MLP's
and the fine-grained over coarse ratio for the same strategy. All rows run in the same process,
so the ratios are comparable even when absolute times are noisy. The first line names the
backend and what `moe_matmul="auto"` picks there (block_loop on CPU, ragged_dot elsewhere).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.config import ModelConfig
from ds_jax.nn.mlp import MLP
from ds_jax.nn.moe import MoE


def _time(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _step(module, x):
  """jit(grad) of mean(y^2) wrt params and input: one forward + backward (float32 parameters,
  the module's compute dtype)."""
  params = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.02, s.dtype), params)

  def loss(p, x):
    out = module.apply({"params": p}, x)
    y = (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)
    return jnp.mean(y * y)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def moe_cfg(d: int, e: int, k: int, active: int, **kw) -> ModelConfig:
  return ModelConfig(hidden_size=d, n_routed_experts=e, num_experts_per_tok=k,
                     moe_intermediate_size=active // k, n_shared_experts=0, **kw)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--active", type=int, default=384)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--blocks", default="16,64", help="padded_einsum block sizes")
  p.add_argument("--loop-blocks", default="64,128", help="block_loop block sizes")
  p.add_argument("--slow-iters", type=int, default=1, help="iterations for ragged_dot/dense_mask")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (parameters stay float32)")
  p.add_argument("--strategies", default="block_loop,padded_einsum,capacity,ragged_dot,dense_mask",
                 help="comma-separated subset of the rows to run")
  a = p.parse_args()
  from ds_jax.nn.moe_dispatch import resolve_matmul
  known = ("block_loop", "padded_einsum", "capacity", "ragged_dot", "dense_mask")
  chosen = a.strategies.split(",")
  if any(c not in known for c in chosen):
    p.error(f"--strategies: unknown {[c for c in chosen if c not in known]}; allowed {known}")
  dtype = jnp.dtype(a.dtype)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(a.tokens // 256, 256, a.hidden)), dtype)
  print(f"backend={jax.default_backend()} ({jax.devices()[0].device_kind}) "
        f"devices={jax.device_count()} tokens={a.tokens} hidden={a.hidden} "
        f"active_width={a.active} dtype={a.dtype} iters={a.iters} (median, fwd+bwd); "
        f"moe_matmul=auto picks {resolve_matmul('auto', 64)} here")
  dense = _time(*_step(MLP(a.active, dtype), x), a.iters)
  print(f"{'dense SwiGLU F=' + str(a.active):44s} {dense * 1e3:9.1f} ms   1.00x dense")
  strategies = []
  if "block_loop" in chosen:
    strategies += [("block_loop", int(b), "dropless") for b in a.loop_blocks.split(",")]
  if "padded_einsum" in chosen:
    strategies += [("padded_einsum", int(b), "dropless") for b in a.blocks.split(",")]
  if "capacity" in chosen:
    strategies += [("padded_einsum", 0, "capacity")]
  strategies += [(s, 0, "dropless") for s in ("ragged_dot", "dense_mask") if s in chosen]
  shapes = [("coarse 8e top-2", 8, 2), ("fine 64e top-6", 64, 6)]
  results = {}
  for mm, block, dispatch in strategies:
    for name, e, k in shapes:
      cfg = moe_cfg(a.hidden, e, k, a.active, moe_matmul=mm, moe_block_size=max(block, 1),
                    moe_dispatch=dispatch, capacity_factor=1.25, eval_capacity_factor=1.25,
                    dtype=a.dtype)
      iters = a.slow_iters if mm in ("ragged_dot", "dense_mask") else a.iters
      t = _time(*_step(MoE(cfg), x), iters)
      results[(mm, block, dispatch, e)] = t
      label = f"{name} {mm}" + (f" b={block}" if block else "") + (
          " cap=1.25" if dispatch == "capacity" else "")
      extra = ""
      if e == 64:
        extra = f"   fine/coarse {t / results[(mm, block, dispatch, 8)]:.2f}x"
      print(f"{label:44s} {t * 1e3:9.1f} ms  {t / dense:5.2f}x dense{extra}", flush=True)


if __name__ == "__main__":
  main()
