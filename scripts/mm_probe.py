"""Short training probes of experiments/mm_digits.py variants: per-pair loss every 10 steps.

  python scripts/mm_probe.py STEPS "ARG|override;override" ...
  e.g. python scripts/mm_probe.py 60 "softmax,nocmaa" "nocmaa" \
         "softmax,nocmaa|model.text.initializer_range=0.1;model.image.initializer_range=0.1;..."

ARG is the experiment argument (`experiments/mm_digits.py:ARG`), the overrides are config
overrides. Uses the data cache in runs/mm/data_cache (generated on first use). Chance for the
softmax pair loss at batch 64 is log 64 = 4.159; the multi-positive optimum is ~2.30.
"""

import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds_jax import multimodal_train as T  # noqa: E402
from ds_jax.config import load_config  # noqa: E402
from ds_jax.data import multimodal as D  # noqa: E402


def main(argv):
  steps = int(argv[0])
  for v in argv[1:]:
    arg, _, ovs = v.partition("|")
    c = load_config("experiments/mm_digits.py" + (":" + arg if arg else ""),
                    [o for o in ovs.split(";") if o] + ["data.cache_dir=runs/mm/data_cache"])
    mcfg = T.model_config(c)
    tr, _ = T.load_data(c, "runs/mm")
    tx, step = T.cached_train_step(c, mcfg, 315)
    ex = next(D.batches(tr, c.batch_size, 0, 0, c.text_len, augment=False))
    p = T.init_state(c, mcfg, ex)
    o = tx.init(p)
    t0 = time.time()
    n, ep = 0, 0
    while n < steps:
      for b in D.batches(tr, c.batch_size, 0, ep, c.text_len):
        p, o, m = step(p, o, b, T.mse_scale(c, n, steps))
        n += 1
        if n == 1:
          jax.block_until_ready(m)
          print(v, "first step", round(time.time() - t0, 1), flush=True)
          t1 = time.time()
        if n % 10 == 0:
          m = jax.device_get(m)
          print(v, n, " ".join(f"{k.split('/')[0]}={float(m[k]):.3f}" for k in m
                               if k.endswith("/loss")), f"gn={float(m['grad_norm']):.2f}",
                flush=True)
        if n >= steps:
          break
      ep += 1
    print(v, "s/step", (time.time() - t1) / (n - 1), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
