"""Expert computation on one device: token-slots in, per-slot expert outputs back.

A *slot* is one (token, chosen expert) pair; N = T * K slots, ordered choice-major (all first
choices, then all second choices, ...) so that under a capacity limit first choices win (GShard).
Letters: N slots, E experts, D model width, F expert width, R padded rows, C capacity, b block.

Grouped-matmul strategies (`moe_matmul`):
- padded_einsum: sort slots by expert and pad each expert's run to a multiple of the block size b.
  Rows R <= N + E (b - 1) is a static bound, so the layout is dropless; blocks of b rows share
  one expert whose weights are gathered per block: one batched einsum [R/b, b, D] x [R/b, D, F].
  Under a capacity limit it is the GShard layout [E, C, D] x [E, D, F] (no weight gather).
- block_loop (CPU default): the same padded block layout, but a loop over the *non-empty* blocks
  (dynamic trip count) multiplies each block by its expert's weights in place — no gathered
  weight copies, no all-padding blocks — with a hand-written backward pass that accumulates
  each expert's weight gradient. Plain weight arrays only (kernel objects use padded_einsum).
- ragged_dot: `jax.lax.ragged_dot` on the expert-sorted rows (fast on GPU/TPU, slow on CPU).
- dense_mask: every expert computes every slot, then a one-hot mask picks (the test reference).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.nn.linear import einsum

Array = jax.Array


class ExpertKernels(NamedTuple):
  """Stacked routed-expert weights (arrays or kernel objects with an `.einsum`)."""
  gate_proj: Any  # [E, D, F]
  up_proj: Any  # [E, D, F]
  down_proj: Any  # [E, F, D]


# Below this block size the per-iteration cost of block_loop's loop outweighs its savings: KV-cache
# decoding routes a handful of tokens in blocks of 1-8 rows (`kv_cache.moe_block`). Measured on
# bench_dsv2_tiny decoding: batch 1 (blocks of 1 row) ran at half the speed with the loop, batch
# 16 (blocks of 4) 1.2-1.35x faster.
MIN_LOOP_BLOCK = 4


def resolve_matmul(strategy: str, block: int = MIN_LOOP_BLOCK) -> str:
  """'auto' -> on CPU block_loop (padded_einsum for blocks under 4 rows); ragged_dot elsewhere."""
  if strategy != "auto":
    return strategy
  if jax.default_backend() != "cpu":
    return "ragged_dot"
  return "block_loop" if block >= MIN_LOOP_BLOCK else "padded_einsum"


def capacity(n_slots: int, n_experts: int, factor: float) -> int:
  """GShard expert capacity ceil(factor * k * T / E) for N = k * T slots (at least 1)."""
  return max(1, int(math.ceil(factor * n_slots / n_experts)))


@jax.custom_vjp
def _take_sorted(a: Array, idx: Array) -> Array:
  # mode="clip": the ids are in range, and the default "fill" adds a select over the whole
  # gathered [n, D, F] weights (it showed up as a top cost of the MoE step on XLA:CPU).
  return jnp.take(a, idx, axis=0, indices_are_sorted=True, mode="clip")


def _take_sorted_fwd(a, idx):
  return _take_sorted(a, idx), (idx, a.shape[0])


def _take_sorted_bwd(res, g):
  idx, n = res
  return jax.ops.segment_sum(g, idx, num_segments=n, indices_are_sorted=True), None


_take_sorted.defvjp(_take_sorted_fwd, _take_sorted_bwd)


def take_experts(kernel: Any, idx: Array) -> Any:
  """Gather experts (sorted ids) along the leading axis of every leaf of a kernel pytree."""
  def take(a):
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating):
      return _take_sorted(_vary_like(a, idx), idx)
    return jnp.take(a, idx, axis=0, mode="clip")
  return jax.tree.map(take, kernel)


def swiglu(x: Array, k: ExpertKernels, eq_in: str, eq_out: str, dtype: Any) -> Array:
  """down(silu(gate(x)) * up(x)) with the given batched einsum equations."""
  g = einsum(eq_in, x, k.gate_proj, dtype=dtype)
  u = einsum(eq_in, x, k.up_proj, dtype=dtype)
  return einsum(eq_out, nn.silu(g) * u, k.down_proj, dtype=dtype)


def sort_slots(e_N: Array, valid_N: Array, n_experts: int) -> tuple[Array, Array, Array]:
  """(order: slots sorted by expert, invalid last; rank of each slot within its expert; counts)."""
  n = e_N.shape[0]
  key_N = jnp.where(valid_N, e_N, n_experts)
  order_N = jnp.argsort(key_N, stable=True)
  counts_E = jnp.bincount(key_N, length=n_experts + 1)[:n_experts]
  start_E = jnp.cumsum(counts_E) - counts_E
  sorted_key = key_N[order_N]
  rank_sorted = jnp.arange(n) - jnp.take(start_E, jnp.minimum(sorted_key, n_experts - 1))
  rank_N = jnp.zeros((n,), jnp.int32).at[order_N].set(rank_sorted.astype(jnp.int32))
  return order_N, rank_N, counts_E


def _vary_like(a: Array, *refs: Array) -> Array:
  """Inside shard_map, mark `a` varying over the mesh axes the index arrays vary over, so that
  a custom VJP's cotangent (which varies like the indices) has the primal's type; the psum of
  the gradient over those axes comes from the transpose of this cast."""
  def varying(v):
    mt = getattr(jax.typeof(v), "manual_axis_type", None)
    return frozenset(mt.varying) if mt is not None else frozenset()
  vma = frozenset().union(*(varying(r) for r in refs))
  missing = tuple(sorted(vma - varying(a)))
  return jax.lax.pcast(a, missing, to="varying") if missing else a


def gather_rows(x_NxD: Array, src_R: Array, inv_N: Array) -> Array:
  """y[r] = x[src[r]] (zero where src[r] >= N) for an injective src; inv is its inverse map.

  Its transpose is again a gather (by `inv`), not a scatter-add: XLA:CPU scatters are ~25x
  slower than gathers, and they dominated the MoE backward pass.
  """
  return _gather_rows(_vary_like(x_NxD, src_R, inv_N), src_R, inv_N)


@jax.custom_vjp
def _gather_rows(x_NxD: Array, src_R: Array, inv_N: Array) -> Array:
  x_pad = jnp.concatenate([x_NxD, jnp.zeros((1,) + x_NxD.shape[1:], x_NxD.dtype)])
  return jnp.take(x_pad, jnp.minimum(src_R, x_NxD.shape[0]), axis=0, mode="clip")


def _gather_rows_fwd(x_NxD, src_R, inv_N):
  return _gather_rows(x_NxD, src_R, inv_N), (src_R, inv_N)


def _gather_rows_bwd(res, g_RxD):
  src_R, inv_N = res
  return _gather_rows(g_RxD, inv_N, src_R), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def row_maps(row_N: Array, n_rows: int) -> Array:
  """src_R (row -> slot, N where empty) for slot -> row placements (row >= n_rows: not placed)."""
  n = row_N.shape[0]
  return jnp.full((n_rows,), n, jnp.int32).at[row_N].set(jnp.arange(n, dtype=jnp.int32),
                                                         mode="drop")


def _rows_from_slots(x_NxD: Array, row_N: Array, n_rows: int) -> tuple[Array, Array]:
  """(x placed at the given rows, empty rows zero; the row -> slot map)."""
  src_R = row_maps(row_N, n_rows)
  return gather_rows(x_NxD, src_R, row_N), src_R


def _slots_from_rows(o_RxD: Array, row_N: Array, src_R: Array) -> Array:
  return gather_rows(o_RxD, row_N, src_R)


def capacity_rows(x_ExCxD: Array, k: ExpertKernels, dtype: Any) -> Array:
  """The GShard batched expert matmul on an [E, C, D] layout."""
  return swiglu(x_ExCxD, k, "ecd,edf->ecf", "ecf,efd->ecd", dtype)


def expert_rows(x_NxD: Array, e_N: Array, valid_N: Array, k: ExpertKernels, strategy: str,
                block: int, dtype: Any, cap: Optional[int] = None) -> tuple[Array, Array]:
  """(FFN_{e_n}(x_n) for every kept slot n, zero elsewhere, unweighted; kept mask [N]).

  With `cap`, slots ranked >= cap within their expert are dropped (not kept) first.
  """
  n, d = x_NxD.shape
  n_exp = jax.tree.leaves(k.gate_proj)[0].shape[0]
  order_N, rank_N, counts_E = sort_slots(e_N, valid_N, n_exp)
  if cap is not None:
    valid_N = valid_N & (rank_N < cap)
    counts_E = jnp.minimum(counts_E, cap)
  strategy = resolve_matmul(strategy, block)
  if strategy in ("ragged_dot", "block_loop") and any(hasattr(a, "einsum") for a in k):
    strategy = "padded_einsum"  # kernel objects only promise an einsum
  if strategy == "dense_mask":
    y_ExNxD = swiglu(x_NxD, k, "nd,edf->enf", "enf,efd->end", dtype)
    mask_NxE = jax.nn.one_hot(e_N, n_exp, dtype=y_ExNxD.dtype) * valid_N[:, None]
    return jnp.einsum("end,ne->nd", y_ExNxD, mask_NxE), valid_N
  if strategy == "padded_einsum" and cap is not None:
    rows = jnp.where(valid_N, e_N * cap + rank_N, n_exp * cap)
    x_RxD, src_R = _rows_from_slots(x_NxD, rows, n_exp * cap)
    o_RxD = capacity_rows(x_RxD.reshape(n_exp, cap, d), k, dtype).reshape(n_exp * cap, d)
    return _slots_from_rows(o_RxD, rows, src_R), valid_N
  if strategy == "ragged_dot":
    valid_sorted = valid_N[order_N]
    inv_N = jnp.zeros((n,), jnp.int32).at[order_N].set(jnp.arange(n, dtype=jnp.int32))
    xs_NxD = jnp.where(valid_sorted[:, None], gather_rows(x_NxD, order_N, inv_N), 0)
    xs_NxD = xs_NxD.astype(dtype)
    def rd(a, w):
      return jax.lax.ragged_dot(a, jnp.asarray(w).astype(dtype), counts_E.astype(jnp.int32))
    h = nn.silu(rd(xs_NxD, k.gate_proj)) * rd(xs_NxD, k.up_proj)
    ys_NxD = rd(h, k.down_proj) * valid_sorted[:, None]
    return gather_rows(ys_NxD, inv_N, order_N), valid_N
  if strategy not in ("padded_einsum", "block_loop"):
    raise ValueError(f"unknown moe_matmul {strategy!r}")
  # Block-sparse dropless layout: each expert's run padded to a multiple of `block` rows.
  b = block
  n_rows = -(-(n + min(n_exp, n) * (b - 1)) // b) * b
  padded_E = -(-counts_E // b) * b
  pend_E = jnp.cumsum(padded_E)
  pstart_E = pend_E - padded_E
  rows = jnp.where(valid_N, jnp.take(pstart_E, jnp.minimum(e_N, n_exp - 1)) + rank_N, n_rows)
  n_blocks = n_rows // b
  block_e = jnp.searchsorted(pend_E, jnp.arange(n_blocks) * b, side="right")
  block_e = jnp.minimum(block_e, n_exp - 1)  # trailing empty blocks: any expert, zero rows
  x_RxD, src_R = _rows_from_slots(x_NxD, rows, n_rows)
  if strategy == "block_loop":
    n_active = (pend_E[-1] // b).astype(jnp.int32)
    ws = [_vary_like(jnp.asarray(w), x_RxD, block_e) for w in k]
    o_RxD = block_loop_swiglu(x_RxD.reshape(n_blocks, b, d).astype(dtype), *ws, block_e,
                              n_active).reshape(n_rows, d)
    return _slots_from_rows(o_RxD, rows, src_R), valid_N
  fn = _block_swiglu if _tensor_parallel() else _remat_block_swiglu
  o_RxD = fn(x_RxD.reshape(n_blocks, b, d), k, block_e, dtype).reshape(n_rows, d)
  return _slots_from_rows(o_RxD, rows, src_R), valid_N


# block_loop: blocks of b rows, each owned by one expert, processed by a loop that stops after the
# last non-empty block. On XLA:CPU the batched einsum over gathered per-block weights ran at about
# half the speed of one plain matmul (small batched dots, plus the [blocks, D, F] weight copies and
# their scatter-add transpose); one [b, D] x [D, F] dot per loop iteration, reading the expert's
# weights in place, halved the forward + backward time of the expert FFN in isolation
# (docs/benchmarks.md). Residuals are the gate and up pre-activations [blocks, b, F] (what
# `dots_saveable` keeps for padded_einsum as well); blocks past `n_active` stay zero.


@jax.custom_vjp
def block_loop_swiglu(x_NxBxD: Array, wg_ExDxF: Array, wu_ExDxF: Array, wd_ExFxD: Array,
                      block_e: Array, n_active: Array) -> Array:
  """y[i] = FFN_{block_e[i]}(x[i]) for blocks i < n_active (zero beyond), in x's dtype."""
  return _block_loop_fwd_impl(x_NxBxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, block_e, n_active,
                              save=False)[0]


