"""The training loop: resume, steps, metrics, evaluation, checkpoints, SIGTERM, plots."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax import checkpoint as ckpt
from ds_jax import config as cfglib
from ds_jax import sharding as shd
from ds_jax.metrics import MetricsWriter, measure_peak_flops, plot_run
from ds_jax.train import Trainer


class _Preempted:
  """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits 0."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    def handler(signum, frame):
      self.flag = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. notebooks)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def check_workdir(workdir: str, cfg) -> None:
  """A workdir may only be resumed by the same model; anything else is refused before compiling."""
  old = ckpt.read_config(workdir)
  if old is None:
    return
  new_model = cfg.model.to_dict()
  old_model = old.get("model", {})
  diff = sorted(k for k in set(new_model) | set(old_model)
                if new_model.get(k) != old_model.get(k) and k not in ("remat", "scan_layers",
                                                                     "moe_matmul", "dtype"))
  if diff:
    k = diff[0]
    raise cfglib.ConfigError(
        f"model.{k}", f"the workdir {workdir} holds a checkpoint of another model "
        f"({k}={old_model.get(k)!r}, this config has {new_model.get(k)!r}); use a new --workdir")


def flops_per_token(mc, seq_len: int) -> float:
  from ds_jax import analysis
  return float(analysis.flops_per_token(mc, seq_len)["train"])


def train(cfg, workdir: str, *, progress: bool = True, init_params: Any = None) -> dict:
  """Train `cfg` in `workdir` (resuming from its latest checkpoint); returns the final metrics."""
  mc = cfglib.validate(cfg, jax.device_count())
  check_workdir(workdir, cfg)
  mesh = shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count()))
  from ds_jax.data.text import TextData
  data = TextData(cfg)
  trainer = Trainer(cfg, mc, mesh)
  is_main = jax.process_index() == 0
  if is_main:
    ckpt.write_config(workdir, cfg.to_dict())
  mngr = ckpt.manager(workdir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
                      cfg.checkpoint.get("directory", ""))
  start, state = ckpt.restore_latest(mngr, trainer.abstract_state)
  if state is None:
    state, start = trainer.init_state(init_params), 0
  elif is_main:
    print(f"resumed from step {start} in {workdir}", flush=True)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  fpt = flops_per_token(mc, cfg.seq_len)
  peak = (cfg.peak_flops * jax.device_count() if cfg.peak_flops
          else measure_peak_flops(dtype=mc.dtype))  # the compute dtype's own peak
  writer = MetricsWriter(workdir, enabled=is_main)
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
  last: dict = {}
  step = start
  t_last = time.perf_counter()
  steps_since = 0
  if jax.process_count() > 1:  # hosts finish compiling at different times; gloo times out at 30 s
    with jax.set_mesh(mesh):
      trainer.train_step.lower(state, shd.shard_batch(data.batch(start), mesh)).compile()
    shd.barrier("ds_jax_compiled")
  # Test hook: a pause per step widens the window in which tests kill a run (never set in use).
  delay = float(os.environ.get("DS_JAX_TEST_STEP_DELAY", "0"))
  with _Preempted() as pre:
    while step < cfg.steps:
      if delay:
        time.sleep(delay)
      batch = data.batch(step)
      state, metrics = trainer.step(state, batch)
      step += 1
      steps_since += 1
      # Halting mode checks every step (one scalar sync), so the message names the step that
      # went non-finite and a non-finite state is never checkpointed or trained on further.
      if not cfg.optimizer.skip_nonfinite and int(metrics["nonfinite"]):
        raise FloatingPointError(f"non-finite loss or gradient at step {step}; halting "
                                 f"(optimizer.skip_nonfinite=False); last checkpoint kept in "
                                 f"{os.path.join(workdir, 'checkpoints')}")
      log_now = step % cfg.log_every == 0 or step == cfg.steps or pre.flag
      if log_now:
        metrics = jax.device_get(metrics)
        dt = (time.perf_counter() - t_last) / steps_since
        t_last, steps_since = time.perf_counter(), 0
        row = _scalars(metrics)
        row.update(step=step, step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                   mfu=fpt * tokens_per_step / dt / peak)
        writer.write(row, arrays=_arrays(metrics))
        last = row
        if bar is not None:
          bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        ev = trainer.evaluate(state, (data.eval_batch(k) for k in range(cfg.eval_steps)))
        writer.write({"step": step, **ev})
      if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps or pre.flag:
        ckpt.save(mngr, step, state, force=True)
      if step % cfg.log_every == 0:  # eval / checkpoint time is not step time
        t_last, steps_since = time.perf_counter(), 0
      if pre.flag:
        mngr.wait_until_finished()
        if is_main:
          print(f"SIGTERM: saved step {step} to {workdir}; exiting", flush=True)
        break
  mngr.wait_until_finished()
  if bar is not None:
    bar.close()
  if not pre.flag:
    ev = trainer.evaluate(state, (data.eval_batch(k) for k in range(cfg.eval_steps)))
    writer.write({"step": step, **ev})
    last.update(ev)
  writer.close()
  if is_main:
    plot_run(workdir)
    if trainer.lora_on:  # adapter-only checkpoint beside the full one
      from ds_jax import lora
      lora.save_adapter(os.path.join(workdir, "adapters", cfg.lora.adapter_name), jax.device_get(
          trainer.full_params(state)), cfg.lora.adapter_name)
  last["workdir"] = workdir
  last["preempted"] = pre.flag
  return {"metrics": last, "state": state, "trainer": trainer, "data": data}


def _scalars(metrics: dict) -> dict:
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.ndim == 0:
      out[k] = float(a)
    elif k.startswith("moe/") and k != "moe/load":
      out[k] = float(a.mean())  # mean over MoE layers; per-layer values go to `arrays`
  return out


def _arrays(metrics: dict) -> dict:
  return {k: np.asarray(v).tolist() for k, v in metrics.items()
          if k.startswith("moe/") and np.asarray(v).ndim >= 1}
