"""Sweep (b): routing regimes at one MoE size.

    python scripts/sweep.py --sweep experiments/sweeps/routing.py --seeds 3

All runs: tiny_moe (MLA, 4 layers, first dense, 8 routed experts top-2 + 1 shared, width 96),
200 steps of 8 x 128 byte tokens, renormalised top-k weights, no router z-loss.
- softmax_aux:       DeepSeek-V2-Lite style greedy softmax + expert balance loss alpha1 = 0.01.
- sigmoid_bias:      DeepSeek-V3 noaux_tc: sigmoid scores, no balance loss, bias update
                     gamma = 0.001 (V3's value, tuned for long runs).
- sigmoid_bias_g01:  the same with gamma = 0.01, to see whether the bias mechanism balances at all
                     within 200 steps.
- group_limited:     DeepSeek-V2 group-limited greedy + alpha1 = 0.01: 2 groups of 4 experts,
                     each token keeps its 1 best group (group score = its best expert) and picks
                     its top-2 inside it. (An earlier version used 4 groups of 2 keeping 2: with
                     top-2 the two best experts always lie in the two best groups, so that arm was
                     identical to softmax_aux by construction. With k = 2 the limit binds only if
                     topk_group = 1, and groups of 2 would then fix the expert pair, so 2 groups.)
- softmax_no_aux:    greedy softmax without any balance term (the control).
Compare val_loss and moe/maxvio (load imbalance). All arms have the same parameters (sigmoid_bias
adds 8 bias numbers per MoE layer). At this scale it can show balance (MaxVio) differences
clearly; loss differences are expected to be within seed noise and should be read as such.
"""

COMMON = ["steps=200", "batch_size=8", "seq_len=128", "log_every=10", "eval_every=0",
          "eval_steps=8", "checkpoint.every_steps=200", "model.norm_topk_prob=true",
          "model.router_z_loss_coef=0.0"]


def get_sweep(arg=None):
  return dict(
      base="experiments/tiny_moe.py",
      common=COMMON,
      runs={
          "softmax_aux": ["model.topk_method=greedy", "model.aux_loss_alpha=0.01"],
          "sigmoid_bias": ["model.topk_method=noaux_tc", "model.scoring_func=sigmoid",
                           "model.aux_loss_alpha=0.0", "model.bias_update_speed=0.001"],
          "sigmoid_bias_g01": ["model.topk_method=noaux_tc", "model.scoring_func=sigmoid",
                               "model.aux_loss_alpha=0.0", "model.bias_update_speed=0.01"],
          "group_limited": ["model.topk_method=group_limited_greedy", "model.n_group=2",
                            "model.topk_group=1", "model.aux_loss_alpha=0.01"],
          "softmax_no_aux": ["model.topk_method=greedy", "model.aux_loss_alpha=0.0"],
      },
      metric="val_loss")
