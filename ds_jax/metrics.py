"""Metrics to `metrics.jsonl` + TensorBoard, the machine's matmul peak, and run plots."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np


class MetricsWriter:
  """One JSON object per line (always with `step`) and TensorBoard scalars in `W/tb/`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._f = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except Exception:  # tensorboardX is a declared dependency; never fail a run over logging
      self._tb = None

  def write(self, row: dict, arrays: Optional[dict] = None) -> None:
    if not self.enabled:
      return
    step = int(row["step"])
    full = dict(row)
    if arrays:
      full.update(arrays)
    self._f.write(json.dumps(full) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)
      for k, v in (arrays or {}).items():
        a = np.asarray(v)
        if a.ndim == 1:  # one value per MoE layer
          for i, x in enumerate(a):
            self._tb.add_scalar(f"{k}/layer_{i}", float(x), step)

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


_PEAK: dict = {}


def measure_peak_flops(n: Optional[int] = None, reps: int = 3, dtype: str = "float32") -> float:
  """Best-of-`reps` matmul FLOP/s of this host's default backend in `dtype` (cached per process).

  `n` (the square matmul's side) defaults to 1536 on CPU and 8192 on accelerators, where a
  smaller product does not fill the chip.
  """
  import jax
  import jax.numpy as jnp
  if n is None:
    n = 1536 if jax.default_backend() == "cpu" else 8192
  key = (n, dtype)
  if key not in _PEAK:
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    _PEAK[key] = 2 * n ** 3 / best
  return _PEAK[key]


def plot_run(workdir: str) -> list[str]:
  """loss.png (train + validation) and, for MoE runs, moe_load.png (expert load heat map)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(workdir)
  out = []
  train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
  if train:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train")
    if val:
      ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)
  loads = [(r["step"], np.asarray(r["moe/load"])) for r in rows if "moe/load" in r]
  if loads:
    steps = [s for s, _ in loads]
    arr = np.stack([l for _, l in loads])  # [T, layers, E]
    layers = arr.shape[1]
    fig, axes = plt.subplots(layers, 1, figsize=(7, 1.6 * layers + 0.8), squeeze=False)
    for i in range(layers):
      ax = axes[i, 0]
      im = ax.imshow(arr[:, i, :].T, aspect="auto", origin="lower", cmap="viridis",
                     extent=(steps[0], steps[-1], -0.5, arr.shape[2] - 0.5))
      ax.set_ylabel(f"MoE layer {i}\nexpert")
      fig.colorbar(im, ax=ax, label="load")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("fraction of routed tokens per expert")
    fig.tight_layout()
    path = os.path.join(workdir, "moe_load.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)
  return out
