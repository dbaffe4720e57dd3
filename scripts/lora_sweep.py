"""LoRA vs full fine-tuning on held-out pydoc topics: pre-train, adapt, compare (issue 7).

  python scripts/lora_sweep.py --out runs/lora_sweep --seeds 0,1,2 [--ranks 1,4,8,64]
                               [--targets qv,all-linear,experts] [--smoke]

Phases: (1) pre-train the tiny MoE of experiments/lora_moe.py on the topics outside the held-out
domain (once, seed 0); (2) for every seed, full fine-tuning and LoRA variants on the held-out
topics from the same pre-trained weights. Reported per run: held-out validation loss before /
after, its improvement, the fraction of the full fine-tuning improvement, trainable parameters,
optimizer-state bytes, adapter file bytes, wall time. Writes `<out>/results.jsonl` and prints a
markdown table. Uses the lead's pure `ds_jax.train.train_step` with a (trainable, frozen) split.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pickle
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax import lora
from ds_jax.config import model_config
from ds_jax.data.text import TextData
from ds_jax.models import lm
from ds_jax.optim import make_optimizer, schedule
from ds_jax.train import LMTask, TrainState, eval_step, train_step

TARGETS = {"qv": ["q_proj", "q_b_proj", "kv_b_proj"], "all-linear": ["all-linear"],
           "experts": ["experts"]}


def load_experiment(arg: str):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "lora_moe.py")
  spec = importlib.util.spec_from_file_location("lora_moe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def evaluate(task: LMTask, state: TrainState, data: TextData, n: int) -> float:
  f = jax.jit(functools.partial(eval_step, task=task))
  nll = count = 0.0
  for k in range(n):
    m = jax.device_get(f(state, data.eval_batch(k)))
    nll, count = nll + float(m["nll_sum"]), count + float(m["count"])
  return nll / max(count, 1.0)


def run(cfg, params: Any, seed: int, lora_cfg: Optional[dict] = None,
        adapter_dir: str = "") -> tuple[dict, Any]:
  """Train cfg.steps steps from `params` (full, or only a LoRA adapter); returns (row, params)."""
  mc = model_config(cfg.model)
  task = LMTask(cfg, mc)
  data = TextData(cfg)
  rng = jax.random.key(seed)
  if lora_cfg is not None:
    cfg.lora.update(dict(lora_cfg, enabled=True))
    trainable, frozen = lora.lora_train_partition(params, cfg.lora, jax.random.fold_in(rng, 7))
    task.combine = lora.combine
  else:
    trainable, frozen = params, {}
  tx = make_optimizer(cfg.optimizer, cfg.steps, trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=tx.init(trainable), frozen=frozen,
                     skipped=jnp.zeros((), jnp.int32))
  step = jax.jit(functools.partial(train_step, task=task, tx=tx,
                                   lr_fn=schedule(cfg.optimizer, cfg.steps), accum=1,
                                   base_rng=jax.random.fold_in(rng, 1)))
  before = evaluate(task, state, data, cfg.eval_steps)
  t0 = time.perf_counter()
  for s in range(cfg.steps):
    state, metrics = step(state, data.batch(s))
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - t0
  after = evaluate(task, state, data, cfg.eval_steps)
  full = task.combine(state.params, state.frozen)
  counts = lora.count_params(full)
  n_train = sum(int(np.size(a)) for a in jax.tree.leaves(state.params))
  row = {"seed": seed, "val_before": before, "val_after": after, "improvement": before - after,
         "trainable": n_train, "base_params": counts["base"],
         "trainable_frac": n_train / counts["base"],
         "opt_state_bytes": lora.tree_bytes(state.opt_state), "train_seconds": seconds,
         "final_train_loss": float(metrics["loss"])}
  if lora_cfg is not None and adapter_dir:
    sizes = lora.save_adapter(adapter_dir, full, cfg.lora.adapter_name)
    row["adapter_file_bytes"] = sizes["adapter_model.safetensors"]
    row["model_bytes"] = 4 * counts["base"]
  return row, full


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", default="0")
  p.add_argument("--ranks", default="8")
  p.add_argument("--targets", default="qv")
  p.add_argument("--steps", type=int, default=0, help="override adaptation steps")
  p.add_argument("--lora-lr", type=float, default=5e-3,
                 help="peak learning rate of LoRA runs (full fine-tuning: the config's)")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  os.makedirs(a.out, exist_ok=True)
  sfx = ",smoke" if a.smoke else ""
  rows_path = os.path.join(a.out, "results.jsonl")
  pre_cfg = load_experiment("pretrain" + sfx)
  pre_path = os.path.join(a.out, "pretrained.pkl")
  if os.path.exists(pre_path):  # reuse the pre-trained weights of an earlier sweep in --out
    with open(pre_path, "rb") as f:
      params = jax.tree.map(jnp.asarray, pickle.load(f))
    rows = []
  else:
    params = lm.init(model_config(pre_cfg.model), jax.random.key(0))
    row, params = run(pre_cfg, params, 0)
    with open(pre_path, "wb") as f:
      pickle.dump(jax.tree.map(np.asarray, params), f)
    rows = [dict(row, run="pretrain")]
    print(json.dumps(rows[-1]), flush=True)
  variants = [("full", None)]
  for t in a.targets.split(","):
    for r in map(int, a.ranks.split(",")):
      variants.append((f"lora r={r} {t}", dict(r=r, lora_alpha=2.0 * r,
                                               target_modules=TARGETS[t])))
  for seed in map(int, a.seeds.split(",")):
    for name, lc in variants:
      cfg = load_experiment("adapt" + sfx)
      if a.steps:
        cfg.steps = a.steps
      cfg.seed = seed
      if lc is not None:
        cfg.optimizer.learning_rate = a.lora_lr
      adir = os.path.join(a.out, "adapters", f"{name.replace(' ', '_')}_s{seed}")
      row, _ = run(cfg, params, seed, lc, adir if lc else "")
      rows.append(dict(row, run=name))
      print(json.dumps(rows[-1]), flush=True)
  with open(rows_path, "a") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  print(table(rows))
  return 0


def table(rows: list[dict]) -> str:
  """Markdown summary: mean ± std over seeds; LoRA improvement as % of full fine-tuning's."""
  full = {r["seed"]: r["improvement"] for r in rows if r["run"] == "full"}
  if not full:
    return "(no full fine-tuning run to compare with)"
  by: dict[str, list[dict]] = {}
  for r in rows:
    if r["run"] != "pretrain":
      by.setdefault(r["run"], []).append(r)
  lines = ["| run | trainable (% of base) | val before | val after | improvement | % of full FT "
           "| opt state | adapter file |", "|---|---|---|---|---|---|---|---|"]
  for name, rs in by.items():
    imp = np.array([r["improvement"] for r in rs])
    frac = np.array([r["improvement"] / full[r["seed"]] for r in rs if full.get(r["seed"])])
    lines.append(
        f"| {name} | {rs[0]['trainable']:,} ({100 * rs[0]['trainable_frac']:.2f}%) | "
        f"{np.mean([r['val_before'] for r in rs]):.3f} | "
        f"{np.mean([r['val_after'] for r in rs]):.3f} | {imp.mean():.3f} ± {imp.std():.3f} | "
        f"{100 * frac.mean():.0f}% ± {100 * frac.std():.0f} | "
        f"{rs[0]['opt_state_bytes'] / 1e3:.0f} kB | "
        f"{rs[0].get('adapter_file_bytes', 0) / 1e3:.0f} kB |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