def _block_loop_fwd_impl(x, wg, wu, wd, block_e, n_active, save):
  nb, b, _ = x.shape
  f = wg.shape[-1]
  dt = x.dtype

  def body(i, carry):
    y, gs, us = carry
    e = block_e[i]
    xb = x[i]
    g = xb @ wg[e].astype(dt)
    u = xb @ wu[e].astype(dt)
    y = jax.lax.dynamic_update_index_in_dim(y, (nn.silu(g) * u) @ wd[e].astype(dt), i, 0)
    if save:
      gs = jax.lax.dynamic_update_index_in_dim(gs, g, i, 0)
      us = jax.lax.dynamic_update_index_in_dim(us, u, i, 0)
    return y, gs, us

  def zeros(shape):  # loop carries must vary over the same shard_map axes as the body's values
    return _vary_like(jnp.zeros(shape, dt), x, wg, block_e, n_active)
  z = zeros((nb, b, f) if save else (0,))
  y, gs, us = jax.lax.fori_loop(0, n_active, body, (zeros(x.shape), z, z))
  return y, gs, us


def _block_loop_fwd(x, wg, wu, wd, block_e, n_active):
  y, gs, us = _block_loop_fwd_impl(x, wg, wu, wd, block_e, n_active, save=True)
  return y, (x, wg, wu, wd, block_e, n_active, gs, us)


