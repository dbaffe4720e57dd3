"""DeepSeek-V3 multi-token prediction: layout, wiring against an explicit composition, alignment,
causality via gradients, loss shift, and that a zero loss weight leaves the main model alone."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.config import ModelConfig
from ds_jax.losses import lm_loss
from ds_jax.models.lm import Block, Transformer
from ds_jax.nn.mtp import mtp_loss, shift_left

B, L = 2, 8


def tiny_cfg(n=2, **kw):
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2,
                     num_nextn_predict_layers=n, **kw)


@functools.lru_cache(maxsize=None)
def model_and_params(n=2):
  cfg = tiny_cfg(n)
  tokens = jnp.zeros((B, L), jnp.int32)
  params = nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)["params"])
  rng = np.random.default_rng(0)  # random values everywhere (norm scales too), no init compile
  params = jax.tree.map(lambda a: jnp.asarray((1.0 if a.ndim == 1 else 0.0) +
                                              0.2 * rng.normal(size=a.shape), jnp.float32), params)
  return cfg, params


@functools.lru_cache(maxsize=None)
def forward():
  """One compiled forward over input embeddings [L + 1, L, D] shared by the tests below."""
  cfg, _ = model_and_params()
  return jax.jit(lambda p, e: Transformer(cfg).apply(
      {"params": p}, jnp.zeros(e.shape[:2], jnp.int32), inputs_embeds_BxLxD=e))


def embeds_of(params, t_BxL):
  """The embedding lookup padded to the shared forward's batch of L + 1 rows."""
  e = np.asarray(params["embed_tokens"]["embedding"])[np.asarray(t_BxL)]
  return jnp.asarray(np.concatenate([e, np.zeros((L + 1 - len(e), L, e.shape[-1]))]),
                     jnp.float32)


def tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, size=(B, L)), jnp.int32)


def test_layout_and_shapes():
  cfg, params = model_and_params()
  logits, aux = forward()(params, embeds_of(params, tokens()))
  assert logits.shape == (L + 1, L, 64) and aux["mtp_logits"].shape == (2, L + 1, L, 64)
  assert aux["mtp_moe"] == {}
  # Embedding and head are shared: MTP adds only mtp_{j} trees.
  assert set(params) == {"embed_tokens", "layers_0", "norm", "lm_head", "mtp_0", "mtp_1"}
  assert aux["hidden"].shape == (L + 1, L, 32)
  assert set(params["mtp_0"]) == {"enorm", "hnorm", "eh_proj", "block", "shared_head_norm"}
  assert params["mtp_0"]["eh_proj"]["kernel"].shape == (64, 32)


def np_rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def test_wiring_matches_explicit_composition():
  """mtp_logits[j] = head(norm_j(Block_j(eh_proj([enorm(E t_{i+j+1}) ; hnorm(h^j_i)])))), with
  h^0 = the main model's normed hidden state and each depth feeding the next."""
  cfg, params = model_and_params()
  t = tokens(1)
  _, aux = forward()(params, embeds_of(params, t))
  aux = jax.tree.map(lambda a: a[..., :B, :, :], aux)  # the B real rows
  emb = np.asarray(params["embed_tokens"]["embedding"])[np.asarray(t)]
  h = np_rms(np.asarray(aux["hidden"]), np.asarray(params["norm"]["scale"]))
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  block = jax.jit(Block(cfg, False).apply)
  for j in range(2):
    p = jax.tree.map(np.asarray, params[f"mtp_{j}"])
    e = np.concatenate([emb[:, j + 1:], np.zeros_like(emb[:, :j + 1])], axis=1)
    x = np.concatenate([np_rms(e, p["enorm"]["scale"]), np_rms(h, p["hnorm"]["scale"])], -1)
    x = x @ p["eh_proj"]["kernel"]
    y, _ = block({"params": params[f"mtp_{j}"]["block"]}, jnp.asarray(x, jnp.float32), pos)
    h = np_rms(np.asarray(y), p["shared_head_norm"]["scale"])
    want = h @ np.asarray(params["lm_head"]["kernel"])
    np.testing.assert_allclose(np.asarray(aux["mtp_logits"][j]), want, rtol=1e-4, atol=1e-4)


