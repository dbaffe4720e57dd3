"""TrainState, the pure `train_step` / `eval_step`, sharded initialisation.

`train_step(state, batch) -> (state, metrics)` is a module-level pure function: the task (model +
loss) and the optimizer are bound with `functools.partial` and the result is jitted once with
in/out shardings and buffer donation (`compile_steps`). The run loop lives in `ds_jax.loop`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ds_jax import sharding as shd
from ds_jax.config import ModelConfig
from ds_jax.losses import lm_loss
from ds_jax.models.lm import Transformer
from ds_jax.nn.mtp import mtp_loss
from ds_jax.optim import make_optimizer, schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # trained parameters
  opt_state: Any
  frozen: Any  # parameters that are used but not trained (e.g. a LoRA base); {} if none
  skipped: jax.Array  # number of steps skipped for a non-finite loss or gradient


class LMTask:
  """The language-model objective: cross-entropy (+ z-loss) + MoE balance terms + MTP."""

  def __init__(self, cfg, mc: ModelConfig):
    self.cfg, self.mc = cfg, mc
    self.model = Transformer(mc)
    self.z_loss = float(cfg.optimizer.z_loss)
    # Optional pure transforms of the parameters before each forward (QAT fake-quant, ...):
    # callables (params, step) -> params.
    self.param_transforms: list[Callable[[Any, jax.Array], Any]] = []
    # (trainable, frozen) -> full parameters; identity unless adapters are trained.
    self.combine: Callable[[Any, Any], Any] = lambda trainable, frozen: trainable

  def init(self, rng: jax.Array) -> Any:
    """Boxed (nn.Partitioned) parameters."""
    tokens = jnp.zeros((1, min(self.cfg.seq_len, 8)), jnp.int32)
    return self.model.init(rng, tokens)["params"]

  def full_params(self, params: Any, frozen: Any, step: jax.Array) -> Any:
    full = self.combine(params, frozen)
    for t in self.param_transforms:
      full = t(full, step)
    return full

  def objective(self, params, frozen, batch, rng, step, norm, n_micro):
    """Scalar to differentiate (sum-normalised so micro-batches add up exactly) and metrics."""
    full = self.full_params(params, frozen, step)
    logits, aux = self.model.apply({"params": full}, batch["inputs"], deterministic=False,
                                   rngs={"dropout": rng})
    _, la = lm_loss(logits, batch["targets"], batch["weights"], self.z_loss)
    obj = la["sum"] / norm
    metrics = {"nll_sum": la["nll_sum"], "count": la["count"], "correct": la["correct"]}
    moe = aux.get("moe") or {}
    if aux.get("mtp_moe"):  # MoE blocks of the MTP modules balance like the trunk's
      obj = obj + jnp.sum(aux["mtp_moe"]["aux_loss"]) / n_micro
      metrics["mtp_moe/load"] = aux["mtp_moe"]["load"] / n_micro  # for the V3 bias update
    if moe:
      obj = obj + jnp.sum(moe["aux_loss"]) / n_micro
      metrics.update({f"moe/{k}": v / n_micro for k, v in moe.items()})
    if "mtp_logits" in aux:
      mtp, _ = mtp_loss(aux["mtp_logits"], batch["targets"], batch["weights"], offset=1)
      obj = obj + self.mc.mtp_loss_weight * mtp / n_micro
      metrics["mtp_loss"] = mtp / n_micro
    return obj, metrics

  def eval_metrics(self, params, frozen, batch, step):
    full = self.full_params(params, frozen, step)
    logits, _ = self.model.apply({"params": full}, batch["inputs"], deterministic=True)
    _, la = lm_loss(logits, batch["targets"], batch["weights"])
    return {"nll_sum": la["nll_sum"], "count": la["count"], "correct": la["correct"]}

  def post_update(self, params, metrics, step):
    """Updates outside the optimizer (DeepSeek-V3's aux-loss-free expert bias)."""
    if self.mc.is_moe and self.mc.topk_method == "noaux_tc" and self.mc.bias_update_speed > 0:
      from ds_jax.nn.moe import bias_update
      return bias_update(params, metrics["moe/load"], step, self.mc,
                         mtp_load=metrics.get("mtp_moe/load"))
    return params


def _select(ok, new, old):
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def train_step(state: TrainState, batch: dict, *, task: LMTask, tx: optax.GradientTransformation,
               lr_fn: Callable, accum: int, base_rng: jax.Array, skip_nonfinite: bool = True
               ) -> tuple[TrainState, dict]:
  """One optimizer step over `accum` micro-batches (a scan); exact large-batch gradient."""
  rng = jax.random.fold_in(base_rng, state.step)
  norm = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
  grad_fn = jax.value_and_grad(task.objective, has_aux=True)

  def micro(i, mb):
    (_, m), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i), state.step,
                        norm, accum)
    return g, m

  if accum == 1:
    grads, metrics = micro(0, batch)
  else:
    # Micro-batch a takes rows a, a+accum, ...: every device keeps its own rows.
    mbs = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.tree.map(jnp.zeros_like, state.params)

    def body(carry, xs):
      i, mb = xs
      g, m = micro(i, mb)
      return jax.tree.map(jnp.add, carry, g), m

    grads, ms = jax.lax.scan(body, zeros, (jnp.arange(accum), mbs))
    metrics = jax.tree.map(lambda x: jnp.sum(x, axis=0), ms)
  grad_norm = optax.tree.norm(grads)
  loss = metrics["nll_sum"] / jnp.maximum(metrics["count"], 1.0)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = task.post_update(params, metrics, state.step)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    params = _select(ok, params, state.params)
    opt_state = _select(ok, opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            skipped=state.skipped + (~ok).astype(jnp.int32))
  out = {"loss": loss, "grad_norm": grad_norm, "lr": lr_fn(state.step),
         "accuracy": metrics["correct"] / jnp.maximum(metrics["count"], 1.0),
         "nonfinite": (~ok).astype(jnp.int32), "skipped_total": new_state.skipped}
  out.update({k: v for k, v in metrics.items() if k.startswith("moe/") or k == "mtp_loss"})
  return new_state, out


