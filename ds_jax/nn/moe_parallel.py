"""Expert parallelism: routed-expert FFN inside `jax.shard_map`, all-to-all over "expert".

On a mesh with more than one device, tokens (flattened to T) are split over every batch axis
present ("data", "fsdp", "expert") and each shard dispatches its own tokens (a GShard *group*).
Expert weights are split over "expert" (the compiler all-gathers their fsdp / tensor shards on
entry, and reduce-scatters their gradients). With an expert axis of size X > 1:

- dropless: each shard sends every slot to the device holding its expert in a buffer of N rows per
  destination (N = local slots; the worst case, so nothing is ever dropped), with the local expert
  id alongside; the receiver runs `expert_rows` on X * N rows (padding rows skipped by the
  ragged / block-sparse layouts, computed as zeros by the dense ones), and sends results back.
- capacity: the GShard layout [E, C, D] (C from the local group) is split into [X, E/X * C, D],
  exchanged, computed as [E/X, X * C, D] against the local experts, and exchanged back.
Routing weights are applied at the source, so their gradient never crosses devices.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ds_jax.nn import moe_dispatch as md

Array = jax.Array
BATCH_AXES = ("data", "fsdp", "expert")


def expert_shards() -> int:
  """Size of the current abstract mesh's "expert" axis (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names:
    return 1
  return mesh.shape["expert"]


def _ep_body(x_TxD, idx_TxK, w_TxK, valid_T, k: md.ExpertKernels, *, n_exp: int, n_shards: int,
             strategy: str, block: int, dtype: Any, cap_factor: Optional[float],
             batch_axes: tuple[str, ...]):
  t, d = x_TxD.shape
  kk = idx_TxK.shape[1]
  e_loc = n_exp // n_shards
  e_N = idx_TxK.T.reshape(-1)
  valid_N = jnp.tile(valid_T, kk)
  x_NxD = md.tile_rows(x_TxD, kk)
  a2a = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0,
                          tiled=True)
  if cap_factor is not None:
    cap = md.capacity(t * kk, n_exp, cap_factor)
    _, rank_N, _ = md.sort_slots(e_N, valid_N, n_exp)
    kept_N = valid_N & (rank_N < cap)
    rows = jnp.where(kept_N, e_N * cap + rank_N, n_exp * cap)
    buf, src_R = md._rows_from_slots(x_NxD, rows, n_exp * cap)
    buf = buf.reshape(n_shards, e_loc * cap, d)
    recv = a2a(buf).reshape(n_shards, e_loc, cap, d).transpose(1, 0, 2, 3)
    o = md.capacity_rows(recv.reshape(e_loc, n_shards * cap, d), k, dtype)
    back = o.reshape(e_loc, n_shards, cap, d).transpose(1, 0, 2, 3)
    ret = a2a(back.reshape(n_shards, e_loc * cap, d)).reshape(n_exp * cap, d)
    o_NxD = md._slots_from_rows(ret, rows, src_R)
  else:
    n = t * kk
    dest_N = e_N // e_loc
    _, rank_N, _ = md.sort_slots(dest_N, valid_N, n_shards)
    kept_N = valid_N
    rows = jnp.where(valid_N, dest_N * n + rank_N, n_shards * n)
    buf, src_R = md._rows_from_slots(x_NxD, rows, n_shards * n)
    buf = buf.reshape(n_shards, n, d)
    eid = jnp.full((n_shards * n,), e_loc, jnp.int32).at[rows].set(
        (e_N % e_loc).astype(jnp.int32), mode="drop").reshape(n_shards, n)
    recv_x = a2a(buf).reshape(n_shards * n, d)
    recv_e = a2a(eid).reshape(n_shards * n)
    o, _ = md.expert_rows(recv_x, jnp.minimum(recv_e, e_loc - 1), recv_e < e_loc, k, strategy,
                          block, dtype)
    ret = a2a(o.reshape(n_shards, n, d)).reshape(n_shards * n, d)
    o_NxD = md._slots_from_rows(ret, rows, src_R)
  y_TxD = md.combine_slots(o_NxD, w_TxK)
  dropped = jnp.sum(valid_N & ~kept_N).astype(jnp.int32)
  return y_TxD, jax.lax.psum(dropped, batch_axes)


def _local_body(x_TxD, idx_TxK, w_TxK, valid_T, k, *, batch_axes, **kw):
  y, dropped = md.local_moe(x_TxD, idx_TxK, w_TxK, valid_T, k, **kw)
  return y, jax.lax.psum(dropped, batch_axes)


def routed_ffn(x_TxD: Array, idx_TxK: Array, w_TxK: Array, k: md.ExpertKernels, *,
               strategy: str, block: int, dtype: Any,
               cap_factor: Optional[float] = None) -> tuple[Array, Array]:
  """sum_k w_k FFN_{e_k}(x) over all T tokens, sharded over the current mesh if there is one.

  Returns (y_TxD, drop fraction of the T * K slots).
  """
  t, kk = idx_TxK.shape
  n_exp = jax.tree.leaves(k.gate_proj)[0].shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  kw = dict(strategy=strategy, block=block, dtype=dtype, cap_factor=cap_factor)
  if mesh.empty or mesh.size == 1:
    y, dropped = md.local_moe(x_TxD, idx_TxK, w_TxK, jnp.ones((t,), bool), k, **kw)
    return y, dropped / (t * kk)
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  pad = -t % n_batch
  valid_T = jnp.arange(t + pad) < t
  if pad:
    x_TxD = jnp.pad(x_TxD, ((0, pad), (0, 0)))
    idx_TxK = jnp.pad(idx_TxK, ((0, pad), (0, 0)))
    w_TxK = jnp.pad(w_TxK, ((0, pad), (0, 0)))
  x_shards = expert_shards()
  tok = P(batch_axes)
  if x_shards > 1:
    body = functools.partial(_ep_body, n_exp=n_exp, n_shards=x_shards, batch_axes=batch_axes,
                             **kw)
    k_spec = jax.tree.map(lambda _: P("expert"), k)
  else:
    body = functools.partial(_local_body, batch_axes=batch_axes, **kw)
    k_spec = jax.tree.map(lambda _: P(), k)
  y, dropped = jax.shard_map(body, in_specs=(tok, tok, tok, tok, k_spec),
                             out_specs=(tok, P()))(x_TxD, idx_TxK, w_TxK, valid_T, k)
  return y[:t], dropped / (t * kk)
