"""The benchmark model of issue 3: a small DeepSeek-V2-style MoE with MLA, fixed shape.

Exactly: hidden 256, 4 heads, 4 layers with the first dense (intermediate 512); MLA with
kv_lora_rank 64, no q_lora, qk_nope 32, qk_rope 16, v_head 32; 16 routed experts, top-4 (greedy
softmax as DeepSeek-V2-Lite), 1 shared expert, moe_intermediate_size 128; vocab 1024; sequence
256; batch 4. scripts/bench_moe.py runs its train step beside transformers' DeepseekV2ForCausalLM
of the same shape.

Commands:
  ds-jax analyze --config experiments/bench_dsv2_tiny.py
  ds-jax train --config experiments/bench_dsv2_tiny.py --workdir runs/bench_dsv2_tiny
Expected: see docs/benchmarks.md for tokens/s and MFU on this machine.
"""

from ds_jax.config import base_config


def get_config(arg=None):
  c = base_config()
  m = c.model
  m.model_type = "deepseek_v2"
  m.vocab_size = 1024
  m.hidden_size = 256
  m.intermediate_size = 512
  m.num_hidden_layers = 4
  m.num_attention_heads = 4
  m.num_key_value_heads = 4
  m.max_position_embeddings = 1024
  m.attention_type = "mla"
  m.q_lora_rank = 0
  m.kv_lora_rank = 64
  m.qk_nope_head_dim = 32
  m.qk_rope_head_dim = 16
  m.v_head_dim = 32
  m.n_routed_experts = 16
  m.num_experts_per_tok = 4
  m.n_shared_experts = 1
  m.moe_intermediate_size = 128
  m.first_k_dense_replace = 1
  m.topk_method = "greedy"
  m.scoring_func = "softmax"
  m.norm_topk_prob = False
  m.routed_scaling_factor = 1.0
  c.seq_len = 256
  c.batch_size = 4
  c.steps = 100
  c.log_every = 10
  c.eval_every = 0
  if arg:
    raise ValueError(f"unknown argument {arg!r}; this config takes none")
  return c
