"""Device mesh, the logical-axis rule table, sharded initialisation, and multi-host start-up.

Model code names logical axes ("embed", "mlp", "heads", "expert", "vocab", ...); `RULES` maps them
to the mesh axes ("data", "fsdp", "expert", "tensor"). A rule whose mesh axis is already used
in the same array spec is skipped (flax semantics), so activations `("batch", "length", "embed")`
keep "embed" replicated while parameters shard "embed" over "fsdp".
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
)


def make_mesh(sizes: dict[str, int], devices: Optional[list] = None) -> Mesh:
  """A mesh with axes MESH_AXES (Auto axis types: the compiler propagates shardings)."""
  shape = tuple(int(sizes[a]) for a in MESH_AXES)
  devices = devices if devices is not None else jax.devices()
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def logical_spec(names: tuple[Optional[str], ...]) -> P:
  return nn.logical_to_mesh_axes(names, RULES)


def param_shardings(boxed_params: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of nn.Partitioned boxes (from `jax.eval_shape(init)`).

  A dimension that the mesh axes of its rule do not divide (e.g. a byte vocabulary of 259 over
  tensor=2) stays replicated instead of failing.
  """
  specs = nn.get_partition_spec(boxed_params)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, RULES)
  shapes = nn.unbox(boxed_params)
  return jax.tree.map(lambda s, x: _divisible(s, x.shape, mesh), shardings, shapes)


def _divisible(sharding: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if shape[i] % int(np.prod([mesh.shape[a] for a in names])):
      spec[i], changed = None, True
  return NamedSharding(mesh, P(*spec)) if changed else sharding


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis over (data, fsdp, expert); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Place a host-global numpy batch on the mesh, each process contributing its own rows.

  On one process this is a plain device_put; with several processes every process passes the
  *global* batch (the data iterator is a pure function of (seed, step)) and only the rows its
  devices own are copied.
  """
  out = {}
  for k, v in batch.items():
    sharding = batch_sharding(mesh, v.ndim)
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def initialize() -> None:
  """Start JAX's multi-controller runtime when the environment describes several processes.

  Reads DS_JAX_COORDINATOR (host:port of process 0), DS_JAX_NUM_PROCESSES and DS_JAX_PROCESS_ID;
  otherwise, on a Cloud TPU pod slice or under SLURM with several tasks,
  `jax.distributed.initialize()` detects everything itself. A single process without those
  variables is left alone. On CPU the cross-process collectives go through gloo.
  """
  if jax.distributed.is_initialized():
    return
  coord = os.environ.get("DS_JAX_COORDINATOR")
  slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
  tpu_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  if not (coord or slurm or tpu_pod):
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coord:
    from ds_jax.config import ConfigError
    try:
      n, pid = int(os.environ["DS_JAX_NUM_PROCESSES"]), int(os.environ["DS_JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ConfigError("DS_JAX_NUM_PROCESSES", "DS_JAX_COORDINATOR is set, so "
                        "DS_JAX_NUM_PROCESSES and DS_JAX_PROCESS_ID must be integers") from None
    if not 0 <= pid < n:
      raise ConfigError("DS_JAX_PROCESS_ID", f"must be in [0, DS_JAX_NUM_PROCESSES={n}); "
                        f"got {pid}")
    jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
  else:
    jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------
# Multi-process helpers: which batch rows a process owns, placing only those, host barriers.


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """Sorted global row indices of a `batch_size` batch that this process's devices hold."""
  sharding = batch_sharding(mesh, 1)
  rows = set()
  for idx in sharding.addressable_devices_indices_map((batch_size,)).values():
    rows.update(range(batch_size)[idx[0]])
  return np.asarray(sorted(rows), np.int64)


def shard_process_batch(local: dict[str, np.ndarray], mesh: Mesh,
                        batch_size: int) -> dict[str, jax.Array]:
  """Global arrays from the rows `process_rows(mesh, batch_size)` only (in that order).

  Each process loads just its share of the batch; nothing else crosses host memory.
  """
  rows = process_rows(mesh, batch_size)
  if len(rows) and not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
    raise ValueError("this process's batch rows are not contiguous; use shard_batch")
  out = {}
  for k, v in local.items():
    if v.shape[0] != len(rows):
      raise ValueError(f"{k}: this process holds {len(rows)} rows, got {v.shape[0]}")
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                    (batch_size,) + v.shape[1:])
  return out


def barrier(name: str, timeout_s: float = 1800.0) -> None:
  """Wait until every process reaches `name` (no-op on one process).

  Uses the coordination service, not a device collective: hosts that finish compiling at very
  different times would otherwise hit gloo's 30 s connection timeout in the first collective.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
