"""Decoder LM invariants: causality, scan == unrolled, remat == no remat, tied embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.config import model_config
from ds_jax.models import lm
from tests.helpers import tiny_cfg


def _mc(**kw):
  return model_config(tiny_cfg(**kw).model)


def test_causal_gradients():
  """d logits[t] / d input[s] == 0 for s > t, and != 0 for s <= t."""
  mc = _mc()
  params = lm.init(mc, jax.random.key(0))
  model = lm.Transformer(mc)
  x = jax.random.normal(jax.random.key(1), (1, 12, mc.hidden_size))
  tokens = jnp.zeros((1, 12), jnp.int32)
  t = 5

  def out_t(x):
    logits, _ = model.apply({"params": params}, tokens, inputs_embeds_BxLxD=x)
    return jnp.sum(logits[0, t] * jnp.arange(mc.vocab_size))

  g = np.asarray(jax.grad(out_t)(x))[0]  # [L, D]
  per_pos = np.abs(g).sum(-1)
  assert np.all(per_pos[t + 1:] == 0.0)
  assert np.all(per_pos[:t + 1] > 0.0)


@pytest.mark.parametrize("kw", [dict(remat="full"), dict(remat="dots"),
                                dict(tie_word_embeddings=True)])
def test_scan_matches_unrolled(kw):
  mc_scan = _mc(scan_layers=True, **kw)
  mc_loop = _mc(scan_layers=False, **kw)
  p_scan = lm.init(mc_scan, jax.random.key(0))
  # Unstack the scanned parameters into layer_<i>.
  p_loop = {k: v for k, v in p_scan.items() if not k.startswith("layers_")}
  for i in range(mc_scan.num_hidden_layers):
    p_loop[f"layer_{i}"] = jax.tree.map(lambda a: a[i], p_scan["layers_0"])
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 259)
  a = lm.apply(mc_scan, p_scan, tokens)
  b = lm.apply(mc_loop, p_loop, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  if kw.get("tie_word_embeddings"):
    assert "lm_head" not in p_scan


def test_bfloat16_compute_close_to_float32():
  mc = _mc()
  params = lm.init(mc, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 259)
  a = lm.apply(mc, params, tokens)
  b = lm.apply(mc.replace(dtype="bfloat16"), params, tokens)
  assert b.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
