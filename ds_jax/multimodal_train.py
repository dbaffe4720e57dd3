"""Tri-modal alignment training loop (config.task == "multimodal").

Self-contained: optax AdamW with warmup-cosine, orbax checkpoints in `<workdir>/checkpoints`
(resumed at the next epoch), `<workdir>/metrics.jsonl`, `<workdir>/config.json`, tqdm progress.
The config uses the seed's names: text_encoder, image_encoder, audio_processor, alignment_loss,
batch_size, epochs (see experiments/mm_digits.py).
"""

from __future__ import annotations

import functools
import math
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
  c.audio_processor = "log_mel"  # | "waveform" (with audio_encoder="wav2vec2")
  # Tower kinds beyond the seed's: text_encoder "lm" (a ds_jax LM, ds_jax.models.lm_tower),
  # audio_encoder "wav2vec2" (ds_jax.models.hf_wav2vec2, raw waveforms). `pretrained.<m>`: a
  # local directory whose weights initialise tower m (image: HF CLIP / CLIP-vision; audio: HF
  # wav2vec2; text with "lm": a ds_jax LM workdir or HF directory); its config then replaces
  # model.<m>. `freeze`: comma-separated towers kept fixed (LiT), e.g. "image" or "image,audio".
  c.audio_encoder = "patch_transformer"
  c.pretrained = ml_collections.ConfigDict(dict(text="", image="", audio=""))
  c.freeze = ""
  c.alignment_loss = "contrastive_mse"
  c.contrastive = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  c.mse_weight = 0.5
  # The MSE term alone is minimised by collapse (every z equal); switched on from the start it
  # wins over the contrastive term and training stalls at chance (measured: docs/multimodal.md).
  # Its weight therefore ramps linearly from 0 at mse_ramp[0] to mse_weight at mse_ramp[1]
  # (fractions of the total steps), after the contrastive loss has left chance (docs/multimodal.md
  # "Results": with (0.4, 0.8) and no CMAA, contrastive_mse ~ softmax).
  c.mse_ramp = (0.4, 0.8)
  # CMAA off by default (`experiments/mm_digits.py:cmaa` turns it on). With weight 0.5 from step 0
  # its gradient (norm ~4.5 vs ~0.6 for the contrastive losses, clipped together to 1) swamped the
  # contrastive one while the embeddings were still at chance, and every 8-epoch run stayed near
  # chance. Its weight now ramps like the MSE's (fractions of the total steps): 0 before
  # cmaa_ramp[0], cmaa_weight from cmaa_ramp[1] on ((0, 0) = on from step 0); chosen on the
  # validation split (docs/multimodal.md "Results").
  c.cmaa = False
  c.cmaa_weight = 0.1
  c.cmaa_ramp = (0.2, 0.4)
  # SigLIP init. None = the log-odds of a positive in a batch, log(p / (1 - p)) with p = 1/10
  # (multi-positive, ten classes) or 1/batch_size (sigmoid_prior_bias). SigLIP's published b = -10
  # is that prior for its ~22k-32k batch; at batch 64 with ~10% positives it predicts every pair
  # negative, only positives get gradient and all arms stayed at chance (docs/multimodal.md).
  c.sigmoid_init_bias = None
  c.sigmoid_init_t = 10.0
  c.pairing = "all"  # all | image_anchored
  c.multi_positive = True
  c.learning_rate = 2e-3
  c.warmup_steps = 50
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.log_every = 20
  c.eval_every_epochs = 5
  c.text_len = 32
  # data.seed fixes the generated speech (the model / batch-order seed is c.seed); cache_dir ""
  # = <workdir>/data_cache; eval_split "test" (held-out voices) or "val" (training voices, for
  # tuning without looking at the test voices).
  # speed_perturb: clips play at a random speed in [1 - s, 1 + s] (0 = off); spec_augment:
  # mel-axis warp + one frequency and two time masks on the training log-mels (data/audio.py).
  # eval_split "voices": validation clips by voices held out of training (data.multimodal
  # VAL_ACCENTS); choose recipes on it. extra_accents: comma-separated espeak voices added to the
  # training accents (e.g. "pt,sv"; "" = none).
  c.data = ml_collections.ConfigDict(dict(train_per_class=200, test_per_class=50, seed=0,
                                          cache_dir="", eval_split="test", speed_perturb=0.1,
                                          spec_augment=False, extra_accents=""))
  # initializer_range 0.1 (not CLIP's 0.02, tuned for width 768): with 0.02 the contrastive
  # loss sat at chance (log 64) for ~30 steps and the gradient norm spiked to 100 on escape; with
  # 0.1 it fell earlier and stayed stable (60-step probe, docs/multimodal.md "Results").
  # pixel_mean / pixel_std: the training digits' mean and std (0.305, 0.376 over all pixels),
  # standardised inside the ViT. Raw [0, 1] digits share a large mean component: at init every
  # image embedding had cosine 0.986 to every other (0.83 standardised; measured on one batch),
  # and image pairs sat at chance for the first ~40 steps (docs/multimodal.md).
  # mel_norm "utt": each clip's log-mel is standardised by its own mean / std inside the audio
  # tower (removes gain and dynamic range); chosen on the held-out validation voices, round 3:
  # selection score 88.3 vs 81.0 without, per-channel "cmvn" 80.7 (docs/multimodal.md).
  # Audio tower 4 layers x 256-wide MLP (text / image stay 2 x 128) and 30 epochs: round 4 on the
  # validation voices, score 91.7 vs 88.3 for the round-3 2-layer / 20-epoch recipe
  # (docs/multimodal.md "Round 4"). Workdirs keep their own config.json, so older runs still load.
  enc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             initializer_range=0.1)
  c.model = ml_collections.ConfigDict(dict(
      text=dict(enc, max_position_embeddings=32), image=dict(enc, patch_size=2, image_size=8, pixel_mean=0.305, pixel_std=0.376),
      audio=dict(enc, patch_frames=4, max_frames=100, audio_stem="patch", mel_norm="utt",
                 num_hidden_layers=4, intermediate_size=256),
      shared_width=64, embed_dim=64,
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
  for field, allowed in (("text_encoder", ("byte_transformer", "lm")), ("image_encoder", ("vit",)),
                         ("audio_processor", ("log_mel", "waveform")),
                         ("audio_encoder", ("patch_transformer", "wav2vec2"))):
    if c.get(field, allowed[0]) not in allowed:
      raise ConfigError(field, f"must be one of {', '.join(allowed)}; got {c[field]!r}")
  wav2vec2 = c.get("audio_encoder", "") == "wav2vec2"
  if wav2vec2 != (c.audio_processor == "waveform"):
    raise ConfigError("audio_processor", "wav2vec2 takes raw waveforms: use audio_encoder="
                      "wav2vec2 with audio_processor=waveform (and log_mel otherwise)")
  frozen = tuple(filter(None, c.get("freeze", "").split(",")))
  if set(frozen) - set(mm.MODALITIES):
    raise ConfigError("freeze", f"must name towers among {', '.join(mm.MODALITIES)}; "
                      f"got {c.freeze!r}")
  m = c.model
  pre = c.get("pretrained", {})
  if pre.get("text") and c.text_encoder != "lm":
    raise ConfigError("pretrained.text", "needs text_encoder=lm (a ds_jax LM workdir / HF dir)")
  if pre.get("audio") and not wav2vec2:
    raise ConfigError("pretrained.audio", "needs audio_encoder=wav2vec2 (a HF wav2vec2 dir)")
  if c.text_encoder == "lm":
    from ds_jax.models import lm_tower
    text = lm_tower.lm_tower_config(m.text.to_dict(), pre.get("text", ""))
  else:
    text = EncoderConfig(**m.text.to_dict())
  if pre.get("image"):
    from ds_jax.models import hf_encoders
    image = hf_encoders.clip_vision_config(pre["image"])
  else:
    image = EncoderConfig(**m.image.to_dict())
  if wav2vec2:
    from ds_jax.models import hf_wav2vec2
    audio = hf_wav2vec2.tower_config(m.audio.to_dict(), pre.get("audio", ""))
  else:
    audio = EncoderConfig(**m.audio.to_dict())
  return mm.MultimodalConfig(
      text=text, image=image, audio=audio, shared_width=m.shared_width,
      embed_dim=m.embed_dim, pool_heads=m.pool_heads, cmaa=c.cmaa,
      pairs=PAIRINGS[c.pairing], contrastive=c.contrastive, frozen=frozen,
      **(dict(init_log_t=math.log(c.get("sigmoid_init_t", 10.0)),
              init_bias=sigmoid_prior_bias(c)) if c.contrastive == "sigmoid" else {}))


NUM_CLASSES = 10  # the digits set


def sigmoid_prior_bias(c: ml_collections.ConfigDict) -> float:
  """The SigLIP bias init: c.sigmoid_init_bias, or the log-odds of a positive pair in a batch."""
  if c.get("sigmoid_init_bias") is not None:
    return float(c.sigmoid_init_bias)
  p = 1.0 / NUM_CLASSES if c.multi_positive else 1.0 / c.batch_size
  return math.log(p / (1.0 - p))


def audio_features(wave_BxS: jax.Array) -> jax.Array:
  """The `audio_processor`: Whisper log-mel, computed inside the jitted step."""
  return A.log_mel(wave_BxS)


def model_inputs(batch: dict, mcfg: Optional[mm.MultimodalConfig] = None) -> dict:
  audio = (audio_features(batch["audio"]) if mcfg is None
           else mm.audio_features(mcfg, batch["audio"]))
  if "mel_aug" in batch and (mcfg is None or getattr(mcfg.audio, "features", None) is None):
    audio = A.spec_augment(audio, batch["mel_aug"])  # training batches only (log-mel towers)
  return {"text": batch["text"], "image": batch["image"], "audio": audio}


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                             max(total_steps, c.warmup_steps + 1),
                                             c.learning_rate * 0.05)
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  tx = optax.chain(optax.clip_by_global_norm(c.grad_clip),
                   optax.adamw(sched, weight_decay=c.weight_decay, mask=decay_mask))
  frozen = [f"{m}_tower" for m in filter(None, c.get("freeze", "").split(","))]
  if not frozen:
    return tx
  # LiT: frozen towers get no update and no optimizer state (their gradient is also stopped)
  labels = lambda p: {k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v)
                      for k, v in p.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


_STEP_CACHE: dict = {}


def _step_key(c: ml_collections.ConfigDict, total_steps: int) -> str:
  """Everything the compiled step depends on: the config without seeds, data and logging."""
  d = c.to_dict()
  for k in ("seed", "data", "log_every", "eval_every_epochs", "epochs"):
    d.pop(k, None)
  return json.dumps(d, sort_keys=True, default=str) + f"/{total_steps}"


def cached_train_step(c: ml_collections.ConfigDict, mcfg: mm.MultimodalConfig, total_steps: int):
  """(tx, train_step), reused across runs in one process that differ only in seed / data: the
  seeds of an ablation arm then share one compile."""
  key = _step_key(c, total_steps)
  if key not in _STEP_CACHE:
    tx = make_optimizer(c, total_steps)
    _STEP_CACHE[key] = (tx, make_train_step(c, mcfg, tx))
  return _STEP_CACHE[key]


def make_train_step(c: ml_collections.ConfigDict, mcfg: mm.MultimodalConfig,
                    tx: optax.GradientTransformation):
  model = mm.TriModal(mcfg)
  mse_weight = 0.0 if c.alignment_loss == "contrastive" else c.mse_weight
  only_mse = c.alignment_loss == "mse"

  def loss_fn(params, batch, mse_scale, cmaa_scale):
    loss, aux = mm.tri_modal_loss(
        model, params, model_inputs(batch, mcfg), batch["label"], pairs=mcfg.pairs,
        kind=mcfg.contrastive, mse_weight=mse_weight * mse_scale,
        cmaa_weight=c.cmaa_weight * cmaa_scale,
        multi_positive=c.multi_positive, contrastive_weight=0.0 if only_mse else 1.0)
    return loss, aux

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, mse_scale=1.0, cmaa_scale=1.0):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch, jnp.float32(mse_scale), jnp.float32(cmaa_scale))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(aux, loss=loss, grad_norm=optax.global_norm(grads))

  return train_step


