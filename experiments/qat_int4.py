"""4-bit quality on the tiny MoE: float32 vs PTQ (round-to-nearest) vs QAT W4 vs QAT W4A8.

Arguments (`experiments/qat_int4.py:<variant>[,smoke]`):
  float      the float32 baseline; PTQ is applied to its final weights (no extra training)
  qat        W4 g128 fake-quant weights (STE) from `quant.start_step` on
  qat_w4a8   as qat, plus dynamic per-token int8 activations at every quantized matmul
  smoke      a few steps, for tests

The model: a 2-layer DeepSeek-style MoE (first layer dense, MLA, 1 shared + 8 routed experts top-2,
hidden 128) on the pydoc corpus (bytes). Groups of 128 along the contraction axis; axes shorter
than 128 (the expert FFN width 96, MLA latents) are one group, i.e. per channel.

Command (all variants, three seeds, table and plot into docs/quant.md's numbers):
  python scripts/quant_quality.py --seeds 0,1,2 --out runs/quant_quality
Runtime on 2 CPU cores: ~1-3 minutes per training run (3 per seed).
"""

from ds_jax.config import base_config
from ds_jax.quant.config import default_quant_config

VARIANTS = ("float", "qat", "qat_w4a8")


def get_config(arg=None):
  parts = [p for p in (arg or "float").split(",") if p]
  variant = parts[0]
  if variant not in VARIANTS or any(p != "smoke" for p in parts[1:]):
    raise ValueError(f"unknown argument {arg!r}; use one of {', '.join(VARIANTS)}[,smoke]")
  c = base_config()
  c.steps = 400
  c.batch_size = 16
  c.seq_len = 64
  c.log_every = 50
  c.eval_every = 0
  c.eval_steps = 8
  m = c.model
  m.model_type = "deepseek_v2"
  m.update(dict(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, attention_type="mla",
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=96, first_k_dense_replace=1, norm_topk_prob=True,
                aux_loss_alpha=0.01))
  c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=30))
  c.checkpoint.every_steps = 10 ** 9
  c.quant = default_quant_config()
  q = c.quant
  q.bits, q.group_size = 4, 128
  q.start_step = c.steps // 2  # QAT switches on half way; the first half is float training
  if variant != "float":
    q.enabled = True
    q.act_bits = 8 if variant == "qat_w4a8" else 0
  if "smoke" in parts:
    c.update(dict(steps=6, batch_size=4, seq_len=32, log_every=2, eval_steps=1))
    q.start_step = 3
  return c