def _add_at(acc: Array, e: Array, delta: Array) -> Array:
  """acc[e] += delta as a slice read and an in-place slice write (`.at[e].add` lowers to a
  scatter whose bounds-check select made XLA:CPU rewrite the whole accumulator every step)."""
  cur = jax.lax.dynamic_index_in_dim(acc, e, 0, keepdims=False)
  return jax.lax.dynamic_update_index_in_dim(acc, cur + delta.astype(acc.dtype), e, 0)


def _block_loop_bwd(res, dy):
  x, wg, wu, wd, block_e, n_active, gs, us = res
  dt = x.dtype

  def body(i, carry):
    dx, dwg, dwu, dwd = carry
    e = block_e[i]
    xb, g, u, dyb = x[i], gs[i], us[i], dy[i].astype(dt)
    sig = jax.nn.sigmoid(g)
    sg = g * sig
    dh = dyb @ wd[e].astype(dt).T
    du = dh * sg
    dg = dh * u * (sig * (1 + g * (1 - sig)))
    dx = jax.lax.dynamic_update_index_in_dim(
        dx, dg @ wg[e].astype(dt).T + du @ wu[e].astype(dt).T, i, 0)
    dwd = _add_at(dwd, e, (sg * u).T @ dyb)
    dwg = _add_at(dwg, e, xb.T @ dg)
    dwu = _add_at(dwu, e, xb.T @ du)
    return dx, dwg, dwu, dwd

  init = tuple(_vary_like(jnp.zeros(a.shape, a.dtype), x, wg, block_e, n_active, dy)
               for a in (x, wg, wu, wd))
  dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_active, body, init)
  return dx, dwg, dwu, dwd, None, None