def init_state(c: ml_collections.ConfigDict, mcfg: mm.MultimodalConfig, example: dict):
  params = mm.init_params(mcfg, jax.random.key(c.seed), model_inputs(example, mcfg))
  return load_pretrained_towers(c, params)


def load_pretrained_towers(c: ml_collections.ConfigDict, params: dict) -> dict:
  """Replace the towers named in `c.pretrained` by their loaded weights (shapes must match)."""
  pre = c.get("pretrained", {})
  loaded = {}
  if pre.get("text"):
    from ds_jax.models import lm_tower
    loaded["text"] = {"lm": lm_tower.load_lm_tower(pre["text"])[1]}
  if pre.get("image"):
    from ds_jax.models import hf_encoders
    loaded["image"] = hf_encoders.load_clip_vision(pre["image"])[1]
  if pre.get("audio"):
    from ds_jax.models import hf_wav2vec2
    loaded["audio"] = hf_wav2vec2.load_wav2vec2(pre["audio"])[1]
  params = dict(params)
  for m, tree in loaded.items():
    want = params[f"{m}_tower"]
    if jax.tree.structure(want) != jax.tree.structure(tree) or jax.tree.map(
        np.shape, want) != jax.tree.map(np.shape, tree):
      raise ValueError(f"pretrained.{m}: weights do not match the {m} tower's parameters")
    params[f"{m}_tower"] = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), want, tree)
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


