"""Tri-modal alignment training loop (config.task == "multimodal").

Self-contained: optax AdamW with warmup-cosine, orbax checkpoints in `<workdir>/checkpoints`
(resumed at the next epoch), `<workdir>/metrics.jsonl`, `<workdir>/config.json`, tqdm progress.
The config uses the seed's names: text_encoder, image_encoder, audio_processor, alignment_loss,
batch_size, epochs (see experiments/mm_digits.py).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ds_jax.data import audio as A
from ds_jax.data import multimodal as D
from ds_jax.models import multimodal as mm
from ds_jax.models.encoders import EncoderConfig

ALIGNMENT_LOSSES = ("contrastive_mse", "contrastive", "mse")
PAIRINGS = {"all": mm.ALL_PAIRS, "image_anchored": mm.IMAGE_ANCHORED}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "multimodal"
  c.seed = 0
  c.batch_size = 64
  c.epochs = 30
  c.text_encoder = "byte_transformer"
  c.image_encoder = "vit"
  c.audio_processor = "log_mel"
  c.alignment_loss = "contrastive_mse"
  c.contrastive = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  c.mse_weight = 0.5
  c.cmaa = True
  c.cmaa_weight = 0.5
  c.pairing = "all"  # all | image_anchored
  c.multi_positive = True
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.log_every = 20
  c.eval_every_epochs = 5
  c.text_len = 32
  c.data = ml_collections.ConfigDict(dict(train_per_class=200, test_per_class=50))
  enc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
  c.model = ml_collections.ConfigDict(dict(
      text=dict(enc, max_position_embeddings=32), image=dict(enc, patch_size=2, image_size=8),
      audio=dict(enc, patch_frames=4, max_frames=100), shared_width=64, embed_dim=64,
      pool_heads=4))
  return c


def model_config(c: ml_collections.ConfigDict) -> mm.MultimodalConfig:
  """Validate the seed-named fields and freeze the model config."""
  from ds_jax.config import ConfigError
  if c.alignment_loss not in ALIGNMENT_LOSSES:
    raise ConfigError("alignment_loss", f"must be one of {', '.join(ALIGNMENT_LOSSES)}; "
                      f"got {c.alignment_loss!r}")
  if c.pairing not in PAIRINGS:
    raise ConfigError("pairing", f"must be one of {', '.join(PAIRINGS)}; got {c.pairing!r}")
  if c.contrastive not in ("softmax", "sigmoid"):
    raise ConfigError("contrastive", f"must be softmax or sigmoid; got {c.contrastive!r}")
  for field, allowed in (("text_encoder", ("byte_transformer",)), ("image_encoder", ("vit",)),
                         ("audio_processor", ("log_mel",))):
    if c[field] not in allowed:
      raise ConfigError(field, f"must be one of {', '.join(allowed)}; got {c[field]!r}")
  m = c.model
  return mm.MultimodalConfig(
      text=EncoderConfig(**m.text.to_dict()), image=EncoderConfig(**m.image.to_dict()),
      audio=EncoderConfig(**m.audio.to_dict()), shared_width=m.shared_width,
      embed_dim=m.embed_dim, pool_heads=m.pool_heads, cmaa=c.cmaa,
      pairs=PAIRINGS[c.pairing], contrastive=c.contrastive)


def audio_features(wave_BxS: jax.Array) -> jax.Array:
  """The `audio_processor`: Whisper log-mel, computed inside the jitted step."""
  return A.log_mel(wave_BxS)


def model_inputs(batch: dict) -> dict:
  return {"text": batch["text"], "image": batch["image"], "audio": audio_features(batch["audio"])}


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                             max(total_steps, c.warmup_steps + 1),
                                             c.learning_rate * 0.05)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                     optax.adamw(sched, weight_decay=c.weight_decay, mask=decay_mask))


def make_train_step(c: ml_collections.ConfigDict, mcfg: mm.MultimodalConfig,
                    tx: optax.GradientTransformation):
  model = mm.TriModal(mcfg)
  mse_weight = 0.0 if c.alignment_loss == "contrastive" else c.mse_weight
  only_mse = c.alignment_loss == "mse"

  def loss_fn(params, batch):
    loss, aux = mm.tri_modal_loss(
        model, params, model_inputs(batch), batch["label"], pairs=mcfg.pairs,
        kind=mcfg.contrastive, mse_weight=mse_weight, cmaa_weight=c.cmaa_weight,
        multi_positive=c.multi_positive, contrastive_weight=0.0 if only_mse else 1.0)
    return loss, aux

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(aux, loss=loss, grad_norm=optax.global_norm(grads))

  return train_step


def init_state(c: ml_collections.ConfigDict, mcfg: mm.MultimodalConfig, example: dict):
  params = mm.init_params(mcfg, jax.random.key(c.seed), model_inputs(example))
  return params


def _manager(workdir: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


def restore_params(workdir: str) -> tuple[ml_collections.ConfigDict, mm.MultimodalConfig, Any]:
  """(config, model config, params) of a workdir's latest checkpoint."""
  with open(os.path.join(workdir, "config.json")) as f:
    c = ml_collections.ConfigDict(json.load(f))
  mngr = _manager(workdir)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  import orbax.checkpoint as ocp
  state = mngr.restore(step, args=ocp.args.StandardRestore())
  return c, model_config(c), jax.tree.map(jnp.asarray, state["params"])


