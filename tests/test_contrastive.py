"""Contrastive losses against NumPy formulas, and sharded (8 devices) == unsharded."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ds_jax import losses


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax_loss(a, b, t, labels=None):
  a, b = _norm(a), _norm(b)
  n = len(a)
  pos = np.eye(n) if labels is None else (labels[:, None] == labels[None]).astype(float)
  tgt = pos / pos.sum(-1, keepdims=True)
  l_ab = -(tgt * _np_log_softmax(t * a @ b.T)).sum() / n
  l_ba = -(tgt * _np_log_softmax(t * b @ a.T)).sum() / n
  return (l_ab + l_ba) / 2


def np_sigmoid_loss(a, b, t, bias, labels=None):
  a, b = _norm(a), _norm(b)
  n = len(a)
  pos = np.eye(n) if labels is None else (labels[:, None] == labels[None]).astype(float)
  z = 2 * pos - 1
  logits = t * a @ b.T + bias
  return np.sum(np.log1p(np.exp(-z * logits))) / n


def _data(n=16, e=8, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, e)).astype(np.float64)
  b = (a + rng.normal(size=(n, e))).astype(np.float64)
  labels = rng.integers(0, 4, size=n)
  return a, b, labels


@pytest.mark.parametrize("use_labels", [False, True])
def test_losses_match_numpy(use_labels):
  a, b, labels = _data()
  lab = labels if use_labels else None
  lab_j = jnp.asarray(labels) if use_labels else None
  log_t = np.log(7.0)
  got, aux = losses.softmax_contrastive_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                             jnp.float32(log_t), lab_j)
  np.testing.assert_allclose(got, np_softmax_loss(a, b, 7.0, lab), rtol=1e-5)
  np.testing.assert_allclose(aux["temperature"], 7.0, rtol=1e-6)
  got, _ = losses.sigmoid_contrastive_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                                           jnp.float32(np.log(10.0)), jnp.float32(-3.0), lab_j)
  np.testing.assert_allclose(got, np_sigmoid_loss(a, b, 10.0, -3.0, lab), rtol=1e-5)
  mse, _ = losses.mse_alignment_loss(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_allclose(mse, np.mean(np.sum((_norm(a) - _norm(b)) ** 2, -1)), rtol=1e-5)
  cm, aux = losses.contrastive_mse_loss(jnp.asarray(a), jnp.asarray(b), jnp.float32(log_t),
                                        mse_weight=0.5, labels_B=lab_j)
  np.testing.assert_allclose(cm, np_softmax_loss(a, b, 7.0, lab) + 0.5 * float(mse), rtol=1e-5)


def test_temperature_cap_and_perfect_alignment():
  assert float(losses.temperature(jnp.float32(10.0))) == losses.MAX_TEMPERATURE
  # gradient through the cap is zero, below the cap it is exp(log_t)
  assert float(jax.grad(losses.temperature)(jnp.float32(10.0))) == 0.0
  x = jnp.eye(8)
  low, _ = losses.softmax_contrastive_loss(x, x, jnp.float32(np.log(100.0)))
  high, _ = losses.softmax_contrastive_loss(x, jnp.roll(x, 1, 0), jnp.float32(np.log(100.0)))
  assert float(low) < 1e-6 and float(high) > 50.0
  # unique labels == no labels
  a, b, _ = _data()
  u, _ = losses.sigmoid_contrastive_loss(a, b, 1.0, -1.0, jnp.arange(16))
  v, _ = losses.sigmoid_contrastive_loss(a, b, 1.0, -1.0)
  np.testing.assert_allclose(u, v, rtol=1e-6)


def _loss_fn(kind, axis_name=None):
  def f(a, b, labels, log_t, bias):
    loss, _ = losses.contrastive_mse_loss(a, b, log_t, bias, kind=kind, mse_weight=0.3,
                                          labels_B=labels, axis_name=axis_name)
    return loss
  return f


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sharded_equals_unsharded(kind):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  a, b, labels = _data(n=32)
  args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(labels),
          jnp.float32(np.log(10.0)), jnp.float32(-5.0))
  ref_fn = jax.value_and_grad(_loss_fn(kind), argnums=(0, 1, 3, 4))
  ref_loss, ref_grads = ref_fn(*args)
  # 1) explicit shard_map with all-gathered embeddings.
  sm = jax.shard_map(_loss_fn(kind, "data"), mesh=mesh,
                     in_specs=(P("data"), P("data"), P("data"), P(), P()), out_specs=P())
  loss, grads = jax.jit(jax.value_and_grad(sm, argnums=(0, 1, 3, 4)))(*args)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
  # 2) plain jit with batch-sharded inputs (the compiler inserts the collectives).
  shard = NamedSharding(mesh, P("data"))
  put = [jax.device_put(x, shard) for x in args[:3]] + list(args[3:])
  loss2, grads2 = jax.jit(ref_fn)(*put)
  np.testing.assert_allclose(loss2, ref_loss, atol=1e-5, rtol=1e-5)
  for g, r in zip(grads2, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)