block_loop_swiglu.defvjp(_block_loop_fwd, _block_loop_bwd)


def _tensor_parallel() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return mesh is not None and not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1


def _block_swiglu(x_NxBxD: Array, k: ExpertKernels, block_e: Array, dtype: Any) -> Array:
  kb = ExpertKernels(*(take_experts(w, block_e) for w in k))
  return swiglu(x_NxBxD, kb, "nbd,ndf->nbf", "nbf,nfd->nbd", dtype)


# The per-block weights [n_blocks, D, F] are a gather of the expert weights: cheap to redo in
# the backward pass, expensive to keep. Without this checkpoint autodiff saves all three gathered
# copies per layer as residuals, which inside the layer scan costs a zero-fill, a write and a
# read of [layers, n_blocks, D, F] per weight (~10% of the bench_dsv2_tiny step on XLA:CPU).
# Matmul outputs are still saved, so nothing but the gathers is recomputed. Not under a
# tensor-parallel mesh: there the recomputed gather re-runs the all-gather of the expert weights
# over "tensor" (3 more all-gathers per layer in tests/golden), which costs more than it saves.
_remat_block_swiglu = jax.checkpoint(
    _block_swiglu, policy=jax.checkpoint_policies.dots_saveable, static_argnums=(3,))


def tile_rows(x_TxD: Array, k: int) -> Array:
  """[k * T, D]: x repeated k times (choice-major slots). Its transpose sums the k copies with
  slice adds: autodiff's reshape(k, T, D).sum(0) is the strided reduction that XLA:CPU runs
  slowly (see `combine_slots`; ~9 ms per MoE layer of the bench_dsv2_tiny step)."""
  return _tile_rows(x_TxD, k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tile_rows(x_TxD: Array, k: int) -> Array:
  return jnp.concatenate([x_TxD] * k, axis=0)


def _tile_rows_fwd(x_TxD, k):
  return _tile_rows(x_TxD, k), None


def _tile_rows_bwd(k, _, g_NxD):
  t = g_NxD.shape[0] // k
  acc = g_NxD[:t]
  for j in range(1, k):
    acc = acc + g_NxD[j * t:(j + 1) * t]
  return (acc,)


_tile_rows.defvjp(_tile_rows_fwd, _tile_rows_bwd)


def combine_slots(o_NxD: Array, w_TxK: Array) -> Array:
  """y_t = sum_j w[t, j] * o[j * T + t] for choice-major slots.

  Written as K slice-multiply-adds: the equivalent reshape(K, T, D).sum(0) ran ~500x slower on
  XLA:CPU (a strided major-axis reduction) and was the largest single cost of the MoE layer.
  """
  t, kk = w_TxK.shape
  w_TxK = w_TxK.astype(o_NxD.dtype)
  y_TxD = o_NxD[:t] * w_TxK[:, :1]
  for j in range(1, kk):
    y_TxD = y_TxD + o_NxD[j * t:(j + 1) * t] * w_TxK[:, j:j + 1]
  return y_TxD


def local_moe(x_TxD: Array, idx_TxK: Array, w_TxK: Array, valid_T: Array, k: ExpertKernels,
              strategy: str, block: int, dtype: Any,
              cap_factor: Optional[float] = None) -> tuple[Array, Array]:
  """Routed-expert output sum_k w_k FFN_{e_k}(x) on one device; returns (y_TxD, dropped slots)."""
  t, d = x_TxD.shape
  kk = idx_TxK.shape[1]
  n_exp = jax.tree.leaves(k.gate_proj)[0].shape[0]
  e_N = idx_TxK.T.reshape(-1)  # choice-major slot order
  valid_N = jnp.tile(valid_T, kk)
  cap = None if cap_factor is None else capacity(t * kk, n_exp, cap_factor)
  if resolve_matmul(strategy) == "dense_mask" and cap is None:
    # Token-level reference: every expert on every token, combined with a [T, E] weight matrix.
    comb_TxE = jnp.zeros((t, n_exp), w_TxK.dtype).at[jnp.arange(t)[:, None], idx_TxK].add(
        w_TxK * valid_T[:, None])
    y_ExTxD = swiglu(x_TxD, k, "td,edf->etf", "etf,efd->etd", dtype)
    return jnp.einsum("etd,te->td", y_ExTxD, comb_TxE.astype(y_ExTxD.dtype)), jnp.int32(0)
  x_NxD = tile_rows(x_TxD, kk)
  o_NxD, kept_N = expert_rows(x_NxD, e_N, valid_N, k, strategy, block, dtype, cap)
  return combine_slots(o_NxD, w_TxK), jnp.sum(valid_N & ~kept_N).astype(jnp.int32)
