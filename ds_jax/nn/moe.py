"""DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts (also Mixtral).

Parameters use the Hugging Face DeepSeek names so checkpoint conversion is mechanical:
  gate/kernel                   [D, E]     ("embed", None)   router, replicated over experts
  gate/e_score_correction_bias  [E] f32    (None,)           noaux_tc only; NOT trained by the
                                                             optimizer: see `bias_update`
  experts/gate_proj, up_proj    [E, D, F]  ("expert", "embed", "mlp")
  experts/down_proj             [E, F, D]  ("expert", "mlp", "embed")
  shared_experts/{gate,up,down}_proj       ds_jax.nn.mlp.MLP(n_shared_experts * F)

`MoE(cfg)(x_BxLxD, deterministic) -> (y_BxLxD, aux)`; aux has the fixed keys `AUX_KEYS`:
  aux_loss        weighted sum to add to the LM loss: aux_loss_alpha * expert_balance +
                  device_aux_loss_alpha * device_balance + comm_aux_loss_alpha * comm_balance +
                  seq_aux_loss_alpha * seq_balance + router_z_loss_coef * z_loss
  expert_balance, device_balance, comm_balance, seq_balance, z_loss
                  the unweighted terms (DeepSeek-V2 α1/α2/α3, V3 sequence-wise, router z-loss);
                  balance terms are 1.0 at perfectly uniform routing
  load [E]        fraction of routed token-slots per expert (sums to 1, before capacity drops)
  maxvio          max load / mean load - 1
  drop_frac       fraction of token-slots dropped by the capacity limit (0 when dropless)
  router_entropy  mean entropy of the per-token expert distribution (nats)
`deterministic=True` is evaluation: the capacity limit uses `eval_capacity_factor`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ds_jax.config import ModelConfig
from ds_jax.nn import router as rt
from ds_jax.nn.linear import einsum, normal_init
from ds_jax.nn.mlp import MLP
from ds_jax.nn.moe_dispatch import ExpertKernels
from ds_jax.nn.moe_parallel import expert_shards, routed_ffn

Array = jax.Array
AUX_KEYS = ("aux_loss", "expert_balance", "device_balance", "comm_balance", "seq_balance",
            "z_loss", "load", "maxvio", "drop_frac", "router_entropy")


class Gate(nn.Module):
  """Router: logits [T, E] in float32, and the noaux_tc selection bias (or None)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_TxD: Array) -> tuple[Array, Any]:
    c = self.cfg
    kernel = self.param("kernel", nn.with_logical_partitioning(
        normal_init(c.initializer_range), ("embed", None)), (x_TxD.shape[-1], c.n_routed_experts),
        jnp.float32)
    logits_TxE = einsum("td,de->te", x_TxD, kernel, dtype=jnp.float32)
    bias_E = None
    if c.topk_method == "noaux_tc":
      bias_E = self.param("e_score_correction_bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (None,)), (c.n_routed_experts,), jnp.float32)
    return logits_TxE, bias_E


class Experts(nn.Module):
  """The stacked routed-expert weights; returns them (the dispatch code does the matmuls)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, d: int) -> ExpertKernels:
    c = self.cfg
    e, f = c.n_routed_experts, c.moe_intermediate_size
    init = nn.with_logical_partitioning
    std = normal_init(c.initializer_range)
    return ExpertKernels(
        self.param("gate_proj", init(std, ("expert", "embed", "mlp")), (e, d, f), jnp.float32),
        self.param("up_proj", init(std, ("expert", "embed", "mlp")), (e, d, f), jnp.float32),
        self.param("down_proj", init(std, ("expert", "mlp", "embed")), (e, f, d), jnp.float32))


class MoE(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, deterministic: bool = True) -> tuple[Array, dict]:
    c = self.cfg
    b, l, d = x_BxLxD.shape
    dtype = jnp.dtype(c.dtype)
    x_TxD = x_BxLxD.reshape(b * l, d)
    logits_TxE, bias_E = Gate(c, name="gate")(x_TxD)
    n_dev = rt.num_balance_devices(c, expert_shards())
    idx_TxK, w_TxK, scores_TxE = rt.route(logits_TxE, c, bias_E, n_dev)
    kernels = Experts(c, name="experts")(d)
    cap = None
    if c.moe_dispatch == "capacity":
      cap = c.eval_capacity_factor if deterministic else c.capacity_factor
    y_TxD, drop = routed_ffn(x_TxD.astype(dtype), idx_TxK, w_TxK.astype(dtype), kernels,
                             strategy=c.moe_matmul, block=c.moe_block_size, dtype=dtype,
                             cap_factor=cap)
    y_BxLxD = y_TxD.reshape(b, l, d)
    if c.n_shared_experts:
      y_BxLxD = y_BxLxD + MLP(c.n_shared_experts * c.moe_intermediate_size, dtype,
                              c.initializer_range, name="shared_experts")(x_BxLxD, deterministic)
    aux = rt.balance_terms(logits_TxE, scores_TxE, idx_TxK, c, n_dev, b)
    aux["drop_frac"] = jnp.asarray(drop, jnp.float32)
    aux["aux_loss"] = rt.aux_loss(aux, c)
    return y_BxLxD.astype(dtype), {key: aux[key] for key in AUX_KEYS}


def bias_update(params: Any, load_by_layer: Array, step: Array | int, cfg: ModelConfig,
                mtp_load: Optional[Array] = None) -> Any:
  """DeepSeek-V3 aux-loss-free balancing, applied to a model's params outside the optimizer.

  `load_by_layer` is [num MoE layers, E] in layer order (the model's stacked `aux["moe"]["load"]`,
  averaged over micro-batches if any); every `gate/e_score_correction_bias` moves by
  gamma * sign(mean load - load_i). `mtp_load` ([MTP depths, E], `aux["mtp_moe"]["load"]`)
  updates the MoE blocks of the multi-token-prediction modules (`mtp_<j>`) the same way.
  Returns a new params tree (the input is not modified).
  """
  if cfg.topk_method != "noaux_tc" or not cfg.is_moe:
    return params
  from ds_jax.models.lm import layer_location  # lazy: lm imports this module
  moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
  params = flax.core.unfreeze(params)  # a copy with fresh dicts down to the leaves
  for j, i in enumerate(moe_layers):
    name, pos = layer_location(cfg, i)
    gate = params[name]["block"]["mlp"]["gate"]
    bias = gate["e_score_correction_bias"]
    if pos is None:
      gate["e_score_correction_bias"] = rt.update_bias(bias, load_by_layer[j], step, cfg)
    else:
      gate["e_score_correction_bias"] = bias.at[pos].set(
          rt.update_bias(bias[pos], load_by_layer[j], step, cfg))
  if mtp_load is not None:
    for j in range(mtp_load.shape[0]):
      gate = params[f"mtp_{j}"]["block"]["mlp"]["gate"]
      gate["e_score_correction_bias"] = rt.update_bias(gate["e_score_correction_bias"],
                                                       mtp_load[j], step, cfg)
  return params
