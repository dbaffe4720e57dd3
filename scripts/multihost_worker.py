"""One process of a multi-process (multi-host) run of the tiny MoE, for tests and smoke checks.

Launch the same command once per process (here on one machine, 4 simulated CPU devices each):

  for i in 0 1; do
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
    DS_JAX_COORDINATOR=127.0.0.1:12355 DS_JAX_NUM_PROCESSES=2 DS_JAX_PROCESS_ID=$i \\
    python scripts/multihost_worker.py --out /tmp/mh --steps 2 &
  done; wait

The expert axis (8 experts, mesh expert=8) spans both processes, so every MoE layer's all-to-all
crosses the process boundary. Each process loads only the batch rows its devices hold. Process 0
writes `losses.json` and `params.npz` to --out; `tests/test_multihost.py` compares them with one
process on 8 devices (`run()` below, called in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

CONFIG = "experiments/tiny_moe.py:smoke"
# SGD, not Adam: Adam divides by sqrt(v), so float-rounding differences between two reduction
# orders (gloo across processes vs one process) in near-zero gradients become whole-step
# differences in a few parameters; SGD keeps parameter differences proportional to gradient
# differences, which is what this comparison is about.
OVERRIDES = ("mesh.data=1", "mesh.expert=8", "seq_len=32", "batch_size=8", "eval_every=0",
             "model.num_hidden_layers=2", "optimizer.warmup_steps=0", "optimizer.name=sgd",
             "optimizer.learning_rate=0.3")


def run(steps: int, overrides: Sequence[str] = ()) -> tuple[list[float], dict, list[int]]:
  """Train `steps` steps of the tiny MoE on all devices of all processes.

  Returns (losses, flat host copy of the final parameters gathered to every process, the batch
  rows this process loaded).
  """
  import jax
  from jax.experimental import multihost_utils
  from ds_jax import config as cfglib
  from ds_jax import sharding as shd
  from ds_jax.data.text import TextData
  from ds_jax.train import Trainer

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = cfglib.load_config(os.path.join(repo, CONFIG), list(OVERRIDES) + list(overrides))
  mc = cfglib.validate(cfg, jax.device_count())
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  data = TextData(cfg)
  trainer = Trainer(cfg, mc, mesh)
  rows = shd.process_rows(mesh, cfg.batch_size)

  def local_batch(step: int) -> dict:
    # The pydoc stream is cheap to index; a real loader would read only `rows` from storage.
    return {k: v[rows] for k, v in data.batch(step).items()}

  losses = []
  with jax.set_mesh(mesh):
    state = trainer.init_state()
    batch = shd.shard_process_batch(local_batch(0), mesh, cfg.batch_size)
    step_fn = trainer.train_step.lower(state, batch).compile()
    shd.barrier("ds_jax_multihost_worker_compiled")  # hosts compile at different speeds
    for step in range(steps):
      if step:
        batch = shd.shard_process_batch(local_batch(step), mesh, cfg.batch_size)
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return losses, flat, rows.tolist()


def main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--steps", type=int, default=2)
  args = p.parse_args(argv)
  import jax
  from ds_jax import sharding as shd
  jax.config.update("jax_default_matmul_precision", "highest")  # as in tests/conftest.py
  shd.initialize()
  losses, params, rows = run(args.steps)
  info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "devices": jax.device_count(),
          "losses": losses, "rows": rows}
  print(json.dumps(info), flush=True)
  if jax.process_index() == 0:
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "params.npz"), **params)
    with open(os.path.join(args.out, "losses.json"), "w") as f:
      json.dump(info, f)
  shd.barrier("ds_jax_multihost_worker_done")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
