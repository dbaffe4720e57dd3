"""The seed's MoE model card: 8 experts, top-2 token-choice ("dynamic") routing, every layer MoE.

The seed specifies only the routing (8 experts, top-2, dynamic routing); the sizes below are
ours, chosen as a ~1B-total research model: 16 layers, hidden 1024, 16 heads / 4 KV heads, expert
width 2816, Mixtral-style routing (softmax over the top-2 logits) with a 0.01 balance loss and a
1e-3 router z-loss; vocab 32000. `:tiny` keeps the regime at CPU size.

Commands:
  ds-jax analyze --config experiments/seed_moe_8x2.py
  ds-jax train --config experiments/seed_moe_8x2.py:tiny --workdir runs/seed_moe_tiny
Expected (`:tiny`, 300 steps of 8 x 128 byte tokens): not measured for this file; the
similar-sized deepseek_v2:tiny reaches validation loss 2.16 (uniform: 5.6) in ~2 min of CPU time.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "mixtral"
  m.vocab_size = 32000
  m.hidden_size = 1024
  m.intermediate_size = 2816
  m.num_hidden_layers = 16
  m.num_attention_heads = 16
  m.num_key_value_heads = 4
  m.max_position_embeddings = 4096
  m.n_routed_experts = 8
  m.num_experts_per_tok = 2
  m.moe_intermediate_size = 2816
  m.topk_method = "mixtral"
  m.scoring_func = "softmax"
  m.norm_topk_prob = True
  m.aux_loss_alpha = 0.01
  m.router_z_loss_coef = 1e-3
  c.seq_len = 2048
  c.batch_size = 256
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                moe_intermediate_size=128))
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
