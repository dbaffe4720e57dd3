"""Checkpoint atomicity, corrupted-checkpoint fallback, and non-finite steps (skip or halt).

SIGTERM / SIGKILL resume is covered bit for bit in tests/test_resume.py.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ds_jax import checkpoint as ckpt
from ds_jax import cli
from ds_jax import sharding as shd
from tests.helpers import REPO


def _state(value: float, mesh):
  """Random (incompressible) data, so array files are the largest in a checkpoint."""
  w = np.random.default_rng(int(value)).normal(size=(16, 256)).astype(np.float32) + value
  w = jax.device_put(w, NamedSharding(mesh, P("data")))
  return {"w": w, "b": jnp.full((3,), value), "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _files(step_dir):
  out = []
  for d, _, fs in os.walk(step_dir):
    out += [os.path.join(d, f) for f in fs]
  return out


def _damage(step_dir, how: str):
  data = max(_files(step_dir), key=os.path.getsize)  # array data (an OCDBT data file)
  assert os.path.getsize(data) > 16 * 256 * 4 // 8, _files(step_dir)
  if how == "truncate":
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)
  elif how == "delete_data":
    os.remove(data)
  elif how == "delete_manifest":
    for p in _files(step_dir):
      if os.path.basename(p) == "manifest.ocdbt":
        os.remove(p)


@pytest.mark.parametrize("how", ["truncate", "delete_data", "delete_manifest"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, how):
  mesh = shd.make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))
  mngr = ckpt.manager(str(tmp_path))
  for step in (1, 2):
    ckpt.save(mngr, step, _state(float(step), mesh), force=True)
  mngr.wait_until_finished()
  _damage(tmp_path / "checkpoints" / "2", how)
  capsys.readouterr()
  step, state = ckpt.restore_latest(ckpt.manager(str(tmp_path)), _abstract(_state(0.0, mesh)))
  out = capsys.readouterr().out.strip().splitlines()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(1.0, mesh)["w"]))
  assert state["w"].sharding == NamedSharding(mesh, P("data"))
  assert len(out) == 1 and "step 2" in out[0] and "unreadable" in out[0], out


def test_all_checkpoints_unreadable_is_one_error(tmp_path):
  mesh = shd.make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))
  mngr = ckpt.manager(str(tmp_path))
  ckpt.save(mngr, 1, _state(1.0, mesh), force=True)
  mngr.wait_until_finished()
  _damage(tmp_path / "checkpoints" / "1", "truncate")
  with pytest.raises(ckpt.CheckpointError, match=r"no readable checkpoint among steps \[1\]"):
    ckpt.restore_latest(ckpt.manager(str(tmp_path)), _abstract(_state(0.0, mesh)))


CRASH = textwrap.dedent("""
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from ds_jax import checkpoint as ckpt
    mngr = ckpt.manager(sys.argv[1])
    ckpt.save(mngr, 1, {"w": jnp.ones((64, 64))}, force=True)
    mngr.wait_until_finished()
    async def die(self):  # every byte of step 2 written; killed before the commit (rename)
      os._exit(137)
    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(mngr, 2, {"w": jnp.full((64, 64), 2.0)}, force=True)
    mngr.wait_until_finished()
""")


def test_crash_mid_save_never_becomes_latest(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  r = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 137, r.stderr[-2000:]
  names = os.listdir(tmp_path / "checkpoints")
  assert "1" in names and "2" not in names, names
  assert any(n.startswith("2") for n in names), names  # the uncommitted temporary directory
  mngr = ckpt.manager(str(tmp_path))
  assert mngr.all_steps() == [1]
  step, state = ckpt.restore_latest(
      mngr, {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)})
  assert step == 1 and float(state["w"][0, 0]) == 1.0


def test_nonfinite_state_is_never_saved(tmp_path):
  mesh = shd.make_mesh(dict(data=8, fsdp=1, expert=1, tensor=1))
  mngr = ckpt.manager(str(tmp_path))
  bad = _state(1.0, mesh)
  bad["b"] = bad["b"].at[1].set(jnp.nan)
  with pytest.raises(ckpt.CheckpointError, match="non-finite state at step 5"):
    ckpt.save(mngr, 5, bad, force=True)
  assert mngr.all_steps() == []


def test_nan_batch_is_skipped_and_counted():
  """skip_nonfinite=True: a NaN loss leaves params and optimizer state as they were, counted."""
  from ds_jax import config as cfglib
  from ds_jax.train import Trainer
  from tests.helpers import tiny_cfg
  cfg = tiny_cfg()
  cfg.optimizer.warmup_steps = 0
  mc = cfglib.validate(cfg, jax.device_count())
  trainer = Trainer(cfg, mc, shd.make_mesh(cfglib.mesh_shape(cfg, jax.device_count())))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 259, (cfg.batch_size, cfg.seq_len + 1)).astype(np.int32)
  good = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((cfg.batch_size, cfg.seq_len), np.float32)}
  bad = dict(good, weights=good["weights"].copy())
  bad["weights"][3, 5] = np.nan  # an injected NaN: loss and every gradient become NaN
  state = trainer.init_state()
  before = jax.device_get(state.params)
  state, m = trainer.step(state, bad)
  assert int(m["nonfinite"]) == 1 and int(m["skipped_total"]) == 1
  assert not np.isfinite(float(m["loss"]))
  after = jax.device_get(state.params)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  assert int(state.step) == 1 and ckpt._finite(state)
  state, m = trainer.step(state, good)
  assert int(m["nonfinite"]) == 0 and int(m["skipped_total"]) == 1
  assert np.isfinite(float(m["loss"]))
  moved = jax.device_get(state.params)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(after),
                                                      jax.tree.leaves(moved)))


def test_nonfinite_halt_names_step_cli(tmp_path, capsys):
  """skip_nonfinite=False: an exploding learning rate makes step 2 non-finite; the CLI halts with
  one line naming step 2, a non-zero exit code, and only the finite step-1 checkpoint on disk."""
  w = tmp_path / "w"
  rc = cli.main(["train", "--config", "experiments/tiny_lm.py:smoke", "--workdir", str(w),
                 "--no-progress", "--config.steps=4", "--config.log_every=4",
                 "--config.eval_every=0", "--config.peak_flops=1e11",
                 "--config.checkpoint.every_steps=1", "--config.optimizer.warmup_steps=0",
                 "--config.optimizer.learning_rate=1e38",
                 "--config.optimizer.skip_nonfinite=false"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc not in (0, None) and len(err) == 1, err
  assert "step 2" in err[0] and "skip_nonfinite" in err[0]
  assert sorted(os.listdir(w / "checkpoints")) == ["1"]