def test_causality_by_perturbation():
  """Depth j at position i may read inputs 0..i+j+1 (the token it predicts is i+j+2), no more.

  Row 0 of the batch is a base input; row p + 1 perturbs only input position p. Depth j's logits
  at i must be bit-identical to row 0's exactly when p > i + j + 1."""
  _, params = model_and_params()
  rng = np.random.default_rng(2)
  base = rng.normal(size=(L, 32))
  e = np.repeat(base[None], L + 1, axis=0)
  for p in range(L):
    e[p + 1, p] += rng.normal(size=32)
  _, aux = forward()(params, jnp.asarray(e, jnp.float32))
  out = np.asarray(aux["mtp_logits"])  # [n, L + 1, L, V]
  for j in range(2):
    for i in range(L):
      for p in range(L):
        changed = np.abs(out[j, p + 1, i] - out[j, 0, i]).max()
        if p > i + j + 1:
          assert changed < 1e-6, (j, i, p)
        else:
          assert changed > 1e-4, (j, i, p)


def test_zero_weight_leaves_main_model_gradients_unchanged():
  cfg, params = model_and_params()
  cfg0, _ = model_and_params(0)
  main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
  t = tokens(3)
  w = jnp.ones((B, L - 1))

  def loss(p, weight, c):
    logits, aux = Transformer(c).apply({"params": p}, t)
    total = lm_loss(logits[:, :-1], t[:, 1:], w)[0]
    if c.num_nextn_predict_layers:
      total = total + weight * mtp_loss(aux["mtp_logits"], t)[0]
    return total

  grad = jax.jit(jax.grad(loss), static_argnums=2)
  g_plain = grad(main, 0.0, cfg0)
  g_zero = grad(params, 0.0, cfg)
  g_some = grad(params, 0.3, cfg)
  for k in main:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 g_zero[k], g_plain[k])
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(
      {k: v for k, v in g_zero.items() if k.startswith("mtp_")}))
  # A positive weight trains the trunk through the MTP path (so this test can fail).
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_some["layers_0"],
                      g_plain["layers_0"])
  assert max(jax.tree.leaves(diff)) > 1e-6


def test_mtp_loss_shift_matches_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, B, L, 11)).astype(np.float32)
  toks = rng.integers(0, 11, size=(B, L))
  weights = (rng.random((B, L)) > 0.3).astype(np.float32)
  got, aux = jax.jit(mtp_loss)(jnp.asarray(logits), jnp.asarray(toks), jnp.asarray(weights))
  per = []
  for j in range(2):
    nll, cnt = 0.0, 0.0
    for b in range(B):
      for i in range(L - j - 2):
        z = logits[j, b, i].astype(np.float64)
        lse = np.log(np.exp(z - z.max()).sum()) + z.max()
        nll += weights[b, i + j + 2] * (lse - z[toks[b, i + j + 2]])
        cnt += weights[b, i + j + 2]
    per.append(nll / cnt)
  np.testing.assert_allclose(np.asarray(aux["mtp_loss_per_depth"]), per, rtol=1e-5)
  assert float(got) == pytest.approx(np.mean(per), rel=1e-5)


def test_shift_left():
  x = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
  np.testing.assert_array_equal(np.asarray(shift_left(x, 1))[0, :, 0], [1, 2, 3, 0])
  np.testing.assert_array_equal(np.asarray(shift_left(x, 0)), np.asarray(x))


@pytest.mark.slow  # one more model compile; the MLA math is covered by test_mla.py
def test_mla_trunk_with_mtp_runs():
  cfg = tiny_cfg(1, attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8)
  t = tokens(5)
  variables = jax.jit(Transformer(cfg).init)(jax.random.key(1), t)
  assert "kv_b_proj" in variables["params"]["mtp_0"]["block"]["self_attn"]
  _, aux = jax.jit(Transformer(cfg).apply)(variables, t)
  assert aux["mtp_logits"].shape == (1, B, L, 64)
  assert np.isfinite(np.asarray(aux["mtp_logits"])).all()


def test_lazy_import_under_trace():
  """lm.py imports ds_jax.nn.mtp inside its trace; that import must not compute with jnp."""
  import subprocess
  import sys
  code = ("import jax, jax.numpy as jnp\n"
          "from ds_jax.config import ModelConfig\n"
          "from ds_jax.models.lm import Transformer\n"
          "c = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,"
          " num_attention_heads=2, num_key_value_heads=2, num_nextn_predict_layers=1)\n"
          "out = jax.eval_shape(Transformer(c).init, jax.random.key(0), jnp.zeros((1, 4), int))\n"
          "print(sorted(out['params']))\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env={**__import__("os").environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "mtp_0" in r.stdout
