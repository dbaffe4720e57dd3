"""Tri-modal digits (8x8 images, espeak-ng speech, text): align text / image / audio towers.

  ds-jax train --config experiments/mm_digits.py --workdir /tmp/mm   # (config.task="multimodal")
  python -m ds_jax.multimodal_train --config experiments/mm_digits.py --workdir /tmp/mm
  ds-jax zero-shot --workdir /tmp/mm --modality audio --data-dir DIR

Args (`:arg`): "" full run; "tiny" 1 epoch of a small set (smoke test); "anchored" image-anchored
pairing (image-text, image-audio only); "softmax" | "sigmoid" plain contrastive losses (sigmoid:
bias initialised at the batch's positive log-odds, `sigmoid_init_bias`); "cmaa" (cross-modal
attention alignment on, ramped in over 20-40% of training; off by default) | "nocmaa".
Several may be joined with commas, e.g. `:sigmoid,nocmaa`. Results and runtime: docs/multimodal.md.
"""

from ds_jax.multimodal_train import default_config


def get_config(arg=None):
  c = default_config()
  for a in filter(None, (arg or "").split(",")):
    if a == "tiny":
      c.epochs = 1
      c.data.train_per_class = 10
      c.data.test_per_class = 4
      c.log_every = 5
    elif a == "anchored":
      c.pairing = "image_anchored"
    elif a in ("softmax", "sigmoid"):
      c.alignment_loss = "contrastive"
      c.contrastive = a
    elif a == "sigmoid_mse":
      c.contrastive = "sigmoid"
    elif a == "nocmaa":
      c.cmaa = False
    elif a == "cmaa":
      c.cmaa = True
    else:
      raise ValueError(f"unknown argument {a!r}")
  return c
