"""Two processes (jax.distributed, gloo CPU collectives, 4 devices each) equal one with 8 devices.

The tiny MoE trains on mesh expert=8, so every expert all-to-all crosses the process boundary;
each process loads only its own batch rows (`sharding.process_rows` / `shard_process_batch`).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO

WORKER = os.path.join(REPO, "scripts", "multihost_worker.py")


def _worker_module():
  spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, steps: int, n: int = 2):
  port = _free_port()
  procs = []
  for i in range(n):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}",
               DS_JAX_COORDINATOR=f"127.0.0.1:{port}", DS_JAX_NUM_PROCESSES=str(n),
               DS_JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen([sys.executable, WORKER, "--out", str(out), "--steps",
                                   str(steps)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=1200)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, o in zip(procs, outs):
    assert p.returncode == 0, o[-3000:]
  return [json.loads(next(l for l in o.splitlines() if l.startswith("{"))) for o in outs]


def _check(tmp_path, steps):
  infos = _launch(tmp_path / "mh", steps)
  assert [i["process_index"] for i in infos] == [0, 1]
  assert all(i["process_count"] == 2 and i["local_devices"] == 4 and i["devices"] == 8
             for i in infos)
  # Each process loaded only the rows its devices hold: disjoint halves of the batch of 8.
  assert infos[0]["rows"] == [0, 1, 2, 3] and infos[1]["rows"] == [4, 5, 6, 7]
  assert infos[0]["losses"] == infos[1]["losses"]
  ref_losses, ref_params, rows = _worker_module().run(steps)
  assert rows == list(range(8))
  np.testing.assert_allclose(infos[0]["losses"], ref_losses, rtol=0, atol=1e-5)
  got = np.load(tmp_path / "mh" / "params.npz")
  assert sorted(got.files) == sorted(ref_params)
  for k, v in ref_params.items():
    np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.slow  # ~60-120 s on 2 cores: two processes compile the MoE step
def test_two_processes_equal_one(tmp_path):
  _check(tmp_path, steps=2)


@pytest.mark.slow
def test_two_processes_equal_one_longer(tmp_path):
  _check(tmp_path, steps=8)
