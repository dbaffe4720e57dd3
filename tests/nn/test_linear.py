"""The projection einsum's hand-written backward pass (XLA:CPU) against autodiff."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ds_jax import sharding as shd
from ds_jax.nn import linear

CASES = [((2, 5, 8), (8, 6), "...z,za->...a"), ((3, 8), (8, 2, 3), "...z,zab->...ab"),
         ((2, 2, 4, 8), (8, 3), "...z,za->...a")]


def _grads(fn, x, w):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("xs,ws,eq", CASES)
def test_projection_matches_autodiff(xs, ws, eq):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=xs), jnp.float32)
  w = jnp.asarray(rng.normal(size=ws), jnp.float32)
  ours = lambda x, w: linear.einsum(eq, x, w, dtype=jnp.float32)
  ref = lambda x, w: jnp.einsum(eq, x, w)
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-6, atol=1e-6)
  for a, b in zip(_grads(ours, x, w), _grads(ref, x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _leading_contractions(fn, *args) -> int:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return len(re.findall(r"dot\(.*lhs_contracting_dims=\{0\}", hlo))


def test_weight_gradient_is_a_row_major_matmul_on_one_device():
  """The reason for the custom VJP: no x^T g dot contracting the leading axis (slow on XLA:CPU)
  on one device; under a multi-device mesh autodiff's dot is kept (sharding propagation)."""
  x = jnp.ones((64, 32), jnp.float32)
  w = jnp.ones((32, 16), jnp.float32)
  loss = lambda w, x: jnp.sum(linear.einsum("...z,za->...a", x, w, dtype=jnp.float32) ** 2)
  plain = lambda w, x: jnp.sum(jnp.einsum("...z,za->...a", x, w) ** 2)
  assert _leading_contractions(jax.grad(plain), w, x) >= 1  # the pattern this test looks for
  assert _leading_contractions(jax.grad(loss), w, x) == 0
  mesh = shd.make_mesh(dict(data=2, fsdp=1, expert=1, tensor=1), jax.devices()[:2])
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    assert _leading_contractions(jax.grad(loss), w, xs) >= 1
