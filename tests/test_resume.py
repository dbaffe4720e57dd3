"""Exact resume: SIGKILL and SIGTERM mid-run, then resume, equal an uninterrupted run bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from tests.helpers import REPO

ARGS = ["--config", "experiments/tiny_lm.py:smoke", "--config.steps=12",
        "--config.checkpoint.every_steps=3", "--config.eval_every=0", "--config.log_every=3",
        "--config.peak_flops=1e11", "--no-progress"]


def _start(workdir, delay="0"):
  env = dict(os.environ, DS_JAX_TEST_STEP_DELAY=delay, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "ds_jax", "train", *ARGS, "--workdir",
                           str(workdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(workdir, step, proc, timeout=400):
  path = os.path.join(workdir, "checkpoints", str(step))
  t = time.time()
  while time.time() - t < timeout:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise TimeoutError(path)


def _params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "default"))
  return restored["params"], restored["opt_state"]


def test_sigkill_and_sigterm_resume_bitwise(tmp_path):
  ref, run = tmp_path / "ref", tmp_path / "run"
  p = _start(ref)
  assert p.wait(timeout=600) == 0, p.stdout.read()
  # Kill -9 after the step-3 checkpoint, in the middle of the run.
  p = _start(run, delay="0.3")
  _wait_for_checkpoint(run, 3, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(run / "checkpoints" / "12")
  # Resume, then SIGTERM: it must save at the next step boundary and exit 0.
  p = _start(run, delay="0.3")
  _wait_for_checkpoint(run, 6, p)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 0, out
  assert "resumed from step" in out and "SIGTERM: saved step" in out
  # Resume to the end.
  p = _start(run)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  a, b = _params(ref, 12), _params(run, 12)
  import jax
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl") if "loss" in l]
  assert steps[-1] == 12
