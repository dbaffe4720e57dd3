"""DeepSeek-V3: 671B total / 37B active (+ one MTP module), noaux_tc sigmoid routing.

Published shape (DeepSeek-V3 technical report; HF `deepseek-ai/DeepSeek-V3` config.json): 61
layers (first 3 dense, intermediate 18432), hidden 7168, 128 heads, MLA kv_lora 512 / q_lora 1536 /
rope 64 / nope 128 / v 128, 256 routed + 1 shared experts of width 2048, top-8 sigmoid scores with
a selection-only correction bias, 8 groups keep 4 (group score = sum of top-2), renormalised,
times 2.5; sequence-wise balance alpha = 1e-4 and bias update gamma = 0.001 for the first 14.3T
tokens; one MTP module (loss weight 0.3); vocab 129280; YaRN factor 40 from 4k (mscale 1.0).
Pre-training: 14.8T tokens, sequence 4k, batch ramped 3072 -> 15360 (15360 here), peak LR 2.2e-4.

The 671B excludes the MTP module: `ds-jax analyze` prints 671.0B and the MTP module's 11.6B
apart (HF's 685B adds the MTP module plus its own copies of the embedding and output head).

Commands:
  ds-jax analyze --config experiments/deepseek_v3.py   # 671.0B total, 36.6B active
  ds-jax train --config experiments/deepseek_v3.py:tiny --workdir runs/v3_tiny
Expected (`:tiny`, 300 steps of 8 x 128 byte tokens): not measured for this file; the
similar-sized deepseek_v2:tiny reaches validation loss 2.16 (uniform: 5.6) in ~2 min of CPU time.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "deepseek_v3"
  m.vocab_size = 129280
  m.hidden_size = 7168
  m.intermediate_size = 18432
  m.num_hidden_layers = 61
  m.num_attention_heads = 128
  m.num_key_value_heads = 128
  m.max_position_embeddings = 163840
  m.rope_theta = 10000.0
  m.rope_scaling.update(dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
  m.attention_type = "mla"
  m.q_lora_rank = 1536
  m.kv_lora_rank = 512
  m.qk_nope_head_dim = 128
  m.qk_rope_head_dim = 64
  m.v_head_dim = 128
  m.n_routed_experts = 256
  m.n_shared_experts = 1
  m.num_experts_per_tok = 8
  m.moe_intermediate_size = 2048
  m.first_k_dense_replace = 3
  m.routed_scaling_factor = 2.5
  m.norm_topk_prob = True
  m.scoring_func = "sigmoid"
  m.topk_method = "noaux_tc"
  m.n_group = 8
  m.topk_group = 4
  m.seq_aux_loss_alpha = 1e-4
  m.bias_update_speed = 0.001
  c.seq_len = 4096
  c.batch_size = 15360
  c.steps = 14_800_000_000_000 // (15360 * 4096)  # 14.8T tokens
  m.bias_update_stop_step = 14_300_000_000_000 // (15360 * 4096)  # gamma -> 0 after 14.3T
  m.num_nextn_predict_layers = 1
  m.mtp_loss_weight = 0.3
  m.dtype = "bfloat16"
  m.remat = "full"
  c.optimizer.learning_rate = 2.2e-4
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.mesh.update(dict(data=-1, expert=8))
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  """Same regime: noaux_tc sigmoid + bias, 16 experts in 4 groups keep 2, top-4, 1 shared, MTP."""
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=16, num_experts_per_tok=4,
                moe_intermediate_size=32, first_k_dense_replace=1, n_group=4, topk_group=2,
                bias_update_stop_step=-1, dtype="float32", remat="none"))
  m.rope_scaling.type = "none"
  c.mesh.update(dict(data=-1, expert=1))
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
