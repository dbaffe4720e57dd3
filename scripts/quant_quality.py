"""Validation perplexity of the tiny MoE: float32, PTQ W4 g128, QAT W4 g128, QAT W4A8; N seeds.

    python scripts/quant_quality.py --seeds 0,1,2 --out runs/quant_quality
    python scripts/quant_quality.py --sizes      # true bytes on disk per group size / grid

Trains `experiments/qat_int4.py:<variant>` with ds_jax's Trainer (QAT = `quant.qat_transform` in
`LMTask.param_transforms`), then evaluates each model both as fake-quant and as the packed
export (`quantize_params`: dequant backend for weight-only, int8 x int8 dots for W4A8). Writes
`results.jsonl`, `table.md` and `ppl.png` under --out and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax import config as cfglib
from ds_jax import quant
from ds_jax import sharding as shd
from ds_jax.losses import lm_loss
from ds_jax.models.lm import Transformer
from ds_jax.train import LMTask, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def experiment(arg: str):
  path = os.path.join(HERE, "..", "experiments", "qat_int4.py")
  spec = importlib.util.spec_from_file_location("qat_int4", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def train(cfg) -> tuple[dict, LMTask, object, float]:
  """(final params, task, data, seconds) of one training run."""
  from ds_jax.data.text import TextData
  mc = cfglib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  task = LMTask(cfg, mc)
  qcfg = quant.from_config(cfg.quant)
  if qcfg is not None:
    task.param_transforms.append(quant.qat_transform(qcfg))
  trainer = Trainer(cfg, mc, mesh, task)
  data = TextData(cfg)
  state = trainer.init_state()
  t0 = time.perf_counter()
  for step in range(cfg.steps):
    state, metrics = trainer.step(state, data.batch(step))
    if (step + 1) % cfg.log_every == 0:
      print(f"  step {step + 1}: loss {float(metrics['loss']):.4f}", flush=True)
  return jax.device_get(state.params), mc, data, time.perf_counter() - t0


def perplexity(mc, params, data, eval_steps: int) -> float:
  fwd = jax.jit(lambda p, x: Transformer(mc).apply({"params": p}, x)[0])
  nll, count = 0.0, 0.0
  for k in range(eval_steps):
    b = data.eval_batch(k)
    _, la = lm_loss(fwd(params, jnp.asarray(b["inputs"])), jnp.asarray(b["targets"]),
                    jnp.asarray(b["weights"]))
    nll, count = nll + float(la["nll_sum"]), count + float(la["count"])
  return float(np.exp(nll / max(count, 1.0)))


def run_seed(seed: int, smoke: bool, steps: int) -> list[dict]:
  rows = []
  for variant in ("float", "qat", "qat_w4a8"):
    cfg = experiment(variant + (",smoke" if smoke else ""))
    cfg.seed = seed
    if steps:
      cfg.steps, cfg.quant.start_step = steps, steps // 2
    print(f"seed {seed} {variant}: training {cfg.steps} steps", flush=True)
    params, mc, data, secs = train(cfg)
    q = cfg.quant.to_dict()
    q["enabled"] = True
    w4 = quant.from_config(dict(q, act_bits=0))
    w4a8 = quant.from_config(dict(q, act_bits=8))
    ppl = lambda p: perplexity(mc, p, data, cfg.eval_steps)
    r = dict(seed=seed, steps=cfg.steps, train_seconds=round(secs, 1))
    if variant == "float":
      rows.append(dict(r, method="float32", ppl=ppl(params)))
      rows.append(dict(r, method="PTQ W4 g128", ppl=ppl(quant.fake_quantize(params, w4)),
                       packed_ppl=ppl(quant.quantize_params(params, w4, backend="dequant"))))
      rows.append(dict(r, method="PTQ W4A8 g128", ppl=ppl(quant.qat_params(params, w4a8)),
                       packed_ppl=ppl(quant.quantize_params(params, w4a8, backend="int8"))))
    elif variant == "qat":
      rows.append(dict(r, method="QAT W4 g128", ppl=ppl(quant.qat_params(params, w4)),
                       packed_ppl=ppl(quant.quantize_params(params, w4, backend="dequant"))))
    else:
      rows.append(dict(r, method="QAT W4A8 g128", ppl=ppl(quant.qat_params(params, w4a8)),
                       packed_ppl=ppl(quant.quantize_params(params, w4a8, backend="int8"))))
    for row in rows[-3 if variant == "float" else -1:]:
      print("  " + json.dumps(row), flush=True)
  return rows


def table(rows: list[dict]) -> str:
  methods = list(dict.fromkeys(r["method"] for r in rows))
  by = {m: [r for r in rows if r["method"] == m] for m in methods}
  f32 = np.array([r["ppl"] for r in by["float32"]])
  ptq = np.array([r["ppl"] for r in by["PTQ W4 g128"]])
  lines = ["| method | val ppl (mean ± std) | packed ppl | retention (float/x) | "
           "PTQ gap recovered |", "|---|---|---|---|---|"]
  for m in methods:
    p = np.array([r["ppl"] for r in by[m]])
    pk = [r["packed_ppl"] for r in by[m] if "packed_ppl" in r]
    ret = np.mean(f32 / p) * 100
    rec = ""
    if m.startswith("QAT"):  # only meaningful where PTQ loses something
      gap = ptq.mean() - f32.mean()
      rec = f"{(ptq.mean() - p.mean()) / gap * 100:.0f}%" if gap > 1e-3 * f32.mean() else "n/a"
    lines.append(f"| {m} | {p.mean():.3f} ± {p.std():.3f} | "
                 f"{np.mean(pk):.3f} | {ret:.2f}% | {rec} |" if pk else
                 f"| {m} | {p.mean():.3f} ± {p.std():.3f} | – | {ret:.2f}% | {rec} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 3.2))
  for i, m in enumerate(methods):
    p = [r["ppl"] for r in rows if r["method"] == m]
    ax.bar(i, np.mean(p), color="C0" if m == "float32" else "C1", alpha=0.6)
    ax.scatter([i] * len(p), p, color="k", s=10, zorder=3)
  ax.set_xticks(range(len(methods)), methods, rotation=15, fontsize=8)
  ax.set_ylabel("validation perplexity")
  lo = min(r["ppl"] for r in rows)
  ax.set_ylim(lo * 0.97, max(r["ppl"] for r in rows) * 1.01)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def sizes() -> str:
  """True file bytes of the int4 export of one [2, 1024, 1024] kernel per setting vs float32."""
  import tempfile
  from safetensors.numpy import save_file
  w = (np.random.default_rng(0).normal(size=(2, 1024, 1024)) * 0.02).astype(np.float32)
  params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.asarray(w)}}}}
  d = tempfile.mkdtemp()
  save_file({"k": w}, f"{d}/f32.safetensors")
  f32 = os.path.getsize(f"{d}/f32.safetensors")
  lines = [f"float32: {f32:,} bytes", "| group | grid | scale dtype | bytes | × float32 | "
           "bits / parameter |", "|---|---|---|---|---|---|"]
  for g in (32, 64, 128, 0):
    for sym, sd in ((True, "bfloat16"), (False, "bfloat16"), (True, "float32"),
                    (False, "float32")):
      q = quant.quant_config(4, g, symmetric=sym, scale_dtype=sd)
      out = f"{d}/q{g}{sym}{sd}"
      path = quant.save_packed(out, quant.quantize_params(params, q, backend="dequant"), q)
      b = quant.file_bytes(path)
      lines.append(f"| {g or 'per channel'} | {'sym' if sym else 'asym'} | {sd} | {b:,} | "
                   f"{b / f32:.3f} | {8 * b / w.size:.3f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--out", default="runs/quant_quality")
  p.add_argument("--steps", type=int, default=0, help="override the experiment's steps")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--sizes", action="store_true", help="only print the on-disk size table")
  a = p.parse_args()
  if a.sizes:
    print(sizes())
    return
  os.makedirs(a.out, exist_ok=True)
  rows = []
  for s in (int(x) for x in a.seeds.split(",")):
    rows += run_seed(s, a.smoke, a.steps)
    with open(os.path.join(a.out, "results.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  t = table(rows)
  with open(os.path.join(a.out, "table.md"), "w") as f:
    f.write(t + "\n")
  plot(rows, os.path.join(a.out, "ppl.png"))
  print(t)


if __name__ == "__main__":
  main()
