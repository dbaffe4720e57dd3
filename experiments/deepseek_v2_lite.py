"""DeepSeek-V2-Lite: 15.7B total / 2.4B active, MLA without query compression, greedy routing.

Published shape (DeepSeek-V2 paper, Appendix B; HF `deepseek-ai/DeepSeek-V2-Lite` config.json):
27 layers (first dense, intermediate 10944), hidden 2048, 16 heads, MLA kv_lora 512 / no q_lora /
rope 64 / nope 128 / v 128, 64 routed + 2 shared experts of width 1408, top-6 softmax without
renormalisation, scale 1.0, expert balance alpha1 = 0.001; vocab 102400; YaRN factor 40 from 4k.
Pre-training: 5.7T tokens, sequence 4k, batch 4608 sequences, peak LR 4.2e-4.

Commands:
  ds-jax analyze --config experiments/deepseek_v2_lite.py   # 15.71B total, 2.45B active, <1 s
  ds-jax train --config experiments/deepseek_v2_lite.py:tiny --workdir runs/v2_lite_tiny
Expected (`:tiny`, 300 steps of 8 x 128 byte tokens): not measured for this file; the
similar-sized deepseek_v2:tiny reaches validation loss 2.16 (uniform: 5.6) in ~2 min of CPU time.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "deepseek_v2"
  m.vocab_size = 102400
  m.hidden_size = 2048
  m.intermediate_size = 10944
  m.num_hidden_layers = 27
  m.num_attention_heads = 16
  m.num_key_value_heads = 16
  m.max_position_embeddings = 163840
  m.rope_theta = 10000.0
  m.rope_scaling.update(dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))
  m.attention_type = "mla"
  m.q_lora_rank = 0
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.n_routed_experts = 64
  m.n_shared_experts = 2
  m.num_experts_per_tok = 6
  m.moe_intermediate_size = 1408
  m.first_k_dense_replace = 1
  m.routed_scaling_factor = 1.0
  m.norm_topk_prob = False
  m.scoring_func = "softmax"
  m.topk_method = "greedy"
  m.aux_loss_alpha = 0.001
  c.seq_len = 4096
  c.batch_size = 4608
  c.steps = 5_700_000_000_000 // (4608 * 4096)  # 5.7T tokens
  c.optimizer.learning_rate = 4.2e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  """Same regime (MLA without q_lora, first layer dense, greedy top-k of fine experts, 2 shared)."""
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                dtype="float32", remat="none"))
  m.rope_scaling.type = "none"
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
