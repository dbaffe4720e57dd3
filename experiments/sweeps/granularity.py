"""Sweep (c): fine-grained vs coarse experts at equal active and equal total parameters.

    python scripts/sweep.py --sweep experiments/sweeps/granularity.py --seeds 3

All runs: tiny_moe (MLA, 4 layers, first dense), no shared expert, 200 steps of 8 x 128 byte
tokens. Every MoE layer stores E x F = 768 of expert width and a token uses k x F = 192:
- coarse_4x1:  4 experts of width 192, top-1.
- medium_8x2:  8 experts of width 96, top-2.
- fine_16x4:  16 experts of width 48, top-4 (DeepSeekMoE-style segmentation).
Counts from ds_jax.analysis.count_params (they differ only by the routers, 1,536 / 3,072 / 6,144):
  coarse_4x1  total 1,281,536  active 584,832;  medium_8x2  total 1,283,072  active 586,368;
  fine_16x4   total 1,286,144  active 589,440.
Note: with top-1 the DeepSeek-V2 router does not renormalise, so coarse_4x1 scales its one
expert's output by that expert's softmax probability (< 1), while the top-2/top-4 arms renormalise
their weights to sum to 1 (norm_topk_prob, as in tiny_moe). That is part of what "top-1" means here.
Expected runtime on 2 free CPU cores: under 20 min for 3 seeds. At this scale it can show whether
finer segmentation helps quality at equal compute and what it costs in tokens/s on CPU; it
cannot reproduce the large-scale gains reported by DeepSeekMoE.
"""

COMMON = ["steps=200", "batch_size=8", "seq_len=128", "log_every=10", "eval_every=0",
          "eval_steps=8", "checkpoint.every_steps=200", "model.n_shared_experts=0"]


def get_sweep(arg=None):
  return dict(
      base="experiments/tiny_moe.py",
      common=COMMON,
      runs={
          "coarse_4x1": ["model.n_routed_experts=4", "model.num_experts_per_tok=1",
                         "model.moe_intermediate_size=192"],
          "medium_8x2": ["model.n_routed_experts=8", "model.num_experts_per_tok=2",
                         "model.moe_intermediate_size=96"],
          "fine_16x4": ["model.n_routed_experts=16", "model.num_experts_per_tok=4",
                        "model.moe_intermediate_size=48"],
      },
      metric="val_loss")
