"""Generation speed of ds_jax's KV-cache decoder beside transformers' `generate`, same weights.

    python scripts/bench_generate.py [--config experiments/bench_dsv2_tiny.py] [--prompt 128]
                                     [--new 128] [--batches 1,16] [--iters 3] [--no-hf]

For each batch size: prefill tokens/s (one forward over B x prompt tokens that fills the cache),
first-token latency (prompt ids in, first generated token out: generate with max_new_tokens=1),
and decode tokens/s = B (new - 1) / (T(new) - T(1)) — the same definitions for both
implementations, greedy, no early stop, medians of `--iters` runs after a warm-up (ds_jax's compile
is excluded, as is torch's first-call set-up). The ds_jax weights (random init) are written as a
Hugging Face directory (`ds_jax.convert.hf.save_pretrained`) and loaded by transformers, and the
greedy tokens of both are compared. Last, the KV-cache bytes per token of the MLA model and of a
GQA model of the same width, measured from the cache arrays, against `ds_jax.analysis`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax import config as cfglib
from ds_jax import generate as g
from ds_jax import kv_cache
from ds_jax.analysis import kv_cache_per_token
from ds_jax.models import lm


def _median(fn, iters: int) -> float:
  fn()  # warm-up (compile)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_ds(mc, params, prompts: np.ndarray, new: int, iters: int) -> tuple[dict, np.ndarray]:
  b, p = prompts.shape
  tokens, lengths = jnp.asarray(prompts), jnp.full((b,), p, jnp.int32)
  args = (jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1), g.stop_array([]),
          jnp.int32(0))

  def run(n):
    logits, cache = g.prefill(mc, params, tokens, lengths, cache_len=p + new)
    out, _ = g.decode(mc, params, logits, cache, lengths, jnp.int32(p), *args, max_new=n)
    return jax.block_until_ready(out)

  t_prefill = _median(lambda: jax.block_until_ready(
      g.prefill(mc, params, tokens, lengths, cache_len=p + new)), iters)
  t1, tn = _median(lambda: run(1), iters), _median(lambda: run(new), iters)
  return dict(prefill=b * p / t_prefill, first=t1, decode=b * (new - 1) / (tn - t1)), \
      np.asarray(run(new))


def bench_hf(model, prompts: np.ndarray, new: int, iters: int) -> tuple[dict, np.ndarray]:
  import torch
  b, p = prompts.shape
  ids = torch.tensor(prompts, dtype=torch.long)

  def run(n):
    with torch.no_grad():
      return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)

  def forward():
    with torch.no_grad():
      model(ids, use_cache=True)

  t_prefill = _median(forward, iters)
  t1, tn = _median(lambda: run(1), iters), _median(lambda: run(new), iters)
  return dict(prefill=b * p / t_prefill, first=t1, decode=b * (new - 1) / (tn - t1)), \
      run(new)[:, p:].numpy()


def cache_bytes(mc) -> tuple[float, float]:
  """(bytes/token measured from a real prefill cache, analysis formula) in the model dtype."""
  params = lm.init(mc, jax.random.key(0))
  _, cache = g.prefill(mc, params, jnp.ones((2, 8), jnp.int32), jnp.full((2,), 8, jnp.int32),
                       cache_len=16)
  return kv_cache.cache_bytes_per_token(mc, cache), kv_cache_per_token(mc, mc.dtype)["bytes"]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="experiments/bench_dsv2_tiny.py")
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--no-hf", action="store_true")
  ap.add_argument("--torch-threads", default="1,2",
                  help="transformers runs once per thread count (OpenMP spin-waits make 2 threads "
                       "slower than 1 on a shared 2-core machine)")
  a = ap.parse_args()
  mc = cfglib.model_config(cfglib.load_config(a.config).model)
  params = lm.init(mc, jax.random.key(0))
  hf_model = None
  if not a.no_hf:
    import torch
    import transformers
    from ds_jax.convert.hf import save_pretrained
    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    save_pretrained(mc, params, tmp)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, attn_implementation="eager", dtype=torch.float32).eval()
    print(f"transformers {transformers.__version__} ({type(hf_model).__name__}), torch "
          f"{torch.__version__}")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; prompt {a.prompt}, "
        f"{a.new} new tokens, greedy, median of {a.iters}")
  print(f"{'batch':>5} {'impl':<16} {'prefill tok/s':>14} {'first token ms':>15} "
        f"{'decode tok/s':>13}")
  rng = np.random.default_rng(0)
  for b in (int(x) for x in a.batches.split(",")):
    prompts = rng.integers(0, mc.vocab_size, (b, a.prompt)).astype(np.int32)
    rows = [("ds_jax", *bench_ds(mc, params, prompts, a.new, a.iters))]
    if hf_model is not None:
      import torch
      for n in (int(x) for x in a.torch_threads.split(",")):
        torch.set_num_threads(n)
        rows.append((f"transformers/{n}t", *bench_hf(hf_model, prompts, a.new, a.iters)))
    for name, r, _ in rows:
      print(f"{b:>5} {name:<16} {r['prefill']:>14,.0f} {r['first'] * 1e3:>15,.1f} "
            f"{r['decode']:>13,.0f}")
    if len(rows) > 1:
      best = max(rows[1:], key=lambda r: r[1]["decode"])
      same = rows[0][2] == best[2]
      print(f"      decode speed-up over the best transformers row "
            f"{rows[0][1]['decode'] / best[1]['decode']:.1f}x; greedy tokens identical in "
            f"{same.all(axis=1).sum()}/{b} rows ({same.mean():.1%} of tokens)")
  gqa = mc.replace(attention_type="gqa", num_key_value_heads=mc.num_attention_heads,
                   head_dim=mc.hidden_size // mc.num_attention_heads)
  for name, m in (("MLA", mc), (f"GQA (G={gqa.num_key_value_heads}, K={gqa.head_size})", gqa)):
    measured, formula = cache_bytes(m)
    print(f"KV cache {name}: {measured:,.0f} bytes/token measured from the arrays, "
          f"{formula:,.0f} by ds_jax.analysis ({m.dtype})")


if __name__ == "__main__":
  main()
