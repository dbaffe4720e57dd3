"""Loss functions: pure array functions returning `(scalar, aux_dict)`.

Language modelling losses live here; contrastive / MSE alignment losses follow below them.
"""

from __future__ import annotations

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
