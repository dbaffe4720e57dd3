"""Orbax checkpoints in a workdir: atomic saves, keep-N, resume, resharding restore, fallback.

Layout: `W/config.json` (the experiment config) and `W/checkpoints/<step>/` (orbax; a save is
written to a temporary directory and renamed when complete, so a crash mid-save never becomes the
latest). The data iterator is a pure function of (seed, step), so the step *is* its state.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("ds_jax")


class CheckpointError(RuntimeError):
  pass


def checkpoint_dir(workdir: str, directory: str = "") -> str:
  """`directory` if set (a local path or a URL orbax understands, e.g. gs://bucket/run), else
  `<workdir>/checkpoints`."""
  if directory:
    return directory if "://" in directory else os.path.abspath(directory)
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def manager(workdir: str, keep: int = 3, async_save: bool = False,
            directory: str = "") -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=async_save,
                                      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir, directory), options=opts)


def _finite(state: Any) -> bool:
  import jax.numpy as jnp
  leaves = [x for x in jax.tree.leaves(state)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
  """Save `state` at `step`; refuses a non-finite state (it would poison every resume)."""
  if not _finite(state):
    raise CheckpointError(f"refusing to save a non-finite state at step {step}")
  saved = mngr.save(step, args=ocp.args.StandardSave(state), force=force)
  return bool(saved)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[Optional[int], Any]:
  """Restore the newest readable checkpoint onto `abstract_state`'s shardings.

  A checkpoint that fails to read (truncated or deleted files) is reported in one line and the
  previous one is tried. Returns (step, state) or (None, None) when there is none.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for step in steps:
    try:
      state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
      return step, state
    except Exception as e:  # orbax raises many types for damaged files
      msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      print(f"warning: checkpoint at step {step} is unreadable ({msg}); trying an older one",
            flush=True)
  if steps:
    raise CheckpointError(f"no readable checkpoint among steps {steps} in {mngr.directory}")
  return None, None


def write_config(workdir: str, cfg_dict: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(cfg_dict, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
