"""Loss functions: pure array functions returning `(scalar, aux_dict)`.

Language modelling losses live here; contrastive / MSE alignment losses follow below them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def lm_loss(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array,
            z_loss: float = 0.0) -> tuple[Array, dict]:
  """Token-weighted cross-entropy (+ z-loss = coef * mean(logsumexp^2)).

  Returns the *mean* over weighted tokens and, in aux, the weighted `sum` and token `count` so
  callers (gradient accumulation, sharded eval) can combine micro-batches exactly.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  lse_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  nll_BxL = lse_BxL - target_logit
  w = weights_BxL.astype(jnp.float32)
  count = jnp.sum(w)
  nll_sum = jnp.sum(nll_BxL * w)
  z_sum = jnp.sum(jnp.square(lse_BxL) * w)
  total_sum = nll_sum + z_loss * z_sum
  denom = jnp.maximum(count, 1.0)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets_BxL) * w)
  aux = {"nll_sum": nll_sum, "sum": total_sum, "count": count, "z_sum": z_sum,
         "correct": correct}
  return total_sum / denom, aux


# ----------------------------------------------------------------------------------------------
# Contrastive alignment losses (CLIP softmax, SigLIP sigmoid, MSE, contrastive_mse).
#
# Every loss takes two embedding batches a_BxE, b_BxE (row i of a is paired with row i of b) and
# optional class labels_B: with labels, every same-class pair counts as a positive (multi-positive,
# for data with repeated classes). Inside `shard_map` pass `axis_name`: each device then holds a
# slice of the batch, the other slices are all-gathered, and the loss is the global-batch mean.

MAX_TEMPERATURE = 100.0
SOFTMAX_INIT_LOG_T = math.log(1 / 0.07)  # CLIP
SIGMOID_INIT_LOG_T = math.log(10.0)  # SigLIP
SIGMOID_INIT_BIAS = -10.0


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


def temperature(log_t: Array) -> Array:
  """exp(log_t) capped at MAX_TEMPERATURE (as CLIP clamps its logit scale)."""
  return jnp.minimum(jnp.exp(log_t), MAX_TEMPERATURE)


def _gather(x: Array, axis_name) -> Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _psum(x: Array, axis_name) -> Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def positive_mask(n_local: int, n_global: int, labels_B: Array | None, axis_name=None) -> Array:
  """[local, global] bool: which global columns are positives of each local row."""
  if labels_B is None:
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    return (jnp.arange(n_local)[:, None] + offset) == jnp.arange(n_global)[None, :]
  return labels_B[:, None] == _gather(labels_B, axis_name)[None, :]


def _soft_ce(logits_BxN: Array, pos_BxN: Array) -> Array:
  """Summed cross-entropy against the uniform distribution over each row's positives."""
  target = pos_BxN / jnp.sum(pos_BxN, -1, keepdims=True)
  return -jnp.sum(target * jax.nn.log_softmax(logits_BxN, -1))


def softmax_contrastive_loss(a_BxE: Array, b_BxE: Array, log_t: Array,
                             labels_B: Array | None = None,
                             axis_name=None) -> tuple[Array, dict]:
  """Symmetric InfoNCE (CLIP): mean of a->b and b->a cross-entropy over t * cos-similarities."""
  a, b = l2_normalize(a_BxE), l2_normalize(b_BxE)
  n = a.shape[0]
  a_all, b_all = _gather(a, axis_name), _gather(b, axis_name)
  n_all = a_all.shape[0]
  t = temperature(log_t)
  pos = positive_mask(n, n_all, labels_B, axis_name)
  logits_ab = t * a @ b_all.T
  logits_ba = t * b @ a_all.T
  total = _psum(_soft_ce(logits_ab, pos) + _soft_ce(logits_ba, pos), axis_name)
  hits = jnp.take_along_axis(pos, jnp.argmax(logits_ab, -1)[:, None], -1)
  acc = _psum(jnp.sum(hits), axis_name) / n_all
  return total / (2 * n_all), {"temperature": t, "accuracy": acc}


def sigmoid_contrastive_loss(a_BxE: Array, b_BxE: Array, log_t: Array, bias: Array,
                             labels_B: Array | None = None,
                             axis_name=None) -> tuple[Array, dict]:
  """SigLIP: -sum log sigmoid(z_ij (t a_i.b_j + bias)) / B with z = +1 on positives, -1 else."""
  a, b = l2_normalize(a_BxE), l2_normalize(b_BxE)
  b_all = _gather(b, axis_name)
  n_all = b_all.shape[0]
  t = temperature(log_t)
  pos = positive_mask(a.shape[0], n_all, labels_B, axis_name)
  logits = t * a @ b_all.T + bias
  z = 2.0 * pos - 1.0
  total = _psum(-jnp.sum(jax.nn.log_sigmoid(z * logits)), axis_name)
  return total / n_all, {"temperature": t, "bias": bias}


def mse_alignment_loss(a_BxE: Array, b_BxE: Array, axis_name=None) -> tuple[Array, dict]:
  """Mean over pairs of ||norm(a_i) - norm(b_i)||^2 (= 2 - 2 cos); pulls positives only."""
  a, b = l2_normalize(a_BxE), l2_normalize(b_BxE)
  total = _psum(jnp.sum(jnp.square(a - b)), axis_name)
  n_all = _psum(jnp.asarray(a.shape[0], jnp.float32), axis_name)
  loss = total / n_all
  return loss, {"mse": loss}


def contrastive_mse_loss(a_BxE: Array, b_BxE: Array, log_t: Array, bias: Array | None = None,
                         kind: str = "softmax", mse_weight: float = 1.0,
                         labels_B: Array | None = None,
                         axis_name=None) -> tuple[Array, dict]:
  """contrastive (`kind` = "softmax" | "sigmoid") + mse_weight * MSE of normalised pairs."""
  if kind == "softmax":
    c, aux = softmax_contrastive_loss(a_BxE, b_BxE, log_t, labels_B, axis_name)
  elif kind == "sigmoid":
    c, aux = sigmoid_contrastive_loss(a_BxE, b_BxE, log_t, bias, labels_B, axis_name)
  else:
    raise ValueError(f"unknown contrastive kind {kind!r}")
  m, _ = mse_alignment_loss(a_BxE, b_BxE, axis_name)
  return c + mse_weight * m, dict(aux, contrastive=c, mse=m)
