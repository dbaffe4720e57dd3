"""LoRA domain adaptation of a tiny MoE whose parameters are mostly routed experts (issue 7.6).

Pre-train on the pydoc topics outside the held-out domain (built-in types, strings, special
attributes: `HELD_OUT`, 14 of 79 topics, 26% of the text), then adapt to that domain with full
fine-tuning or LoRA and compare the improvement of the held-out-domain test loss.

The model (4 layers, MLA attention, first layer dense, then 32 routed experts top-2 + 1 shared
expert) has ~7.8M parameters of which ~90% sit in routed experts, as in DeepSeek-V2/V3, so an
adapter on every linear layer *except* the routed experts is < 1% of the parameters at r = 8.

Arguments (`get_config("pretrain")`, `"adapt"`, `"adapt,smoke"`, ...):
  pretrain   training on the other topics (from scratch)
  adapt      fine-tuning on the held-out topics; `config.lora` picks LoRA (enabled) or full FT
  smoke      tiny sizes and few steps (a functional check)

The held-out domain is split by `scripts/lora_sweep.py` into train / dev (learning-rate choice)
/ test (reported) pieces; `config.data` here is what `ds-jax train` would use (train / test).

Protocols (docs/lora.md): A (rounds 1-2) pre-trains `c.steps` = 400 steps (1.6 epochs; the
base is still far from converged); B (round 3) the same for 1,500 steps
(`scripts/lora_sweep.py --pretrain-steps 1500`, cosine over all of them), the setting LoRA is
normally used in (a well-trained base). Everything else is shared.

Commands (the sweep driver runs all phases, seeds and variants):
  python scripts/lora_sweep.py --out runs/lora_sweep --seeds 0,1,2
  python scripts/lora_sweep.py --out /tmp/lora_smoke --smoke
Results: docs/lora.md.
"""

from ds_jax.config import base_config
from ds_jax.lora import default_lora_config

HELD_OUT = r"^(types|bltin|specialattrs|string)"


def get_config(arg=None):
  args = set(filter(None, (arg or "pretrain").split(",")))
  unknown = args - {"pretrain", "adapt", "smoke"}
  if unknown or not args & {"pretrain", "adapt"}:
    raise ValueError(f"unknown argument(s) {sorted(unknown)}; use pretrain|adapt[,smoke]")
  c = base_config()
  c.steps = 400 if "pretrain" in args else 100
  c.batch_size = 16 if "pretrain" in args else 8
  c.seq_len = 64
  c.log_every = 50
  c.eval_every = 0
  c.eval_steps = 8
  m = c.model
  m.model_type = "deepseek_v2"
  m.update(dict(vocab_size=259, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, attention_type="mla",
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
                n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=2,
                moe_intermediate_size=192, first_k_dense_replace=1, norm_topk_prob=True,
                aux_loss_alpha=0.01, moe_block_size=16))
  c.data.validation_fraction = 0.25
  if "pretrain" in args:
    c.data.exclude = HELD_OUT
    c.optimizer.update(dict(learning_rate=3e-3, warmup_steps=40, weight_decay=0.1))
  else:
    c.data.include = HELD_OUT
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=10, weight_decay=0.0))
  c.lora = default_lora_config()
  # All linear layers except the routed experts (and lm_head, embeddings, router).
  c.lora.update(dict(r=8, lora_alpha=16.0, target_modules=["all-linear"],
                     exclude_modules=["experts"]))
  if "smoke" in args:
    c.steps = 20 if "pretrain" in args else 10
    c.batch_size = 4
    c.eval_steps = 2
    m.num_hidden_layers = 2
    m.n_routed_experts = 8
  return c
