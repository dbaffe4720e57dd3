"""Mixtral-8x22B: 141B total / 39B active; GQA, 8 experts, top-2 softmax over the top-k logits.

Published shape (HF `mistralai/Mixtral-8x22B-v0.1` config.json): 56 layers, hidden 6144, 48 heads
with 8 KV heads (head 128), every layer MoE with 8 experts of width 16384, top-2, router aux loss
0.001 (HF's normalisation), no shared experts; vocab 32768; rope_theta 1e6; context 65536;
RMSNorm eps 1e-5. The training data, token count and batch size are not published; seq_len 4096 here is an assumption.

Commands:
  ds-jax analyze --config experiments/mixtral_8x22b.py   # 140.6B total, 39.0B active
  ds-jax train --config experiments/mixtral_8x22b.py:tiny --workdir runs/mixtral_tiny
Expected (`:tiny`, 300 steps of 8 x 128 byte tokens): not measured for this file; the
similar-sized deepseek_v2:tiny reaches validation loss 2.16 (uniform: 5.6) in ~2 min of CPU time.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "mixtral"
  m.vocab_size = 32768
  m.hidden_size = 6144
  m.intermediate_size = 16384
  m.num_hidden_layers = 56
  m.num_attention_heads = 48
  m.num_key_value_heads = 8
  m.head_dim = 128
  m.max_position_embeddings = 65536
  m.rope_theta = 1_000_000.0
  m.rms_norm_eps = 1e-5
  m.n_routed_experts = 8
  m.num_experts_per_tok = 2
  m.moe_intermediate_size = 16384
  m.first_k_dense_replace = 0
  m.topk_method = "mixtral"
  m.scoring_func = "softmax"
  m.norm_topk_prob = True
  # HF Mixtral's loss (coef 0.001) is E * sum_i frac_i * P_i over all top-k slots, which is k times
  # DeepSeek-V2's expert-balance term that ds_jax uses: alpha1 = 0.001 * k.
  m.aux_loss_alpha = 0.002
  m.dtype = "bfloat16"
  m.remat = "full"
  c.seq_len = 4096
  c.batch_size = 1024
  c.mesh.update(dict(data=-1, expert=8))
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown argument {arg!r}; use nothing or 'tiny'")
  return c


def tiny(c):
  """Same regime: GQA 4 heads / 2 KV heads, every layer 8 experts top-2 (Mixtral routing)."""
  m = c.model
  m.update(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, moe_intermediate_size=128, dtype="float32",
                remat="none"))
  c.mesh.update(dict(data=-1, expert=1))
  c.update(dict(seq_len=128, batch_size=8, steps=300, log_every=10, eval_every=100))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
