"""Sweep (d): with and without a shared expert, at equal active and equal total parameters.

    python scripts/sweep.py --sweep experiments/sweeps/shared_experts.py --seeds 3

All runs: tiny_moe (MLA, 4 layers, first dense), expert width 96, 200 steps of 8 x 128 byte tokens.
- shared_1_routed_8x2: 1 shared + 8 routed top-2 (active 3 x 96, stored 9 x 96).
- routed_9x3:          no shared, 9 routed top-3 (active 3 x 96, stored 9 x 96).
Counts from ds_jax.analysis.count_params: shared_1_routed_8x2 total 1,393,664 active 696,960;
routed_9x3 total 1,394,048 active 697,344 (the difference is the 9th router column).
Both use tiny_moe's expert balance loss (alpha1 = 0.01) and router z-loss (1e-3).
Expected runtime on 2 free CPU cores: under 20 min for 3 seeds. At this scale it can show
whether isolating an always-on expert helps at equal compute and parameters, within seed noise.
"""

COMMON = ["steps=200", "batch_size=8", "seq_len=128", "log_every=10", "eval_every=0",
          "eval_steps=8", "checkpoint.every_steps=200"]


def get_sweep(arg=None):
  return dict(
      base="experiments/tiny_moe.py",
      common=COMMON,
      runs={
          "shared_1_routed_8x2": ["model.n_shared_experts=1", "model.n_routed_experts=8",
                                  "model.num_experts_per_tok=2"],
          "routed_9x3": ["model.n_shared_experts=0", "model.n_routed_experts=9",
                         "model.num_experts_per_tok=3"],
      },
      metric="val_loss")
