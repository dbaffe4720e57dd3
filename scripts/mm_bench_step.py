"""Init, lower, compile and step time of the tri-modal train step on a fixed random batch.

  python scripts/mm_bench_step.py [ARG]    # ARG: experiments/mm_digits.py argument, e.g. nocmaa
"""

import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ds_jax import multimodal_train as T  # noqa: E402
from ds_jax.config import load_config  # noqa: E402

arg = sys.argv[1] if len(sys.argv) > 1 else ""
c = load_config("experiments/mm_digits.py" + (":" + arg if arg else ""))
mcfg = T.model_config(c)
B = c.batch_size
rng = np.random.default_rng(0)
batch = {"image": rng.random((B, 8, 8, 1), dtype=np.float32),
         "audio": rng.normal(size=(B, 16000)).astype(np.float32) * 0.1,
         "text": rng.integers(1, 100, (B, c.text_len)).astype(np.int32),
         "label": rng.integers(0, 10, B).astype(np.int32)}
t0 = time.time()
params = T.init_state(c, mcfg, batch)
jax.block_until_ready(params)
print("init", round(time.time() - t0, 1), flush=True)
tx = T.make_optimizer(c, 300)
opt = tx.init(params)
step = T.make_train_step(c, mcfg, tx)
t0 = time.time()
lowered = step.lower(params, opt, batch, 1.0)
print("trace/lower", round(time.time() - t0, 1), flush=True)
t0 = time.time()
lowered.compile()
print("compile", round(time.time() - t0, 1), flush=True)
params, opt, m = step(params, opt, batch, 1.0)
jax.block_until_ready(m)
t0 = time.time()
for _ in range(5):
  params, opt, m = step(params, opt, batch, 1.0)
jax.block_until_ready(m)
print("step", round((time.time() - t0) / 5, 3), flush=True)
