"""DeepSeek-V2: 236B total / 21B active, MLA with query compression, group-limited routing.

Published shape (DeepSeek-V2 paper; HF `deepseek-ai/DeepSeek-V2` config.json): 60 layers (first
dense, intermediate 12288), hidden 5120, 128 heads, MLA kv_lora 512 / q_lora 1536 / rope 64 /
nope 128 / v 128, 160 routed + 2 shared experts of width 1536, top-6 softmax without
renormalisation times routed_scaling_factor 16, experts in 8 groups keeping the 3 best (group
score = max); balance alpha1/2/3 = 0.003/0.05/0.02, device-limited routing M = 3; vocab 102400;
YaRN factor 40 from 4k. Pre-training: 8.1T tokens, sequence 4k, batch ramped 2304 -> 9216
sequences (9216 here), peak LR 2.4e-4, warmup 2000 steps (step decay in the paper; cosine here).

Commands:
  ds-jax analyze --config experiments/deepseek_v2.py   # 235.7B total, 20.9B active
  ds-jax train --config experiments/deepseek_v2.py:tiny --workdir runs/v2_tiny
Measured (`:tiny`, 300 steps of 8 x 128 byte tokens): validation loss 2.61 / 2.34 / 2.16 at
steps 100 / 200 / 300 (uniform over bytes: 5.6); 10 min wall on 2 cores shared with other jobs
(2 min of CPU time): `ds-jax train --config experiments/deepseek_v2.py:tiny --workdir W`.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "deepseek_v2"
  m.vocab_size = 102400
  m.hidden_size = 5120
  m.intermediate_size = 12288
  m.num_hidden_layers = 60
  m.num_attention_heads = 128
  m.num_key_value_heads = 128
  m.max_position_embeddings = 163840
  m.rope_theta = 10000.0
  m.rope_scaling.update(dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707))
  m.attention_type = "mla"
  m.q_lora_rank = 1536
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.n_routed_experts = 160
  m.n_shared_experts = 2
  m.num_experts_per_tok = 6
  m.moe_intermediate_size = 1536
  m.first_k_dense_replace = 1
  m.routed_scaling_factor = 16.0
  m.norm_topk_prob = False
  m.scoring_func = "softmax"
  m.topk_method = "group_limited_greedy"
  m.n_group = 8
  m.topk_group = 3
  m.aux_loss_alpha = 0.003
  m.device_aux_loss_alpha = 0.05
  m.comm_aux_loss_alpha = 0.02
  m.max_devices_per_token = 3
  m.dtype = "bfloat16"
  m.remat = "full"
  c.seq_len = 4096
  c.batch_size = 9216
  c.steps = 8_100_000_000_000 // (9216 * 4096)  # 8.1T tokens
  c.optimizer.learning_rate = 2.4e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.mesh.update(dict(data=-1, expert=8))
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  """Same regime: q_lora MLA, first layer dense, 16 experts in 4 groups keep 2, top-4, scale 16.

  Device-limited routing needs an expert mesh axis, so it is off on one CPU.
  """
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=32, n_group=4, topk_group=2, max_devices_per_token=0,
                dtype="float32", remat="none"))
  m.rope_scaling.type = "none"
  c.mesh.update(dict(data=-1, expert=1))
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
