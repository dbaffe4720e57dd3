"""Cosine similarity between the initial embeddings of one training batch, per modality.

  python scripts/mm_init_similarity.py [override ...]
  e.g. python scripts/mm_init_similarity.py model.image.pixel_mean=0.0 model.image.pixel_std=1.0

A tower whose off-diagonal cosines are all ~1 at init gives the contrastive loss almost nothing
to separate (docs/multimodal.md "Round 2"). Uses the data cache in runs/mm_abl2/data_cache.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds_jax import multimodal_train as T  # noqa: E402
from ds_jax.config import load_config  # noqa: E402
from ds_jax.data import multimodal as D  # noqa: E402
from ds_jax.models import multimodal as mm  # noqa: E402


def main(overrides):
  c = load_config("experiments/mm_digits.py:softmax",
                  list(overrides) + ["data.cache_dir=runs/mm_abl2/data_cache"])
  mcfg = T.model_config(c)
  train, _ = T.load_data(c, "runs/mm_abl2")
  batch = next(D.batches(train, c.batch_size, 0, 0, c.text_len, augment=True))
  params = T.init_state(c, mcfg, batch)
  inputs = T.model_inputs(batch, mcfg)
  eye = np.eye(c.batch_size, dtype=bool)
  same = (batch["label"][:, None] == batch["label"][None]) & ~eye
  for m in ("text", "image", "audio"):
    z = np.asarray(mm.encode(mcfg, params, m, inputs[m]))
    s = z @ z.T
    print(f"{m}: off-diagonal cosine mean {s[~eye].mean():.3f} (std {s[~eye].std():.3f}); "
          f"same class {s[same].mean():.3f}, other class {s[~same & ~eye].mean():.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])