def _log(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps({k: (float(v) if hasattr(v, "__float__") else v)
                        for k, v in record.items()}) + "\n")


def train(c: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Train (resuming from `workdir` if it holds a checkpoint); returns the final eval metrics."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm
  from ds_jax import multimodal_eval as E
  mcfg = model_config(c)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=1, default=str)
  train_set, test_set = D.load_digit_tri(workdir, c.seed, c.data.train_per_class,
                                         c.data.test_per_class)
  steps_per_epoch = len(train_set.images) // c.batch_size
  tx = make_optimizer(c, steps_per_epoch * c.epochs)
  example = next(D.batches(train_set, c.batch_size, c.seed, 0, c.text_len, augment=False))
  params = init_state(c, mcfg, example)
  opt_state = tx.init(params)
  mngr = _manager(workdir)
  start_epoch, step = 0, 0
  if mngr.latest_step() is not None:
    target = {"params": params, "opt_state": opt_state, "epoch": 0, "step": 0}
    state = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
    params, opt_state = state["params"], state["opt_state"]
    start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
  train_step = make_train_step(c, mcfg, tx)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  result: dict = {}
  for epoch in range(start_epoch, c.epochs):
    t0 = time.time()
    it = D.batches(train_set, c.batch_size, c.seed, epoch, c.text_len)
    bar = tqdm(it, total=steps_per_epoch, desc=f"epoch {epoch}", disable=not progress,
               leave=False)
    for batch in bar:
      params, opt_state, m = train_step(params, opt_state, batch)
      step += 1
      if step % c.log_every == 0:
        m = jax.device_get(m)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}")
        _log(metrics_path, dict(m, step=step, epoch=epoch))
    train_seconds = time.time() - t0
    if (epoch + 1) % c.eval_every_epochs and epoch + 1 != c.epochs:
      _log(metrics_path, {"epoch": epoch, "step": step, "epoch_seconds": train_seconds})
    else:
      result = E.evaluate(mcfg, params, test_set, c.text_len)
      result.update(step=step, epoch=epoch, epoch_seconds=train_seconds)
      _log(metrics_path, {f"eval/{k}": v for k, v in result.items()})
    if progress and result.get("epoch") == epoch:
      print(f"epoch {epoch}: " + " ".join(f"{k}={v:.3f}" for k, v in result.items()
                                          if isinstance(v, float)), flush=True)
    mngr.save(step, args=ocp.args.StandardSave(
        {"params": params, "opt_state": opt_state, "epoch": epoch, "step": step}))
  mngr.wait_until_finished()
  return result


def main(argv=None) -> int:
  """`python -m ds_jax.multimodal_train --config experiments/mm_digits.py[:arg] --workdir W`."""
  import argparse
  from ds_jax.config import load_config
  p = argparse.ArgumentParser(prog="ds_jax.multimodal_train")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--no-progress", action="store_true")
  a, rest = p.parse_known_args(argv)
  c = load_config(a.config, [r.lstrip("-") for r in rest])
  res = train(c, a.workdir, progress=not a.no_progress)
  from ds_jax import multimodal_eval as E
  _, test_set = D.load_digit_tri(a.workdir, c.seed, c.data.train_per_class, c.data.test_per_class)
  _, mcfg, params = restore_params(a.workdir)
  out, e, raw = E.evaluate(mcfg, params, test_set, c.text_len, return_raw=True)
  E.plot(e, raw, a.workdir)
  with open(os.path.join(a.workdir, "eval.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main())
