"""Shared test utilities: tiny configs and subprocess runs of the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

from ds_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**model):
  c = base_config()
  c.steps = 8
  c.batch_size = 8
  c.seq_len = 32
  c.log_every = 2
  c.eval_every = 0
  c.eval_steps = 1
  c.peak_flops = 1e11
  c.model.vocab_size = 259
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.model.num_hidden_layers = 2
  c.model.num_attention_heads = 4
  c.model.num_key_value_heads = 2
  for k, v in model.items():
    c.model[k] = v
  return c


def run_cli(args, env=None, timeout=300, **kw):
  e = dict(os.environ)
  e.setdefault("JAX_PLATFORMS", "cpu")
  e.update(env or {})
  return subprocess.run([sys.executable, "-m", "ds_jax", *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout, **kw)
