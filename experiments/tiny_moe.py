"""Tiny DeepSeek-style MoE (MLA, 1 shared + 8 routed experts top-2, first layer dense): the demo.

Commands:
  ds-jax train --config experiments/tiny_moe.py --workdir runs/tiny_moe
  ds-jax train --config experiments/tiny_moe.py:smoke --workdir /tmp/moe_smoke   # 20 steps
Expected: validation loss falls from ~5.6 (uniform over 259 bytes) well below it in 300 steps;
expert load stays near uniform (moe/maxvio in metrics.jsonl) under the 0.01 balance loss.
Measured: `:smoke` reaches val_loss 3.34 after 20 steps; the full run is not measured yet.
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
  m = c.model
  m.model_type = "deepseek_v2"
  m.update(dict(vocab_size=259, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, attention_type="mla",
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=96, first_k_dense_replace=1, topk_method="greedy",
                scoring_func="softmax", norm_topk_prob=True, aux_loss_alpha=0.01,
                router_z_loss_coef=1e-3))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
  c.checkpoint.every_steps = 100
  if arg == "smoke":
    c.update(dict(steps=20, batch_size=8, seq_len=64, log_every=5, eval_every=10, eval_steps=2))
    c.checkpoint.every_steps = 10
    m.num_hidden_layers = 2
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'smoke'")
  return c
