"""MoE routing: which k experts each token goes to, with what weight, plus balance losses.

Pure array functions over tokens flattened to T = batch * length (letters: T tokens, E routed
experts, K experts per token, G expert groups, V "devices" for the DeepSeek-V2 device losses).

Routing regimes follow the Hugging Face / DeepSeek reference code exactly:
- greedy:               softmax scores, top-k.                                 (DeepSeek-V2-Lite)
- group_limited_greedy: softmax, group score = max score in group, keep topk_group groups.  (V2)
- noaux_tc:             sigmoid, selection on scores + e_score_correction_bias, group score = sum
                        of the group's top-2 biased scores; weights from the unbiased scores.  (V3)
- mixtral:              softmax over the top-k logits.
Weights, as in DeepSeek's own V2 code: greedy / group_limited_greedy normalise when
`norm_topk_prob` (and k > 1) and otherwise multiply by `routed_scaling_factor` (transformers 5.x
ignores `norm_topk_prob` for V2 and always scales; the published V2 configs have it false, so both
agree). noaux_tc normalises if `norm_topk_prob`, then always scales (V3).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig

Array = jax.Array
NEG_INF = -jnp.inf


def _group_mask(sel_TxE: Array, n_groups: int, keep: int, reduce: str) -> Array:
  """Boolean [T, E]: experts whose group is among the `keep` best groups of each token."""
  t, e = sel_TxE.shape
  g_TxGxS = sel_TxE.reshape(t, n_groups, e // n_groups)
  if reduce == "max":
    score_TxG = g_TxGxS.max(-1)
  else:  # "top2": sum of the two best experts of the group (DeepSeek-V3)
    score_TxG = jax.lax.top_k(g_TxGxS, 2)[0].sum(-1)
  _, gidx_TxK = jax.lax.top_k(score_TxG, keep)
  gmask_TxG = jnp.zeros((t, n_groups), bool).at[jnp.arange(t)[:, None], gidx_TxK].set(True)
  return jnp.repeat(gmask_TxG, e // n_groups, axis=1)


def num_balance_devices(cfg: ModelConfig, expert_shards: int) -> int:
  """Devices for device-limited routing and the V2 device / communication losses.

  The expert-axis shards when experts are sharded; otherwise the `n_group` expert groups, which is
  what DeepSeek-V2 uses (8 groups = 8 devices) and keeps the losses defined on one device.
  """
  return expert_shards if expert_shards > 1 else cfg.n_group


def route(logits_TxE: Array, cfg: ModelConfig, bias_E: Optional[Array] = None,
          n_devices: int = 1) -> tuple[Array, Array, Array]:
  """Returns (expert ids [T, K] int32, combine weights [T, K] f32, scores [T, E] f32)."""
  k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
  logits_TxE = logits_TxE.astype(jnp.float32)
  if cfg.topk_method == "mixtral":
    top_TxK, idx_TxK = jax.lax.top_k(logits_TxE, k)
    return idx_TxK, jax.nn.softmax(top_TxK, axis=-1), jax.nn.softmax(logits_TxE, axis=-1)
  if cfg.scoring_func == "sigmoid":
    scores_TxE = jax.nn.sigmoid(logits_TxE)
  else:
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  sel_TxE = scores_TxE
  if cfg.topk_method == "noaux_tc":
    if bias_E is not None:
      sel_TxE = sel_TxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    keep = _group_mask(sel_TxE, cfg.n_group, cfg.topk_group, "top2")
    sel_TxE = jnp.where(keep, sel_TxE, NEG_INF)
  elif cfg.topk_method == "group_limited_greedy":
    keep = _group_mask(sel_TxE, cfg.n_group, cfg.topk_group, "max")
    sel_TxE = jnp.where(keep, sel_TxE, 0.0)  # HF masks with 0.0 (softmax scores are > 0)
  if cfg.max_devices_per_token and n_devices > 1 and cfg.max_devices_per_token < n_devices:
    # DeepSeek-V2 device-limited routing: a device scores by its best expert; keep the best M.
    keep = _group_mask(jnp.where(jnp.isfinite(sel_TxE), sel_TxE, -1e30), n_devices,
                       cfg.max_devices_per_token, "max")
    sel_TxE = jnp.where(keep, sel_TxE, NEG_INF)
  _, idx_TxK = jax.lax.top_k(jax.lax.stop_gradient(sel_TxE), k)
  w_TxK = jnp.take_along_axis(scores_TxE, idx_TxK, axis=-1)
  if cfg.topk_method == "noaux_tc":
    if cfg.norm_topk_prob:
      w_TxK = w_TxK / (w_TxK.sum(-1, keepdims=True) + 1e-20)
    w_TxK = w_TxK * cfg.routed_scaling_factor
  elif k > 1 and cfg.norm_topk_prob:
    w_TxK = w_TxK / (w_TxK.sum(-1, keepdims=True) + 1e-20)
  else:
    w_TxK = w_TxK * cfg.routed_scaling_factor
  return idx_TxK.astype(jnp.int32), w_TxK, scores_TxE


def balance_terms(logits_TxE: Array, scores_TxE: Array, idx_TxK: Array, cfg: ModelConfig,
                  n_devices: int, batch: int) -> dict[str, Array]:
  """Unweighted balance terms and router telemetry (see MoE's docstring for the keys).

  P uses the affinities normalised to sum 1 per token (softmax unchanged; V3's s'), f the top-k
  choices; each term is 1.0 when routing is perfectly uniform.
  """
  t, e = scores_TxE.shape
  k = idx_TxK.shape[-1]
  probs_TxE = scores_TxE / (scores_TxE.sum(-1, keepdims=True) + 1e-20)
  chosen_TxE = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], idx_TxK].add(1.0)
  load_E = chosen_TxE.mean(0) / k  # fraction of token-slots per expert, sums to 1
  f_E = load_E * e  # DeepSeek-V2 f_i = E / (K T) * count_i
  p_E = probs_TxE.mean(0)
  out = {"expert_balance": jnp.sum(f_E * p_E)}
  # Devices: consecutive blocks of E / V experts.
  v = n_devices
  f_dev = f_E.reshape(v, e // v).mean(-1)
  p_dev = p_E.reshape(v, e // v).sum(-1)
  out["device_balance"] = jnp.sum(f_dev * p_dev)
  m = cfg.max_devices_per_token or min(k, v)
  sent_TxV = chosen_TxE.reshape(t, v, e // v).max(-1)  # 1 if the token goes to device v
  f_comm = sent_TxV.mean(0) * v / m
  out["comm_balance"] = jnp.sum(f_comm * p_dev)
  # DeepSeek-V3 sequence-wise: the same product per sequence, averaged over sequences.
  l = t // batch
  f_BxE = chosen_TxE.reshape(batch, l, e).mean(1) * e / k
  p_BxE = probs_TxE.reshape(batch, l, e).mean(1)
  out["seq_balance"] = jnp.mean(jnp.sum(f_BxE * p_BxE, -1))
  out["z_loss"] = jnp.mean(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1) ** 2)
  out["load"] = load_E
  out["maxvio"] = load_E.max() * e - 1.0
  out["router_entropy"] = -jnp.mean(jnp.sum(probs_TxE * jnp.log(probs_TxE + 1e-20), -1))
  return out


def aux_loss(terms: dict[str, Array], cfg: ModelConfig) -> Array:
  """The weighted sum to add to the LM loss."""
  return (cfg.aux_loss_alpha * terms["expert_balance"]
          + cfg.device_aux_loss_alpha * terms["device_balance"]
          + cfg.comm_aux_loss_alpha * terms["comm_balance"]
          + cfg.seq_aux_loss_alpha * terms["seq_balance"]
          + cfg.router_z_loss_coef * terms["z_loss"])


def update_bias(bias_E: Array, load_E: Array, step: Array | int, cfg: ModelConfig) -> Array:
  """DeepSeek-V3 auxiliary-loss-free update b_i += gamma * sign(mean load - load_i).

  `load_E` may carry leading axes (e.g. [layers, E]) matching `bias_E`. gamma is 0 from
  `bias_update_stop_step` on (never, if -1).
  """
  gamma = jnp.float32(cfg.bias_update_speed)
  if cfg.bias_update_stop_step >= 0:
    gamma = jnp.where(jnp.asarray(step) < cfg.bias_update_stop_step, gamma, 0.0)
  load_E = load_E.astype(jnp.float32)
  delta = jnp.sign(load_E.mean(-1, keepdims=True) - load_E)
  return (bias_E + gamma * delta).astype(bias_E.dtype)
