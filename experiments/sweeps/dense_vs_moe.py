"""Sweep (a): dense vs MoE at equal active FLOPs per token, and at equal total parameters.

    python scripts/sweep.py --sweep experiments/sweeps/dense_vs_moe.py --seeds 3

All runs: tiny_moe's MLA attention, 4 layers, hidden 128, every layer the same kind (no leading
dense layer), 200 steps of 8 x 128 byte tokens. MoE: 8 routed experts (width 96) top-2 + 1 shared
(width 96), so a token uses 3 x 96 = 288 of FFN width out of 9 x 96 = 864 stored.
- moe:                the MoE model.
- dense_equal_active: SwiGLU width 288 — the same FFN FLOPs per token (router aside).
- dense_equal_total:  SwiGLU width 864 — the same FFN parameters, 3x the FFN FLOPs.
Counts from ds_jax.analysis.count_params (active excludes the embedding table, includes the head):
  moe                 total 1,579,008  active   661,120  train 4.75 MFLOPs/token
  dense_equal_active  total   690,176  active   657,024  train 4.72 MFLOPs/token
  dense_equal_total   total 1,574,912  active 1,541,760  train 10.03 MFLOPs/token
(the MoE's extra 4,096 are its routers.)
Expected runtime on 2 free CPU cores: ~1-2 min per run, under 20 min for 3 seeds.
What it can show at this scale: whether MoE beats dense at equal compute on a 200-step byte-level
run; it cannot show the large-scale picture (expert specialisation needs far more tokens).
"""

COMMON = ["steps=200", "batch_size=8", "seq_len=128", "log_every=10", "eval_every=0",
          "eval_steps=8", "checkpoint.every_steps=200", "model.first_k_dense_replace=0"]


def get_sweep(arg=None):
  return dict(
      base="experiments/tiny_moe.py",
      common=COMMON,
      runs={
          "moe": [],
          "dense_equal_active": ["model.n_routed_experts=0", "model.intermediate_size=288"],
          "dense_equal_total": ["model.n_routed_experts=0", "model.intermediate_size=864"],
      },
      metric="val_loss")
