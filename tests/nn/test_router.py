"""Routing regimes, balance losses and the bias update against slow NumPy references."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.nn import router as rt

route = jax.jit(rt.route, static_argnums=(1, 3))
balance_terms = jax.jit(rt.balance_terms, static_argnums=(3, 4, 5))


def _cfg(**kw):
  base = dict(hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=8)
  base.update(kw)
  return ModelConfig(**base)


def ref_route(logits, cfg, bias=None, n_devices=1):
  """Token by token, straight from the formulas of the DeepSeek-V2/V3 and Mixtral references."""
  logits = np.asarray(logits, np.float64)
  t, e = logits.shape
  k = cfg.num_experts_per_tok
  idx = np.zeros((t, k), int)
  w = np.zeros((t, k))
  for n in range(t):
    z = logits[n]
    if cfg.topk_method == "mixtral":
      top = np.argsort(-z)[:k]
      p = np.exp(z[top] - z[top].max())
      idx[n], w[n] = top, p / p.sum()
      continue
    s = 1 / (1 + np.exp(-z)) if cfg.scoring_func == "sigmoid" else np.exp(z) / np.exp(z).sum()
    sel = s + (bias if cfg.topk_method == "noaux_tc" and bias is not None else 0)
    allowed = np.ones(e, bool)
    if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
      size = e // cfg.n_group
      gs = []
      for g in range(cfg.n_group):
        grp = sel[g * size:(g + 1) * size]
        gs.append(grp.max() if cfg.topk_method == "group_limited_greedy"
                  else np.sort(grp)[-2:].sum())
      keep = np.argsort(-np.array(gs))[:cfg.topk_group]
      allowed = np.zeros(e, bool)
      for g in keep:
        allowed[g * size:(g + 1) * size] = True
    if cfg.max_devices_per_token and n_devices > 1:
      size = e // n_devices
      ds = [np.max(np.where(allowed, sel, -np.inf)[v * size:(v + 1) * size])
            for v in range(n_devices)]
      keep = np.argsort(-np.array(ds))[:cfg.max_devices_per_token]
      dev_ok = np.zeros(e, bool)
      for v in keep:
        dev_ok[v * size:(v + 1) * size] = True
      allowed &= dev_ok
    top = sorted(range(e), key=lambda i: -(sel[i] if allowed[i] else -np.inf))[:k]
    ww = s[top]
    if cfg.topk_method == "noaux_tc":
      if cfg.norm_topk_prob:
        ww = ww / ww.sum()
      ww = ww * cfg.routed_scaling_factor
    elif cfg.norm_topk_prob and k > 1:
      ww = ww / ww.sum()
    else:
      ww = ww * cfg.routed_scaling_factor
    idx[n], w[n] = top, ww
  return idx, w


def _canon(idx, w):
  o = np.argsort(idx, axis=-1)
  return np.take_along_axis(idx, o, -1), np.take_along_axis(w, o, -1)


REGIMES = {
    "greedy_v2lite": dict(topk_method="greedy"),
    "greedy_scaled": dict(topk_method="greedy", routed_scaling_factor=16.0),
    "greedy_norm": dict(topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=16.0),
    "group_limited_v2": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             routed_scaling_factor=16.0),
    "noaux_tc_v3": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=4, topk_group=2,
                        norm_topk_prob=True, routed_scaling_factor=2.5),
    "noaux_tc_nonorm": dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=8,
                            topk_group=3, routed_scaling_factor=2.5),
    "mixtral": dict(topk_method="mixtral", num_experts_per_tok=2),
    "device_limited": dict(topk_method="greedy", max_devices_per_token=2),
}


@pytest.mark.parametrize("name", sorted(REGIMES))
def test_route_matches_reference(name):
  cfg = _cfg(**REGIMES[name])
  logits = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32) * 2
  bias = np.random.default_rng(1).normal(size=16).astype(np.float32) * 0.3
  n_dev = 4 if cfg.max_devices_per_token else 1
  idx, w, _ = route(jnp.asarray(logits), cfg, jnp.asarray(bias), n_dev)
  ridx, rw = ref_route(logits, cfg, bias, n_dev)
  gi, gw = _canon(np.asarray(idx), np.asarray(w))
  ri, rw = _canon(ridx, rw)
  np.testing.assert_array_equal(gi, ri)
  np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-6)


def test_noaux_bias_changes_selection_not_weights():
  cfg = _cfg(**REGIMES["noaux_tc_v3"])
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
  bias = jnp.zeros(16).at[3].set(10.0)  # forces expert 3 into every token's top-k
  idx, w, s = route(logits, cfg, bias)
  assert bool(jnp.all(jnp.any(idx == 3, axis=-1)))
  # weights are the unbiased sigmoid scores, renormalised and scaled
  ws = jnp.take_along_axis(s, idx, -1)
  np.testing.assert_allclose(w, 2.5 * ws / ws.sum(-1, keepdims=True), rtol=1e-6)


def test_balance_terms_match_formulas():
  cfg = _cfg(topk_method="greedy", max_devices_per_token=2)
  rng = np.random.default_rng(3)
  b, l, e, k, v = 2, 16, 16, 4, 4
  logits = rng.normal(size=(b * l, e)).astype(np.float32)
  idx, _, scores = route(jnp.asarray(logits), cfg, None, v)
  terms = balance_terms(jnp.asarray(logits), scores, idx, cfg, v, b)
  idx, s = np.asarray(idx), np.asarray(scores, np.float64)
  t = b * l
  cnt = np.zeros(e)
  for row in idx:
    for i in row:
      cnt[i] += 1
  f = e / (k * t) * cnt
  p = s.mean(0)
  np.testing.assert_allclose(terms["expert_balance"], np.sum(f * p), rtol=1e-5)
  grp = [range(j * e // v, (j + 1) * e // v) for j in range(v)]
  fd = np.array([np.mean([f[i] for i in g]) for g in grp])
  pd = np.array([np.sum([p[i] for i in g]) for g in grp])
  np.testing.assert_allclose(terms["device_balance"], np.sum(fd * pd), rtol=1e-5)
  sent = np.array([[any(i in g for i in row) for g in grp] for row in idx], float)
  fc = v / (2 * t) * sent.sum(0)  # M = 2
  np.testing.assert_allclose(terms["comm_balance"], np.sum(fc * pd), rtol=1e-5)
  seq = []
  for bi in range(b):
    rows = idx[bi * l:(bi + 1) * l]
    c = np.array([np.sum(rows == i) for i in range(e)])
    seq.append(np.sum(e / (k * l) * c * s[bi * l:(bi + 1) * l].mean(0)))
  np.testing.assert_allclose(terms["seq_balance"], np.mean(seq), rtol=1e-5)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(terms["z_loss"], np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(terms["load"], cnt / (t * k), rtol=1e-6)
  np.testing.assert_allclose(terms["maxvio"], cnt.max() / cnt.mean() - 1, rtol=1e-5)
  ent = -np.mean(np.sum(s * np.log(s), -1))
  np.testing.assert_allclose(terms["router_entropy"], ent, rtol=1e-5)
  weighted = cfg.replace(aux_loss_alpha=0.1, device_aux_loss_alpha=0.2, comm_aux_loss_alpha=0.3,
                         seq_aux_loss_alpha=0.4, router_z_loss_coef=0.5)
  want = sum(a * float(terms[n]) for a, n in zip(
      (0.1, 0.2, 0.3, 0.4, 0.5),
      ("expert_balance", "device_balance", "comm_balance", "seq_balance", "z_loss")))
  np.testing.assert_allclose(rt.aux_loss(terms, weighted), want, rtol=1e-6)


def test_sigmoid_balance_uses_normalised_affinities():
  cfg = _cfg(**REGIMES["noaux_tc_v3"])
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(8, 16)), jnp.float32)
  idx, _, s = route(logits, cfg, None)
  terms = balance_terms(logits, s, idx, cfg, 4, 1)
  sn = np.asarray(s) / np.asarray(s).sum(-1, keepdims=True)
  cnt = np.bincount(np.asarray(idx).ravel(), minlength=16)
  np.testing.assert_allclose(terms["seq_balance"],
                             np.sum(16 / (4 * 8) * cnt * sn.mean(0)), rtol=1e-5)


def test_balance_gradient_pushes_away_from_overloaded_expert():
  cfg = _cfg(topk_method="greedy")
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(32, 16)), jnp.float32)
  logits = logits.at[:, 0].add(3.0)  # expert 0 overloaded

  def loss(z):
    idx, _, s = rt.route(z, cfg)
    return rt.balance_terms(z, s, idx, cfg, 1, 1)["expert_balance"]
  g = jax.jit(jax.grad(loss))(logits)
  assert float(g[:, 0].mean()) > 0  # descending lowers expert 0's logit


def test_bias_update_balances_skewed_router():
  cfg = _cfg(**REGIMES["noaux_tc_v3"], bias_update_speed=0.01)
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(512, 16)) + np.linspace(-2, 2, 16), jnp.float32)
  bias = jnp.zeros(16)

  @jax.jit
  def step_fn(bias, step):
    idx, _, s = rt.route(logits, cfg, bias)
    load = rt.balance_terms(logits, s, idx, cfg, 4, 1)["load"]
    return rt.update_bias(bias, load, step, cfg), load.max() * 16 - 1
  vio = []
  for step in range(60):
    bias, v = step_fn(bias, step)
    vio.append(float(v))
  assert vio[0] > 1.0
  assert vio[-1] < 0.35 * vio[0], vio


def test_bias_update_stop_step_and_sign():
  cfg = _cfg(bias_update_speed=0.5, bias_update_stop_step=3)
  load = jnp.array([[0.5, 0.25, 0.25, 0.0]])
  b = rt.update_bias(jnp.zeros((1, 4)), load, 2, cfg)
  np.testing.assert_allclose(b, [[-0.5, 0.0, 0.0, 0.5]])
  np.testing.assert_allclose(rt.update_bias(b, load, 3, cfg), b)
