"""Tiny random transformers models of the four families, saved as HF model directories."""

from __future__ import annotations

import numpy as np

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
           n_shared_experts=1, num_key_value_heads=4)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}

# name -> (model_type, config kwargs)
CASES = {
    "llama": ("llama", dict(num_key_value_heads=2)),
    "llama_tied_linear_headdim": ("llama", dict(
        num_key_value_heads=1, head_dim=12, tie_word_embeddings=True,
        rope_scaling={"type": "linear", "factor": 2.0})),
    "mixtral": ("mixtral", dict(num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, rope_theta=10000.0)),
    "v2_greedy_yarn_tied": ("deepseek_v2", dict(
        MLA, q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1,
        tie_word_embeddings=True, rope_scaling=YARN)),
    "v2_group_limited_qlora": ("deepseek_v2", dict(
        MLA, q_lora_rank=12, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=2.0, first_k_dense_replace=0)),
    "v3_noaux_qlora_yarn": ("deepseek_v3", dict(
        MLA, q_lora_rank=12, n_group=4, topk_group=2, first_k_dense_replace=1,
        rope_scaling=YARN)),
    "v3_noaux_no_qlora_tied": ("deepseek_v3", dict(
        MLA, q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=1,
        tie_word_embeddings=True, num_hidden_layers=3)),
}


def build(model_type: str, seed: int = 0, **kw):
  """A transformers causal LM with O(1) random weights (and a random V3 correction bias)."""
  import torch
  import transformers
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
         "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
         "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM)}
  config_cls, model_cls = cls[model_type]
  cfg = config_cls(**{**BASE, **kw})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim > 1:
        p.normal_(0.0, 0.25)
      else:
        p.uniform_(0.7, 1.3)
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(torch.randn_like(b) * 0.2)
  return model


def save_case(name: str, path: str, seed: int = 0):
  model_type, kw = CASES[name]
  model = build(model_type, seed, **kw)
  model.save_pretrained(path)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def tokens(vocab: int = 96, b: int = 2, l: int = 9, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (b, l)).astype(np.int32)
