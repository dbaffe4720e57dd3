"""Llama-3-70B: 70.6B parameters, dense, GQA (64 heads, 8 KV heads).

Published shape (Llama 3 paper, Table 3; HF `meta-llama/Meta-Llama-3-70B` config.json): 80 layers,
hidden 8192, SwiGLU width 28672, 64 heads / 8 KV heads, vocab 128256, rope_theta 500000, context
8192, RMSNorm eps 1e-5, untied head. Pre-training: 15T tokens, sequence 8192, peak LR 1.5e-4.

Commands:
  ds-jax analyze --config experiments/llama3_70b.py   # 70.55B
  ds-jax train --config experiments/llama3_70b.py:tiny --workdir runs/llama3_tiny
Expected (`:tiny`, 300 steps of 8 x 128 byte tokens): not measured for this file; the
similar-sized deepseek_v2:tiny reaches validation loss 2.16 (uniform: 5.6) in ~2 min of CPU time.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "llama"
  m.vocab_size = 128256
  m.hidden_size = 8192
  m.intermediate_size = 28672
  m.num_hidden_layers = 80
  m.num_attention_heads = 64
  m.num_key_value_heads = 8
  m.max_position_embeddings = 8192
  m.rope_theta = 500000.0
  m.rms_norm_eps = 1e-5
  m.dtype = "bfloat16"
  m.remat = "full"
  c.seq_len = 8192
  c.batch_size = 2048
  c.steps = 15_000_000_000_000 // (2048 * 8192)  # 15T tokens
  c.optimizer.learning_rate = 1.5e-4
  c.optimizer.warmup_steps = 8000
  c.mesh.update(dict(data=-1, fsdp=8))
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  """Same structure: GQA with 8 query heads per KV head, SwiGLU width 3.5x hidden."""
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=512,
                dtype="float32", remat="none"))
  c.mesh.update(dict(data=-1, fsdp=1))
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