def eval_step(state: TrainState, batch: dict, *, task: LMTask) -> dict:
  return task.eval_metrics(state.params, state.frozen, batch, state.step)


# ----------------------------------------------------------------------------------------------
# Sharded initialisation and compilation.


def state_shardings(abstract_state: TrainState, param_sh: Any, mesh: Mesh,
                    frozen_sh: Any = None) -> TrainState:
  """Optimizer-state subtrees shaped like the params get the params' shardings; rest replicated."""
  treedef = jax.tree.structure(abstract_state.params)
  rep = NamedSharding(mesh, P())

  def is_params_like(x):
    try:
      return jax.tree.structure(x) == treedef
    except Exception:
      return False

  opt_sh = jax.tree.map(lambda x: param_sh if is_params_like(x) else rep,
                        abstract_state.opt_state, is_leaf=is_params_like)
  if frozen_sh is None:
    frozen_sh = jax.tree.map(lambda _: rep, abstract_state.frozen)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, frozen=frozen_sh, skipped=rep)


class Trainer:
  """Builds the optimizer, sharded state and the jitted steps for one config on one mesh.

  Config sections beyond the LM itself plug in here, not in the step: `config.quant` (enabled:
  QAT fake-quant of weights and activations from `quant.start_step`) adds a parameter transform;
  `config.lora` (enabled: only adapters are trained) splits the parameters into the trained
  adapters and the frozen base.
  """

  def __init__(self, cfg, mc: ModelConfig, mesh: Mesh, task: Optional[LMTask] = None):
    self.cfg, self.mc, self.mesh = cfg, mc, mesh
    self.task = task or LMTask(cfg, mc)
    self.base_rng = jax.random.key(cfg.seed)
    qsec, lsec = cfg.get("quant"), cfg.get("lora")
    self.quant_on = qsec is not None and bool(qsec.get("enabled", False))
    self.lora_on = lsec is not None and bool(lsec.get("enabled", False))
    if self.quant_on:
      from ds_jax import quant
      self.task.param_transforms.append(quant.qat_transform(quant.from_config(qsec)))
    if self.lora_on:
      from ds_jax import lora
      self.task.combine = lora.combine
    with jax.set_mesh(mesh):
      boxed = jax.eval_shape(self.task.init, self.init_rng)
    self.param_sh = shd.param_shardings(boxed, mesh)
    abstract_trainable, _ = jax.eval_shape(self.partition, nn.unbox(boxed))
    self.tx = make_optimizer(cfg.optimizer, cfg.steps, abstract_trainable)
    self.lr_fn = schedule(cfg.optimizer, cfg.steps)
    abstract = jax.eval_shape(self._init_state, self.init_rng)
    rep = NamedSharding(mesh, P())
    if self.lora_on:
      from ds_jax import lora
      t_sh, f_sh = lora.partition_shardings(self.param_sh, abstract.params, abstract.frozen, rep)
    else:
      t_sh, f_sh = self.param_sh, jax.tree.map(lambda _: rep, abstract.frozen)
    self.state_sh = state_shardings(abstract, t_sh, mesh, f_sh)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sh)
    self.batch_sh = shd.batch_sharding(mesh)
    step = functools.partial(train_step, task=self.task, tx=self.tx, lr_fn=self.lr_fn,
                             accum=cfg.optimizer.accumulation_steps,
                             base_rng=jax.random.fold_in(self.base_rng, 1),
                             skip_nonfinite=cfg.optimizer.skip_nonfinite)
    self.train_step = jax.jit(step, in_shardings=(self.state_sh, self.batch_sh),
                              out_shardings=(self.state_sh, None), donate_argnums=(0,))
    self.eval_step = jax.jit(functools.partial(eval_step, task=self.task),
                             in_shardings=(self.state_sh, self.batch_sh))

  @property
  def init_rng(self) -> jax.Array:
    return jax.random.fold_in(self.base_rng, 0)

  def partition(self, params: Any) -> tuple[Any, Any]:
    """(trained, frozen) parameters: everything trained, or only the LoRA adapters."""
    if not self.lora_on:
      return params, {}
    from ds_jax import lora
    return lora.lora_train_partition(params, self.cfg.lora, jax.random.fold_in(self.base_rng, 2))

  def _state_from(self, params: Any) -> TrainState:
    trained, frozen = self.partition(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trained,
                      opt_state=self.tx.init(trained), frozen=frozen,
                      skipped=jnp.zeros((), jnp.int32))

  def _init_state(self, rng) -> TrainState:
    return self._state_from(nn.unbox(self.task.init(rng)))

  def init_state(self, params: Any = None) -> TrainState:
    """A fresh state created already sharded; from `params` (e.g. `--init-from`) if given."""
    with jax.set_mesh(self.mesh):
      if params is None:
        return jax.jit(self._init_state, out_shardings=self.state_sh)(self.init_rng)
      params = jax.device_put(params, self.param_sh)
      return jax.jit(self._state_from, out_shardings=self.state_sh)(params)

  def full_params(self, state: TrainState) -> Any:
    """The model's parameters (adapters combined with their base) of a state."""
    return self.task.combine(state.params, state.frozen)

  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    with jax.set_mesh(self.mesh):
      return self.train_step(state, shd.shard_batch(batch, self.mesh))

  def evaluate(self, state: TrainState, batches) -> dict:
    nll, count, correct = 0.0, 0.0, 0.0
    with jax.set_mesh(self.mesh):
      for b in batches:
        m = jax.device_get(self.eval_step(state, shd.shard_batch(b, self.mesh)))
        nll, count, correct = nll + m["nll_sum"], count + m["count"], correct + m["correct"]
    loss = nll / max(count, 1.0)
    return {"val_loss": float(loss), "val_ppl": float(jnp.exp(loss)),
            "val_accuracy": float(correct / max(count, 1.0))}
