"""Validation perplexity of the tiny MoE: float32, PTQ W4 g128, QAT W4 g128, QAT W4A8 (+ LSQ).

    python scripts/quant_quality.py --seeds 0,1,2 --out runs/quant_quality
    python scripts/quant_quality.py --sizes      # true bytes on disk per group size / grid

Protocol (see experiments/qat_int4.py): per seed, phase 1 trains `float` for its 400 steps;
phase 2 starts every variant — float too — from that checkpoint and trains FINETUNE_STEPS (300)
more steps on the same next batches (data steps 400...) with the same learning-rate schedule
(FINETUNE_LR 3e-4, cosine to 0), fresh AdamW state. float32 / PTQ are the phase-2 float weights
without / with round-to-nearest absmax W4 g128 (the baseline), so all methods see the same tokens;
"PTQ W4 g128 MSE" (round-to-nearest with MSE-searched clipping) is a diagnostic row showing how much
of the gap the better scales alone recover. QAT arms: MSE scales (the recipe), absmax scales, MSE
+ int8 activations (W4A8), LSQ. Perplexity is over the whole validation split. Each model is
evaluated as fake-quant and as the packed export (`quantize_params`: dequant backend for
weight-only, int8 x int8 dots for W4A8). Gap recovery is paired per seed:
(PTQ - QAT) / (PTQ - float32) with that seed's three numbers.

--finetune-steps / --finetune-schedule change phase 2 for every arm alike (the earlier protocol
was 100 steps, constant); --phase1-cache keeps each seed's phase-1 checkpoint for reruns; seeds
run as separate processes are merged with --report --merge.

Diagnostics written with each row: the training loss of phase 2's first step (all variants start
from the same weights and batch, so QAT's excess over float is the fake-quant effect, i.e. proof
that QAT is on in the step), the float-evaluated perplexity of QAT-trained weights, and the
relative weight quantization error ||Q(w) - w|| / ||w||.

Writes `results.jsonl`, `table.md` and `ppl.png` under --out and prints the table.
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


def _module():
  path = os.path.join(HERE, "..", "experiments", "qat_int4.py")
  spec = importlib.util.spec_from_file_location("qat_int4", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def experiment(arg: str):
  return _module().get_config(arg)


class LSQTask(LMTask):
  """LMTask whose parameters carry LSQ scales (`quant.QSTATE_KEY`), trained by the optimizer."""

  def __init__(self, cfg, mc, qcfg):
    super().__init__(cfg, mc)
    self.qcfg = qcfg

  def init(self, rng):
    from flax import linen as nn
    boxed = dict(super().init(rng))  # scales computed from the unboxed weights, added unboxed
    return {**boxed, quant.QSTATE_KEY: quant.with_qstate(nn.unbox(boxed), self.qcfg)[quant.QSTATE_KEY]}


def train(cfg, data, init_params=None, data_offset: int = 0):
  """(final params, model config, per-step losses, seconds). QAT comes from `cfg.quant` via the
  Trainer (added once, there); LSQ scales ride in the params under `quant.QSTATE_KEY` (as logs)."""
  mc = cfglib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  qcfg = quant.from_config(cfg.quant)
  lsq = qcfg is not None and cfg.quant.calibration == "lsq"
  task = LSQTask(cfg, mc, qcfg) if lsq else LMTask(cfg, mc)
  trainer = Trainer(cfg, mc, mesh, task)
  assert len(task.param_transforms) == (qcfg is not None), task.param_transforms
  if lsq and init_params is not None:
    init_params = quant.with_qstate(init_params, qcfg)
  state = trainer.init_state(init_params)
  losses = []
  t0 = time.perf_counter()
  for step in range(cfg.steps):
    state, metrics = trainer.train_step(state, data.batch(data_offset + step))
    losses.append(float(metrics["loss"]))
    if (step + 1) % cfg.log_every == 0:
      print(f"  step {step + 1}: loss {losses[-1]:.4f} lr {float(metrics['lr']):.2e}", flush=True)
  return jax.device_get(state.params), mc, losses, time.perf_counter() - t0


def perplexity(mc, params, data) -> float:
  """exp(mean NLL) over every window of the validation split, once each."""
  fwd = jax.jit(lambda p, x: Transformer(mc).apply({"params": p}, x)[0])
  nll, count = 0.0, 0.0
  n, bs = data.val.num_windows, data.batch_size
  for k in range(0, n, bs):
    b = data.val.rows(np.arange(k, min(k + bs, n)))
    _, la = lm_loss(fwd(params, jnp.asarray(b["inputs"])), jnp.asarray(b["targets"]),
                    jnp.asarray(b["weights"]))
    nll, count = nll + float(la["nll_sum"]), count + float(la["count"])
  return float(np.exp(nll / max(count, 1.0)))


def weight_error(params, qcfg, qstate=None) -> float:
  """||Q(w) - w|| / ||w|| over all quantized kernels together."""
  fq = quant.fake_quantize(params, qcfg, qstate)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(fq), jax.tree.leaves(params)))
  den = sum(float(jnp.sum(b ** 2)) for p, b in jax.tree_util.tree_leaves_with_path(params)
            if qcfg.rule_for(quant.config.path_str(p)))
  return float(np.sqrt(num / den))


METHODS = {"qat_mse": "QAT W4 g128 MSE", "qat": "QAT W4 g128 absmax",
           "qat_w4a8": "QAT W4A8 g128 MSE", "qat_lsq": "QAT W4 g128 LSQ"}


def phase1(cfg, data, cache: str | None):
  """Phase 1 (float, the config's steps) -> (params, model config, seconds), cached under `cache`
  as a pickle of numpy arrays when given (deterministic per seed, so a cache only saves time)."""
  import pickle
  path = cache and os.path.join(cache, f"phase1_seed{cfg.seed}_{cfg.steps}x{cfg.batch_size}.pkl")
  if path and os.path.exists(path):
    with open(path, "rb") as f:
      base = pickle.load(f)
    return base, cfglib.validate(cfg, jax.device_count()), 0.0
  base, mc, _, secs = train(cfg, data)
  if path:
    os.makedirs(cache, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      pickle.dump(jax.tree.map(np.asarray, base), f)
    os.replace(path + ".tmp", path)
  return base, mc, secs


def run_seed(seed: int, smoke: bool, variants: tuple[str, ...], ft: str = "",
             cache: str | None = None) -> list[dict]:
  """ft: extra phase-2 arguments for experiments/qat_int4.py (e.g. ",steps=300,schedule=cosine")."""
  from ds_jax.data.text import TextData
  sfx = ",smoke" if smoke else ""
  cfg = experiment("float" + sfx)
  cfg.seed = seed
  data = TextData(cfg)
  print(f"seed {seed}: phase 1, float, {cfg.steps} steps", flush=True)
  base, mc, secs1 = phase1(cfg, data, cache)
  q = dict(cfg.quant.to_dict(), enabled=True, calibration="absmax", start_step=0)
  w4 = quant.from_config(dict(q, act_bits=0))
  w4a8 = quant.from_config(dict(q, act_bits=8))
  w4mse = quant.from_config(dict(q, act_bits=0, calibration="mse"))
  ppl = lambda p: perplexity(mc, p, data)
  rows = [dict(seed=seed, method="float32 (phase 1 only)", ppl=ppl(base), steps=cfg.steps,
               train_seconds=round(secs1, 1)),
          dict(seed=seed, method="PTQ W4 g128 (phase 1 only)", ppl=ppl(quant.fake_quantize(base, w4)),
               steps=cfg.steps, weight_error=weight_error(base, w4))]
  for r in rows:
    print("  " + json.dumps(r), flush=True)
  offset = cfg.steps
  for variant in ("float",) + tuple(v for v in variants if v != "float"):
    fcfg = experiment(variant + ",finetune" + ft + sfx)
    fcfg.seed = seed
    print(f"seed {seed}: phase 2, {variant}, {fcfg.steps} steps, {fcfg.optimizer.schedule} lr "
          f"{fcfg.optimizer.learning_rate:g}", flush=True)
    params, _, losses, secs = train(fcfg, data, base, offset)
    r = dict(seed=seed, steps=offset + fcfg.steps, schedule=fcfg.optimizer.schedule,
             train_seconds=round(secs, 1), first_loss=losses[0], last_loss=losses[-1],
             losses=[round(x, 4) for x in losses])
    if variant == "float":
      out = [dict(r, method="float32", ppl=ppl(params)),
             dict(r, method="PTQ W4 g128", ppl=ppl(quant.fake_quantize(params, w4)),
                  packed_ppl=ppl(quant.quantize_params(params, w4, backend="dequant")),
                  weight_error=weight_error(params, w4)),
             dict(r, method="PTQ W4 g128 MSE", ppl=ppl(quant.fake_quantize(params, w4mse)),
                  packed_ppl=ppl(quant.quantize_params(params, w4mse, backend="dequant")),
                  weight_error=weight_error(params, w4mse)),
             dict(r, method="PTQ W4A8 g128", ppl=ppl(quant.qat_params(params, w4a8)),
                  packed_ppl=ppl(quant.quantize_params(params, w4a8, backend="int8")))]
    else:
      qcfg = quant.from_config(fcfg.quant)
      params, qstate = quant.split_qstate(params)
      backend = "int8" if qcfg.rules[-1].act_bits else "dequant"
      out = [dict(r, method=METHODS[variant], ppl=ppl(quant.qat_params(params, qcfg, qstate)),
                  packed_ppl=ppl(quant.quantize_params(params, qcfg, qstate, backend=backend)),
                  float_eval_ppl=ppl(params), weight_error=weight_error(params, qcfg, qstate))]
    for row in out:
      print("  " + json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    rows += out
  return rows


def recoveries(rows: list[dict], method: str) -> list[float]:
  """Per seed (PTQ - x) / (PTQ - float32), paired."""
  by = {(r["seed"], r["method"]): r["ppl"] for r in rows}
  out = []
  for s in sorted({r["seed"] for r in rows}):
    if (s, method) in by:
      f, p = by[(s, "float32")], by[(s, "PTQ W4 g128")]
      out.append((p - by[(s, method)]) / (p - f))
  return out


def table(rows: list[dict]) -> str:
  methods = list(dict.fromkeys(r["method"] for r in rows))
  seeds = sorted({r["seed"] for r in rows})
  by = {(r["seed"], r["method"]): r for r in rows}
  f32 = np.array([by[(s, "float32")]["ppl"] for s in seeds])
  lines = ["| method | val ppl (mean ± std) | packed ppl | retention (float32/x) | "
           "PTQ gap recovered, per seed | mean |", "|---|---|---|---|---|---|"]
  for m in methods:
    p = np.array([by[(s, m)]["ppl"] for s in seeds])
    pk = [by[(s, m)]["packed_ppl"] for s in seeds if "packed_ppl" in by[(s, m)]]
    ret = f"{np.mean(f32 / p) * 100:.2f}%" if "phase 1" not in m else ""
    rec = recoveries(rows, m) if m.startswith("QAT") or m == "PTQ W4 g128 MSE" else []
    per = ", ".join(f"{x * 100:.1f}%" for x in rec)
    mean = f"{np.mean(rec) * 100:.1f}%" if rec else ""
    lines.append(f"| {m} | {p.mean():.4f} ± {p.std():.4f} | "
                 f"{np.mean(pk):.4f} | {ret} | {per} | {mean} |" if pk else
                 f"| {m} | {p.mean():.4f} ± {p.std():.4f} | – | {ret} | {per} | {mean} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Left: per-seed perplexity relative to that seed's float32; right: phase-2 training loss of
  each QAT arm minus float32's on the same batch (the fake-quant penalty as QAT adapts)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = [m for m in dict.fromkeys(r["method"] for r in rows) if "phase 1" not in m]
  seeds = sorted({r["seed"] for r in rows})
  by = {(r["seed"], r["method"]): r for r in rows}
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.2))
  for i, m in enumerate(methods):
    d = [(by[(s, m)]["ppl"] / by[(s, "float32")]["ppl"] - 1) * 100 for s in seeds]
    color = "C0" if m == "float32" else ("C3" if m.startswith("PTQ") else "C2")
    ax.bar(i, np.mean(d), color=color, alpha=0.35 if m == "PTQ W4 g128 MSE" else 0.6)
    ax.scatter([i] * len(d), d, color="k", s=10, zorder=3)
  ax.axhline(1.0, color="gray", ls=":", lw=1)
  ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=7, ha="right")
  ax.set_ylabel("val ppl vs same-seed float32 (%)")
  k = 20
  for i, m in enumerate(x for x in methods if x.startswith("QAT")):
    diff = np.array([np.subtract(by[(s, m)]["losses"], by[(s, "float32")]["losses"])
                     for s in seeds]).mean(0)
    sm = np.convolve(diff, np.ones(k) / k, mode="valid")
    bx.plot(np.arange(len(sm)) + k, sm, color=f"C{i + 1}", label=m, lw=1)
  bx.axhline(0.0, color="gray", ls=":", lw=1)
  bx.set_xlabel(f"phase-2 step ({k}-step mean, mean over seeds)")
  bx.set_ylabel("train loss − float32's (nats)")
  bx.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


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
  p.add_argument("--seeds", default=None,
                 help="default 0,1,2; with --report: only these seeds of the results")
  p.add_argument("--out", default="runs/quant_quality")
  p.add_argument("--variants", default="qat_mse,qat,qat_w4a8,qat_lsq",
                 help="phase-2 QAT variants (float always runs)")
  p.add_argument("--finetune-steps", type=int, default=None,
                 help="phase-2 steps, every arm (default: experiments/qat_int4.py FINETUNE_STEPS)")
  p.add_argument("--finetune-schedule", choices=("constant", "cosine"), default=None,
                 help="phase-2 lr schedule, every arm (default: FINETUNE_SCHEDULE)")
  p.add_argument("--phase1-cache", default=None,
                 help="folder to keep / reuse the phase-1 float checkpoint of each seed")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--sizes", action="store_true", help="only print the on-disk size table")
  p.add_argument("--report", action="store_true", help="only re-make table and plot from --out")
  p.add_argument("--merge", default="",
                 help="with --report: comma-separated folders whose results.jsonl are "
                      "concatenated into --out first (seeds run as separate processes)")
  a = p.parse_args()
  if a.sizes:
    print(sizes())
    return
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "results.jsonl")
  sfx = ""
  if a.report:
    if a.merge:
      merged = [x for d in a.merge.split(",") for x in open(os.path.join(d, "results.jsonl"))]
      with open(path, "w") as f:
        f.writelines(merged)
    rows = [json.loads(x) for x in open(path)]
    if a.seeds is not None:  # a subset: table_seeds0-1-2.md, ppl_seeds0-1-2.png
      sfx = "_seeds" + a.seeds.replace(",", "-")
      keep = {int(x) for x in a.seeds.split(",")}
      rows = [r for r in rows if r["seed"] in keep]
  else:
    rows = []
    ft = "".join(f",{k}={v}" for k, v in (("steps", a.finetune_steps),
                                           ("schedule", a.finetune_schedule)) if v is not None)
    for s in (int(x) for x in (a.seeds or "0,1,2").split(",")):
      rows += run_seed(s, a.smoke, tuple(v for v in a.variants.split(",") if v), ft,
                       a.phase1_cache)
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
  t = table(rows)
  with open(os.path.join(a.out, f"table{sfx}.md"), "w") as f:
    f.write(t + "\n")
  plot(rows, os.path.join(a.out, f"ppl{sfx}.png"))
  print(t)


if __name__ == "__main__":
  main()
