"""ESFT-style subset expert adapters (LoraConfig expert_mode="subset") and expert selection."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ds_jax import lora
from ds_jax.config import ModelConfig
from ds_jax.lora import esft

S, E, D, F, R = 2, 4, 5, 6, 2
SUBSET = ((1, 3), (2,))  # layer 0: experts 1 and 3; layer 1: expert 2


def _params(rng):
  w = rng.normal(size=(S, E, D, F)).astype(np.float32)
  return w, {"layers_1": {"mlp": {"experts": {"down_proj": jnp.asarray(w)},
                                  "o_proj": {"kernel": jnp.asarray(
                                      rng.normal(size=(S, D, F)), jnp.float32)}}}}


def _expert_out(k, x, s):
  ks = jax.tree.map(lambda v: v[s], k)
  return np.asarray(ks.einsum("ecd,edf->ecf", x, dtype=jnp.float32))


def _adam_steps(t, fr, x, target, steps=3):
  """A few Adam steps on the trainable tree `t` for a squared error over every expert's
  down_proj output (each stacked layer s against target[s])."""
  def loss(t):
    kk = lora.combine(t, fr)["layers_1"]["mlp"]["experts"]["down_proj"]
    return sum(jnp.sum((jax.tree.map(lambda v: v[s], kk).einsum(
        "ecd,edf->ecf", x, dtype=jnp.float32) - target[s]) ** 2) for s in range(S))
  tx = optax.adam(0.05)
  st = tx.init(t)
  for _ in range(steps):
    upd, st = tx.update(jax.grad(loss)(t), st)
    t = optax.apply_updates(t, upd)
  return t


def test_subset_expert_adapter_count_training_and_io():
  rng = np.random.default_rng(0)
  w, params = _params(rng)
  cfg = lora.LoraConfig(target_modules="all-linear", r=R, lora_alpha=4, expert_mode="subset",
                        expert_subset=SUBSET)
  p = lora.add_adapter(params, "esft", cfg, jax.random.key(0))
  k = p["layers_1"]["mlp"]["experts"]["down_proj"]
  a = np.asarray(k.adapters["esft"]["lora_a"])
  chosen = np.zeros((S, E), bool)
  for s, row in enumerate(SUBSET):
    chosen[s, list(row)] = True
  assert not a[~chosen].any() and np.abs(a[chosen]).min(axis=(-2, -1)).all()  # A only there
  t, fr = lora.split_trainable(p)
  te = t["layers_1"]["mlp"]["experts"]["down_proj"]
  assert te["lora_a"].shape == (3, D, R) and te["lora_b"].shape == (3, R, F)
  # Count: chosen experts · r · (D + F) for the expert weight + o_proj's S · r · (D + F).
  n_chosen = sum(map(len, SUBSET))
  assert lora.count_params(p)["trainable"] == n_chosen * R * (D + F) + S * R * (D + F)
  assert esft.subset_params(SUBSET, [(D, F)], R) == n_chosen * R * (D + F)

  # A few Adam steps on a loss over every expert's output: the unchosen experts' A, B stay
  # exactly 0 (their outputs are the base's), the chosen ones move, the base is untouched.
  x = jnp.asarray(rng.normal(size=(E, 3, D)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(S, E, 3, F)), jnp.float32)

  t = _adam_steps(t, fr, x, target)
  p2 = lora.combine(t, fr)
  k2 = p2["layers_1"]["mlp"]["experts"]["down_proj"]
  a2, b2 = (np.asarray(k2.adapters["esft"][n]) for n in ("lora_a", "lora_b"))
  assert not a2[~chosen].any() and not b2[~chosen].any()
  assert np.abs(b2[chosen]).min(axis=(-2, -1)).all()  # every chosen expert trained
  np.testing.assert_array_equal(k2.base, w)
  for s in range(S):
    y = _expert_out(k2, x, s)
    for e in range(E):
      we = w[s, e] + 2.0 * a2[s, e] @ b2[s, e]  # scale = alpha / r = 2
      np.testing.assert_allclose(y[e], np.asarray(x[e]) @ we, rtol=1e-5, atol=1e-5)
      if not chosen[s, e]:
        np.testing.assert_array_equal(y[e], np.asarray(jnp.einsum("cd,df->cf", x[e], w[s, e])))
  np.testing.assert_allclose(  # merged == unmerged
      _expert_out(lora.merge(p2)["layers_1"]["mlp"]["experts"]["down_proj"], x, 1),
      _expert_out(k2, x, 1), rtol=1e-5, atol=1e-5)
  with tempfile.TemporaryDirectory() as tmp:
    lora.save_adapter(tmp, p2, "esft")
    from safetensors.numpy import load_file
    saved = load_file(f"{tmp}/adapter_model.safetensors")
    assert saved["layers_1/mlp/experts/down_proj.lora_a"].shape == (3, D, R)  # chosen only
    q = lora.load_adapter(tmp, params)
  for u, v in zip(jax.tree.leaves(q), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(u, v)
  with pytest.raises(ValueError, match="subset"):
    lora.trainable_mask(p2)


def test_subset_config_errors():
  with pytest.raises(ValueError, match="expert_mode"):
    lora.LoraConfig(expert_mode="chosen")
  with pytest.raises(ValueError, match="expert_subset"):
    lora.LoraConfig(expert_mode="subset")  # no experts named
  with pytest.raises(ValueError, match="expert_subset"):
    lora.LoraConfig(expert_subset=((0,),))  # needs expert_mode="subset"
  with pytest.raises(ValueError, match="expert_subset"):
    lora.LoraConfig(expert_mode="subset", expert_subset=((1, 1),))
  with pytest.raises(ValueError, match="expert_subset"):
    lora.LoraConfig(expert_mode="subset", expert_subset=5)
  c = lora.LoraConfig(expert_mode="subset", expert_subset=[[3, 1], []])  # JSON-style lists
  assert c.expert_subset == ((3, 1), ()) and lora.LoraConfig.from_dict(c.to_dict()) == c
  _, params = _params(np.random.default_rng(1))
  for bad, msg in ((((0,),), "2 stacked layer"), (((0,), (4,)), "out of range")):
    with pytest.raises(ValueError, match=f"expert_subset.*{msg}|{msg}"):
      lora.add_adapter(params, "x", lora.LoraConfig(target_modules=["experts"],
                                                    expert_mode="subset", expert_subset=bad),
                       jax.random.key(0))


def test_top_experts_and_affinity_from_router():
  aff = np.array([[0.1, 0.5, 0.2, 0.2], [0.4, 0.1, 0.3, 0.2]])
  assert esft.top_experts(aff, 1) == ((1,), (0,))
  assert esft.top_experts(aff, 2) == ((1, 2), (0, 2))
  with pytest.raises(ValueError):
    esft.top_experts(aff, 0)
  mc = ModelConfig(model_type="deepseek_v2", vocab_size=32, hidden_size=16, intermediate_size=24,
                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                   n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                   moe_intermediate_size=8, first_k_dense_replace=1)
  from ds_jax.models import lm
  shapes = jax.eval_shape(lambda k: lm.init(mc, k), jax.random.key(0))  # random, not lm.init:
  leaves, tdef = jax.tree.flatten(shapes)                              # running it is slow
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tdef, [jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype)
                                     for x in leaves])
  toks = np.asarray(jax.random.randint(jax.random.key(2), (2, 2, 8), 0, 32))
  a = esft.expert_affinity(mc, params, toks)
  assert a.shape == (2, 4)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
  # The router's load over both batches at once is the token-weighted mean of the per-batch ones.
  whole = esft.expert_affinity(mc, params, [toks.reshape(4, 8)])
  np.testing.assert_allclose(a, whole, rtol=1e-5, atol=1e-7)


def test_shared_plus_subset_expert_adapter():
  """expert_mode="shared" with an expert_subset: the tied update for every expert plus the chosen
  experts' own A_e, B_e (rank subset_r): ΔW_e = g_e·s·A·B + s·A_e·B_e; count, training keeps the
  unchosen experts' A_e, B_e at 0, formula per expert, save / load."""
  rng = np.random.default_rng(2)
  w, params = _params(rng)
  rs = 1
  cfg = lora.LoraConfig(target_modules=["experts"], r=R, lora_alpha=4, expert_mode="shared",
                        expert_scale="expert", expert_subset=SUBSET, subset_r=rs)
  p = lora.add_adapter(params, "h", cfg, jax.random.key(0))
  chosen = np.zeros((S, E), bool)
  for s, row in enumerate(SUBSET):
    chosen[s, list(row)] = True
  n_chosen = int(chosen.sum())
  # tied: S·r·(D+F) + S·E gains; subset: chosen · subset_r · (D+F).
  assert lora.count_params(p)["trainable"] == S * R * (D + F) + S * E + n_chosen * rs * (D + F)
  x = jnp.asarray(rng.normal(size=(E, 3, D)), jnp.float32)
  k = p["layers_1"]["mlp"]["experts"]["down_proj"]
  for s in range(S):  # B = 0 everywhere: identity
    np.testing.assert_allclose(_expert_out(k, x, s), np.einsum("ecd,edf->ecf", x, w[s]),
                               rtol=1e-6, atol=1e-6)
  t, fr = lora.split_trainable(p)
  te = t["layers_1"]["mlp"]["experts"]["down_proj"]
  assert te["subset_a"].shape == (n_chosen, D, rs) and te["lora_a"].shape == (S, D, R)
  target = jnp.asarray(rng.normal(size=(S, E, 3, F)), jnp.float32)

  t = _adam_steps(t, fr, x, target)
  p2 = lora.combine(t, fr)
  ad = p2["layers_1"]["mlp"]["experts"]["down_proj"].adapters["h"]
  sa, sb = np.asarray(ad["subset_a"]), np.asarray(ad["subset_b"])
  assert not sa[~chosen].any() and not sb[~chosen].any() and np.abs(sb[chosen]).min() > 0
  a, b, g = (np.asarray(t["layers_1"]["mlp"]["experts"]["down_proj"][n])
             for n in ("lora_a", "lora_b", "expert_scale"))
  k2 = p2["layers_1"]["mlp"]["experts"]["down_proj"]
  for s in range(S):
    y = _expert_out(k2, x, s)
    for e in range(E):  # scale = alpha / r = 2 for both terms
      we = w[s, e] + 2.0 * g[s, e, 0] * a[s] @ b[s] + 2.0 * sa[s, e] @ sb[s, e]
      np.testing.assert_allclose(y[e], np.asarray(x[e]) @ we, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      _expert_out(lora.merge(p2)["layers_1"]["mlp"]["experts"]["down_proj"], x, 0),
      _expert_out(k2, x, 0), rtol=1e-5, atol=1e-5)
  with tempfile.TemporaryDirectory() as tmp:
    lora.save_adapter(tmp, p2, "h")
    q = lora.load_adapter(tmp, params)
  for u, v in zip(jax.tree.leaves(q), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(u, v)
  with pytest.raises(ValueError, match="subset_r"):
    lora.LoraConfig(expert_mode="shared", subset_r=2)  # no expert_subset
