"""Tiny dense Llama-style decoder on the embedded corpus (CPython's pydoc topics, byte tokens).

Command:
  ds-jax train --config experiments/tiny_lm.py --workdir runs/tiny_lm
  ds-jax train --config experiments/tiny_lm.py:smoke --workdir /tmp/smoke   # 20 steps, seconds
Expected: validation loss falls from ~5.6 (uniform over 259 bytes) to below ~2.0 nats/token
in 300 steps. Runtime on 2 CPU cores: see docs/benchmarks.md (a few minutes).
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 4
  c.model.vocab_size = 259
  c.model.hidden_size = 128
  c.model.intermediate_size = 384
  c.model.num_hidden_layers = 4
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 30
  c.checkpoint.every_steps = 100
  if arg == "smoke":
    c.steps = 20
    c.batch_size = 8
    c.seq_len = 64
    c.log_every = 5
    c.eval_every = 10
    c.eval_steps = 2
    c.checkpoint.every_steps = 10
    c.model.num_hidden_layers = 2
    c.model.hidden_size = 64
    c.model.intermediate_size = 128
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'smoke'")
  return c