def ramp(fractions, step: int, total_steps: int) -> float:
  """0 before fractions[0] * total_steps, linear to 1 at fractions[1] * total_steps."""
  lo, hi = (float(x) * total_steps for x in fractions)
  if step >= hi:
    return 1.0
  return max(0.0, (step - lo) / max(hi - lo, 1.0))


def mse_scale(c: ml_collections.ConfigDict, step: int, total_steps: int) -> float:
  """Factor on mse_weight at `step`: 0 before mse_ramp[0], linear to 1 at mse_ramp[1]."""
  if c.alignment_loss == "mse":  # nothing to protect against: MSE is the only term
    return 1.0
  return ramp(c.get("mse_ramp", (0.0, 0.0)), step, total_steps)


def cmaa_scale(c: ml_collections.ConfigDict, step: int, total_steps: int) -> float:
  """Factor on cmaa_weight at `step` (cmaa_ramp)."""
  return ramp(c.get("cmaa_ramp", (0.0, 0.0)), step, total_steps)


def load_data(c: ml_collections.ConfigDict, workdir: str):
  """(train, eval) DigitTri sets of a config (speech generated once, then cached)."""
  return D.load_digit_tri(workdir, c.data.get("seed", 0), c.data.train_per_class,
                          c.data.test_per_class, c.data.get("eval_split", "test"),
                          c.data.get("cache_dir", "") or None,
                          tuple(filter(None, c.data.get("extra_accents", "").split(","))))


def train(c: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Train (resuming from `workdir` if it holds a checkpoint); returns the final eval metrics."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm
  from ds_jax import multimodal_eval as E
  mcfg = model_config(c)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(c.to_dict(), f, indent=1, default=str)
  train_set, test_set = load_data(c, workdir)
  steps_per_epoch = len(train_set.images) // c.batch_size
  tx, train_step = cached_train_step(c, mcfg, steps_per_epoch * c.epochs)
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
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  result: dict = {}
  first = True
  for epoch in range(start_epoch, c.epochs):
    t0 = time.time()
    it = D.batches(train_set, c.batch_size, c.seed, epoch, c.text_len,
                   speed=c.data.get("speed_perturb", 0.0),
                   spec_augment=c.data.get("spec_augment", False))
    bar = tqdm(it, total=steps_per_epoch, desc=f"epoch {epoch}", disable=not progress,
               leave=False)
    for batch in bar:
      total = steps_per_epoch * c.epochs
      params, opt_state, m = train_step(params, opt_state, batch, mse_scale(c, step, total),
                                        cmaa_scale(c, step, total))
      step += 1
      if epoch == start_epoch and first:  # includes the compile unless the step was cached
        first = False
        jax.block_until_ready(m)
        _log(metrics_path, {"first_step_seconds": time.time() - t0, "step": step})
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


def enable_compile_cache(path: str = "") -> str:
  """Persistent XLA cache (default ~/.cache/ds_jax/xla): a later process with the same train
  step (another seed, a resumed run, the final evaluation) loads it instead of recompiling."""
  path = path or os.environ.get("DS_JAX_XLA_CACHE") or os.path.expanduser("~/.cache/ds_jax/xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


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
  enable_compile_cache()
  res = train(c, a.workdir, progress=not a.no_progress)
  from ds_jax import multimodal_eval as E
  _, test_set = load_data(c, a.workdir)
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
