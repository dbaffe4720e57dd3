"""LoRA vs full fine-tuning on held-out pydoc topics: pre-train, tune LRs, adapt (issue 7.6).

  python scripts/lora_sweep.py --out runs/lora_sweep --phase tune            # seed 0, dev split
  python scripts/lora_sweep.py --out runs/lora_sweep --phase sweep --seeds 0,1,2 \
      [--full-lr auto --lora-lr auto]   # the tune phase's best dev lr; reports the test split
  python scripts/lora_sweep.py --out runs/lora_sweep --phase pretrain --seeds 1,2  # bases only
  python scripts/lora_sweep.py --out /tmp/lora_smoke --phase tune --smoke    # functional check
  python scripts/lora_sweep.py --out runs/lora_r3_p1500 --phase pretrain --seeds 0,1,2 \
      --pretrain-steps 1500 --pretrain-eval-every 250   # protocol B bases (docs/lora.md round 3)

Model and pre-training data: experiments/lora_moe.py. Per seed s the MoE is pre-trained once
(init and data order from s) on the topics outside the held-out domain and cached in
`<out>/pretrained_s<s>.pkl`; every fine-tune of that seed starts from it.

The held-out domain (14 topics) is cut into pieces of PIECE characters; a fixed permutation
(independent of the seed) puts 70% of them in *train*, 10% in *dev* and 20% in *test*. The tune
phase trains on train and scores each learning rate by the dev loss after training; the sweep
phase uses the chosen learning rates for every seed and reports the test loss. The test split
is never used to choose anything.

Per run: loss before / after on dev and test, test improvement, trainable parameters and their
fraction of the model's (base) parameters, optimizer-state bytes, adapter-file bytes, seconds.
Rows go to `<out>/results.jsonl` (one JSON per line, with `phase`); `--table` prints the
markdown summary of a results file.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import pickle
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ds_jax import lora
import ds_jax.lora.transforms  # noqa: F401  (lora.transforms.map_params)
from ds_jax.lora import esft
from ds_jax.config import model_config
from ds_jax.data.text import (PackedText, TextData, pydoc_topics, tokenize_documents)
from ds_jax.data.tokenizer import get_tokenizer
from ds_jax.models import lm
from ds_jax.optim import make_optimizer, schedule
from ds_jax.train import LMTask, TrainState, eval_step, train_step

# Target sets. MLA has no v_proj: its values come from kv_b_proj (k_nope and v), queries from
# q_proj (or q_b_proj with q_lora_rank > 0), so "qv" = q_proj, q_b_proj, kv_b_proj.
NORMS = r"(.*/)?[a-z_]*norm/scale"  # RMSNorm gains (1,280 parameters)
ROUTER = r".*/mlp/gate/kernel"  # the MoE routers (12,288 parameters)
EXPERT_GU = r".*/mlp/experts/(gate|up)_proj"  # routed experts' input projections
EXPERT_DOWN = r".*/mlp/experts/down_proj"
# The round-3 headline's non-expert parts: attention q / kv_b / o, the shared experts, lm_head.
HEAD_NON_EXPERT_EXCLUDE = ["layers_0/block/mlp/.*", "kv_a_proj_with_mqa", "experts"]
TARGETS = {
    "qv": dict(target_modules=["q_proj", "q_b_proj", "kv_b_proj"]),
    "all-but-experts": dict(target_modules=["all-linear"], exclude_modules=["experts"]),
    "all-linear": dict(target_modules=["all-linear"]),
    "experts": dict(target_modules=["experts"]),
    # One A, B per routed-expert weight, shared by all 32 experts of a layer (LoraConfig
    # expert_mode="shared"), with per-expert gains (expert_scale): "expert" a scalar g_e,
    # ΔW_e = g_e·s·A·B; "rank" a vector g_e of r gains, ΔW_e = s·A·diag(g_e)·B.
    "experts-shared": dict(target_modules=["experts"], expert_mode="shared",
                           expert_scale="expert"),
    "experts-shared-rankgain": dict(target_modules=["experts"], expert_mode="shared",
                                    expert_scale="rank"),
    # Every linear layer except layer 0's dense MLP, the routed experts through a shared adapter.
    "all-but-dense-mlp+experts-shared": dict(target_modules=["all-linear"],
                                             exclude_modules=["layers_0/block/mlp/.*"],
                                             expert_mode="shared", expert_scale="expert"),
    "all-but-dense-mlp+experts-shared-rankgain": dict(
        target_modules=["all-linear"], exclude_modules=["layers_0/block/mlp/.*"],
        expert_mode="shared", expert_scale="rank"),
    # Attention plus the shared routed-expert adapter.
    "attn+experts-shared": dict(target_modules=["self_attn", "experts"], expert_mode="shared",
                                expert_scale="expert"),
    "attn+experts-shared-rankgain": dict(target_modules=["self_attn", "experts"],
                                         expert_mode="shared", expert_scale="rank"),
    # PiSSA initialisation (principal singular directions in A, B; the residual in the base).
    "all-but-experts-pissa": dict(target_modules=["all-linear"], exclude_modules=["experts"],
                                  init="pissa"),
    # (d) plain parameters trained fully next to the adapter (`train_also`, a regex over the
    # parameter path; counted in the trainable %, not stored in the adapter file).
    "all-but-experts+norms": dict(target_modules=["all-linear"], exclude_modules=["experts"],
                                  train_also=NORMS),
    "attn+experts-shared-rankgain+router+norms": dict(
        target_modules=["self_attn", "experts"], expert_mode="shared", expert_scale="rank",
        train_also=f"{NORMS}|{ROUTER}"),
    # Round 3 (hypotheses 2, 3 of the brief). Tied routed-expert A, B plus DoRA's magnitude,
    # which stays per expert: m_e [E, F] per weight, W'_e = m_e·(W_e + sAB)/||W_e + sAB||_col —
    # per-expert output-feature gains (E·F parameters per weight, 49,152 on the 3 MoE layers).
    "experts-shared-dora": dict(target_modules=["experts"], expert_mode="shared", use_dora=True),
    # Attention LoRA + tied routed A, B, with the per-expert DoRA magnitude only on down_proj
    # (E·128 per layer, 12,288): three LoraConfigs in one adapter (`parts`).
    "attn+experts-shared-dora-down": dict(parts=[
        dict(target_modules=["self_attn"]),
        dict(target_modules=[EXPERT_GU], expert_mode="shared"),
        dict(target_modules=[EXPERT_DOWN], expert_mode="shared", use_dora=True)]),
    # (3) the output layer too: LoRA on lm_head (r·(128 + 259) = 3,096 parameters).
    "all-but-experts+lm_head": dict(target_modules=["all-linear", "lm_head"],
                                    exclude_modules=["experts"]),
    # The earlier best <= 1% variant plus lm_head, fitted under 1% by leaving out
    # kv_a_proj_with_mqa (the KV latent is adapted downstream by kv_b_proj): 73,016 (0.94%).
    "all-but-dense-mlp-kv_a+experts-shared+lm_head": dict(
        target_modules=["all-linear", "lm_head"],
        exclude_modules=["layers_0/block/mlp/.*", "kv_a_proj_with_mqa"],
        expert_mode="shared", expert_scale="expert"),
    # lm_head trained fully (PEFT's modules_to_save; 33,152) next to LoRA on q_proj / o_proj
    # and the tied routed-expert adapter: 72,864 (0.94%).
    "qo+experts-shared+lm_head-full": dict(target_modules=["q_proj", "o_proj", "experts"],
                                           expert_mode="shared", expert_scale="expert",
                                           train_also=r"lm_head/kernel"),
    # ... and the input side too: LoRA on lm_head, the byte embedding trained fully: 75,960.
    "qo+experts-shared+lm_head+embed-full": dict(
        target_modules=["q_proj", "o_proj", "experts", "lm_head"], expert_mode="shared",
        expert_scale="expert", train_also=r"embed_tokens/embedding"),
    "attn+experts-shared-dora-down+lm_head": dict(parts=[
        dict(target_modules=["self_attn", "lm_head"]),
        dict(target_modules=[EXPERT_GU], expert_mode="shared"),
        dict(target_modules=[EXPERT_DOWN], expert_mode="shared", use_dora=True)]),
    # Round 4 (1) ESFT-style: per-expert LoRA (own A, B on gate/up/down) only for the k routed
    # experts per MoE layer with the highest token-selection ratio on the held-out domain's
    # *train* split under the seed's pre-trained base (`esft_k`; ds_jax.lora.esft), the other
    # experts unadapted (LoraConfig expert_mode="subset"); next to the headline's non-expert
    # parts (attention q / kv_b / o, shared experts, lm_head: 49,688 at r = 8). Each is
    # 72,728 parameters (0.938%): top-1 at r = 8 (3 · 7,680), top-2 at r = 4 (6 · 3,840), and
    # top-2 at r = 8 without the shared experts' LoRA (6 · 7,680 + 26,648).
    "esft-top1+headline-non-expert": dict(parts=[
        dict(target_modules=["all-linear", "lm_head"], exclude_modules=HEAD_NON_EXPERT_EXCLUDE),
        dict(target_modules=["experts"], expert_mode="subset", esft_k=1)]),
    "esft-top2-r4+headline-non-expert": dict(parts=[
        dict(target_modules=["all-linear", "lm_head"], exclude_modules=HEAD_NON_EXPERT_EXCLUDE),
        dict(target_modules=["experts"], expert_mode="subset", esft_k=2, r=4)]),
    "esft-top2+attn+lm_head": dict(parts=[
        dict(target_modules=["self_attn", "lm_head"], exclude_modules=["kv_a_proj_with_mqa"]),
        dict(target_modules=["experts"], expert_mode="subset", esft_k=2)]),
    # Round 4 (1'), added after the three splits above had run: ESFT *on top of* the tied expert
    # adapter (expert_mode="shared" with an expert_subset: the chosen experts also get their own
    # A_e, B_e of rank subset_r). The round-3 headline + the top-1 expert per layer at rank 1
    # (3 · 960): 75,896 (0.979%); and attention + lm_head + tied experts + the top-2 experts per
    # layer at rank 4 (6 · 3,840), without the shared experts' LoRA: 73,016 (0.941%).
    "all-but-dense-mlp-kv_a+experts-shared+esft-top1-r1+lm_head": dict(
        target_modules=["all-linear", "lm_head"],
        exclude_modules=["layers_0/block/mlp/.*", "kv_a_proj_with_mqa"],
        expert_mode="shared", expert_scale="expert", esft_k=1, subset_r=1),
    "attn+lm_head+experts-shared+esft-top2-r4": dict(parts=[
        dict(target_modules=["self_attn", "lm_head"], exclude_modules=["kv_a_proj_with_mqa"]),
        dict(target_modules=["experts"], expert_mode="shared", expert_scale="expert", esft_k=2,
             subset_r=4)]),
    # Round 4 (2) the round-3 headline with the lm_head adapter's lr at 3x / 1/3 of the rest.
    "all-but-dense-mlp-kv_a+experts-shared+lm_head@lm_head-lr3": dict(
        target_modules=["all-linear", "lm_head"],
        exclude_modules=["layers_0/block/mlp/.*", "kv_a_proj_with_mqa"],
        expert_mode="shared", expert_scale="expert", lr_ratios={r"lm_head/.*": 3.0}),
    "all-but-dense-mlp-kv_a+experts-shared+lm_head@lm_head-lr1/3": dict(
        target_modules=["all-linear", "lm_head"],
        exclude_modules=["layers_0/block/mlp/.*", "kv_a_proj_with_mqa"],
        expert_mode="shared", expert_scale="expert", lr_ratios={r"lm_head/.*": 1.0 / 3.0}),
}
MAIN_TARGET = "all-but-experts"
SHORT = {"qv": "q,v", "all-but-experts": "all but\nrouted", "all-linear": "all-linear",
         "experts": "routed,\nper expert", "experts-shared": "routed,\ntied A,B",
         "all-but-dense-mlp+experts-shared": "all but dense\nMLP; routed tied",
         "all-but-experts+lm_head": "all but\nrouted\n+lm_head",
         "all-but-dense-mlp-kv_a+experts-shared+lm_head": "all but dense\nMLP, kv_a;\nrouted tied\n+lm_head"}
SPLIT_SEED = 20240501
PIECE = 1024
FULL_LRS = (3e-4, 1e-3, 3e-3)
LORA_LRS = (3e-3, 1e-2, 3e-2)
EVAL_BATCH = 32


def load_experiment(arg: str):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "lora_moe.py")
  spec = importlib.util.spec_from_file_location("lora_moe", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg), mod.HELD_OUT


def split_pieces(docs: dict[str, str], piece: int = PIECE, fractions=(0.7, 0.1, 0.2),
                 seed: int = SPLIT_SEED) -> tuple[list[str], list[str], list[str]]:
  """(train, dev, test) text pieces: every document cut into `piece`-character pieces (a short
  tail joins the piece before it), pieces assigned by one fixed permutation."""
  pieces = []
  for name in sorted(docs):
    text = docs[name]
    cuts = list(range(0, len(text), piece))
    if len(cuts) > 1 and len(text) - cuts[-1] < piece // 2:
      cuts.pop()
    pieces += [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]
  order = np.random.default_rng(seed).permutation(len(pieces))
  n_test = int(round(fractions[2] * len(pieces)))
  n_dev = int(round(fractions[1] * len(pieces)))
  test = [pieces[i] for i in sorted(order[:n_test])]
  dev = [pieces[i] for i in sorted(order[n_test:n_test + n_dev])]
  train = [pieces[i] for i in sorted(order[n_test + n_dev:])]
  return train, dev, test


class AdaptData:
  """Train / dev / test streams of the held-out domain; `batch(step)` as TextData's."""

  def __init__(self, cfg, include: str):
    tok = get_tokenizer(cfg.data.tokenizer, "")
    docs = {k: v for k, v in pydoc_topics().items() if re.search(include, k)}
    train, dev, test = split_pieces(docs)
    self.train = PackedText(tokenize_documents(train, tok), cfg.seq_len)
    self.dev = PackedText(tokenize_documents(dev, tok), cfg.seq_len)
    self.test = PackedText(tokenize_documents(test, tok), cfg.seq_len)
    self.seed, self.batch_size = cfg.seed, cfg.batch_size

  def batch(self, step: int) -> dict:
    return self.train.train_batch(self.seed, step, self.batch_size)


GENERIC = "full (other topics' data)"


def generic_data(cfg, sfx: str) -> TextData:
  """Control for the under-trained-base question: the pre-training topics' train split at the
  fine-tune's batch size, seq_len and seed (full FT on it shows how much of the held-out
  improvement is generic language modelling rather than the domain)."""
  pcfg, _ = load_experiment("pretrain" + sfx)
  pcfg.seed, pcfg.batch_size, pcfg.seq_len = cfg.seed, cfg.batch_size, cfg.seq_len
  return TextData(pcfg)


def all_windows(pt: PackedText, batch: int = EVAL_BATCH):
  """Every window of `pt` once, in batches of `batch` rows (the last padded with weight 0)."""
  for s in range(0, pt.num_windows, batch):
    idx = np.arange(s, s + batch)
    b = pt.rows(idx % pt.num_windows)
    b["weights"] = b["weights"] * (idx < pt.num_windows)[:, None].astype(np.float32)
    yield b


def mean_nll(f, state, pt: PackedText) -> float:
  nll = count = 0.0
  for b in all_windows(pt):
    m = jax.device_get(f(state, b))
    nll, count = nll + float(m["nll_sum"]), count + float(m["count"])
  return nll / max(count, 1.0)


_STEPS: dict = {}
_EVALS: dict = {}


def lora_plus(tx, trainable: Any, ratio: float):
  """LoRA+ (Hayou et al. 2024): B's learning rate `ratio` × A's. With AdamW at weight decay 0
  this is the whole update of every `lora_b` leaf multiplied by `ratio`."""
  if ratio == 1.0:
    return tx
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", "")) == "lora_b", trainable)
  return optax.chain(tx, optax.masked(optax.scale(ratio), mask))


def path_lr_ratios(tx, trainable: Any, ratios: Optional[dict]):
  """Own learning rates for parts of the trainable tree: every leaf whose '/'-joined path
  fullmatches a key of `ratios` gets its update scaled by the value (with AdamW at weight decay
  0 this is that leaf's lr × the ratio; the schedule is shared)."""
  if not ratios:
    return tx
  for pattern, ratio in ratios.items():
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: bool(re.fullmatch(pattern, lora.config.path_str(path))), trainable)
    if not any(jax.tree.leaves(mask)):
      raise ValueError(f"lr_ratios pattern {pattern!r} matched no trainable leaf")
    tx = optax.chain(tx, optax.masked(optax.scale(ratio), mask))
  return tx


def esft_affinity(out: str, seed: int, mc, base: Any, data: "AdaptData") -> np.ndarray:
  """[MoE layers, E] token-selection ratio of each routed expert on the held-out domain's train
  split under seed's pre-trained base (ESFT's affinity; cached in <out>/esft_affinity_s<seed>.json)."""
  path = os.path.join(out, f"esft_affinity_s{seed}.json")
  if os.path.exists(path):
    with open(path) as f:
      return np.asarray(json.load(f)["affinity"])
  n = data.train.num_windows
  batches = (data.train.rows(np.arange(s, min(s + EVAL_BATCH, n)))["inputs"]
             for s in range(0, n, EVAL_BATCH))
  aff = esft.expert_affinity(mc, base, batches)
  with open(path, "w") as f:
    json.dump({"seed": seed, "split": "train", "windows": n, "affinity": aff.tolist()}, f)
  return aff


def train_also(trainable: dict, frozen: Any, pattern: str) -> tuple[dict, Any]:
  """Move the plain parameters whose path fullmatches `pattern` from `frozen` into the
  trainable tree: ({"lora": adapter tree, "also": {path: array}}, frozen with None there)."""
  also: dict = {}

  def take(path, leaf):
    if isinstance(leaf, lora.LoraKernel) or leaf is None or not re.fullmatch(pattern, path):
      return leaf
    also[path] = leaf
    return None
  frozen = lora.transforms.map_params(frozen, take)
  if not also:
    raise ValueError(f"train_also={pattern!r} matched no parameter")
  return {"lora": trainable, "also": also}, frozen


def combine_also(trainable: dict, frozen: Any) -> Any:
  also = trainable["also"]
  full = lora.transforms.map_params(frozen, lambda p, v: also[p] if p in also else v)
  return lora.combine(trainable["lora"], full)


def train(cfg, task: LMTask, trainable: Any, frozen: Any, data, seed: int, key,
          b_ratio: float = 1.0, probe=None, probe_every: int = 0,
          lr_ratios: Optional[dict] = None) -> tuple:
  """cfg.steps AdamW steps on `trainable`; the jitted step is cached by `key` (not the seed).
  With `probe_every`, `probe(state)` (e.g. a validation loss) is recorded every that many steps
  and returned as a fourth element [(step, value), ...]."""
  tx = lora_plus(make_optimizer(cfg.optimizer, cfg.steps, trainable), trainable, b_ratio)
  tx = path_lr_ratios(tx, trainable, lr_ratios)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(lambda st, b, rng: train_step(
        st, b, task=task, tx=tx, lr_fn=schedule(cfg.optimizer, cfg.steps), accum=1,
        base_rng=rng))
  step = _STEPS[key]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=tx.init(trainable), frozen=frozen,
                     skipped=jnp.zeros((), jnp.int32))
  rng = jax.random.fold_in(jax.random.key(seed), 1)
  t0 = time.perf_counter()
  losses, probes = [], []
  for s in range(cfg.steps):
    state, metrics = step(state, data.batch(s), rng)
    if (s + 1) % cfg.log_every == 0 or s + 1 == cfg.steps:
      losses.append(float(metrics["loss"]))
    if probe_every and ((s + 1) % probe_every == 0 or s + 1 == cfg.steps):
      probes.append((s + 1, probe(state)))
      print(f"step {s + 1}: probe {probes[-1][1]:.4f}", flush=True)
  jax.block_until_ready(state.params)
  if probe_every:
    return state, time.perf_counter() - t0, losses, probes
  return state, time.perf_counter() - t0, losses


def pretrain(args, seed: int):
  path = os.path.join(args.out, f"pretrained_s{seed}.pkl")
  if os.path.exists(path):
    with open(path, "rb") as f:
      return jax.tree.map(jnp.asarray, pickle.load(f)), None
  cfg, _ = load_experiment("pretrain" + args.sfx)
  cfg.seed = seed
  if args.pretrain_steps:  # the protocol of --out: every seed of one --out uses the same value
    cfg.steps = args.pretrain_steps
  mc = model_config(cfg.model)
  task = LMTask(cfg, mc)
  params = lm.init(mc, jax.random.key(seed))
  ev = jax.jit(functools.partial(eval_step, task=task))
  val_data = TextData(cfg).val
  state, secs, losses, curve = train(cfg, task, params, {}, TextData(cfg), seed, ("pretrain",),
                                     probe=lambda st: mean_nll(ev, st, val_data),
                                     probe_every=args.pretrain_eval_every or cfg.steps)
  val = curve[-1][1]
  with open(path, "wb") as f:
    pickle.dump(jax.tree.map(np.asarray, state.params), f)
  row = {"phase": "pretrain", "run": "pretrain", "seed": seed, "steps": cfg.steps,
         "other_topics_val": val, "val_curve": curve, "train_losses": losses,
         "train_seconds": secs, "params": lora.count_params(state.params)["base"]}
  return state.params, row


def adapter_partition(base: Any, lora_section, lc: dict, seed: int,
                      affinity: Optional[np.ndarray] = None) -> tuple[dict, Any]:
  """Add the variant's adapter and split (trainable, frozen). A variant with `parts` is one
  adapter made of several LoraConfigs on disjoint weights (e.g. DoRA only on some), added
  one after another under the same name; part i draws its A from rng fold_in(seed key, 7 + i)
  (a single-part variant: exactly `lora_train_partition` with rng 7). A part may set its own
  rank `r` (alpha = 2r); a part with `esft_k` gets expert_mode="subset" on the k experts per
  MoE layer with the highest `affinity` (the model's single MoE segment: rows = its layers)."""
  params = base
  for i, part in enumerate(lc.get("parts") or [lc]):
    r = part.get("r", lc["r"])
    subset = ()
    if part.get("esft_k"):
      subset = esft.top_experts(affinity, part["esft_k"])
    lcfg = lora.LoraConfig(
        r=r, lora_alpha=2.0 * r, target_modules=part["target_modules"], expert_subset=subset,
        subset_r=part.get("subset_r", 0),
        exclude_modules=part.get("exclude_modules", ()),
        expert_mode=part.get("expert_mode", "per_expert"),
        expert_scale=part.get("expert_scale", "none"), init=part.get("init", "gaussian"),
        use_dora=part.get("use_dora", False), lora_dropout=float(lora_section.dropout))
    params = lora.add_adapter(params, lora_section.adapter_name, lcfg,
                              jax.random.fold_in(jax.random.key(seed), 7 + i))
  return lora.split_trainable(params)


def variant_list(args) -> list[tuple[str, Optional[dict], float]]:
  """(name, LoRA settings or None for full fine-tuning, lr) of the runs of one seed."""
  if args.phase == "tune":
    out = [("full", None, float(lr)) for lr in filter(None, args.tune_full_lrs.split(","))]
    out += [(GENERIC, None, float(lr)) for lr in filter(None, args.generic_lrs.split(","))]
    lrs = [float(x) for x in args.tune_lrs.split(",")] if args.tune_lrs else LORA_LRS
    for t in args.tune_targets.split(","):
      for r in map(int, args.tune_ranks.split(",")):
        out += [(f"lora r={r} {t}{args.sfx_b}", dict(r=r, **TARGETS[t]), lr) for lr in lrs]
    return out
  out = [("full", None, args.full_lr)]
  for t in filter(None, args.own_lr_targets.split(",")):  # targets at their own tuned lr
    out.append((f"lora r=8 {t}{args.sfx_b}", dict(r=8, **TARGETS[t]),
                choose_lr(args.rows_path, f"lora r=8 {t}{args.sfx_b}", "auto")))
  for r in filter(None, args.ranks.split(",")):
    r = int(r)
    out.append((f"lora r={r} {MAIN_TARGET}", dict(r=r, **TARGETS[MAIN_TARGET]), args.lora_lr))
  for t in filter(None, args.targets.split(",")):
    if t != MAIN_TARGET:
      out.append((f"lora r=8 {t}", dict(r=8, **TARGETS[t]), args.lora_lr))
  for r in filter(None, args.own_lr_ranks.split(",")):  # ranks with their own tuned lr
    out.append((f"lora r={r} {MAIN_TARGET} (own lr)", dict(r=int(r), **TARGETS[MAIN_TARGET]),
                choose_lr(args.rows_path, f"lora r={r} {MAIN_TARGET}", "auto")))
  return out


def choose_lr(rows_path: str, run: str, value: str) -> float:
  """`value` as a float, or for "auto" the tune-phase lr of `run` with the lowest dev loss."""
  if value != "auto":
    return float(value)
  rows = [json.loads(l) for l in open(rows_path)] if os.path.exists(rows_path) else []
  tune = [r for r in rows if r.get("phase") == "tune" and r["run"] == run]
  if not tune:
    raise SystemExit(f"no tune-phase rows for {run!r} in {rows_path}: run --phase tune first")
  return min(tune, key=lambda r: r["dev_after"])["lr"]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True)
  p.add_argument("--phase", choices=("pretrain", "tune", "sweep"), default="sweep",
                 help="pretrain: only the cached pre-trained bases of --seeds")
  p.add_argument("--seeds", default="0")
  p.add_argument("--ranks", default="1,4,8,64", help=f"rank sweep on {MAIN_TARGET}")
  p.add_argument("--targets", default="qv,all-linear,experts", help="target sweep at r=8")
  p.add_argument("--tune-targets", default=MAIN_TARGET)
  p.add_argument("--tune-ranks", default="8")
  p.add_argument("--own-lr-ranks", default="",
                 help="sweep: also these ranks of the main target at their own best dev lr "
                 "(tune them first with --phase tune --tune-ranks ...)")
  p.add_argument("--tune-full-lrs", default=",".join(map(str, FULL_LRS)),
                 help="full fine-tuning grid of the tune phase ('' skips full FT)")
  p.add_argument("--own-lr-targets", default="",
                 help="sweep: r=8 on these targets at their own best dev lr (tune them first "
                 "with --phase tune --tune-targets ...)")
  p.add_argument("--b-lr-ratio", type=float, default=1.0,
                 help="LoRA+: B's learning rate = this × A's (run names get ' B-lr×N')")
  p.add_argument("--tune-lrs", default="", help=f"LoRA grid of the tune phase (default {LORA_LRS})")
  p.add_argument("--full-lr", default="auto",
                 help="a number, or auto: the grid value with the best dev improvement of the "
                 "tune phase in <out>/results.jsonl")
  p.add_argument("--lora-lr", default="auto", help="as --full-lr, for LoRA (all variants)")
  p.add_argument("--steps", type=int, default=0, help="override adaptation steps")
  p.add_argument("--generic-lrs", default="",
                 help="tune phase: also full FT on the pre-training topics (not the held-out "
                 "train split) at these lrs, scored on the held-out dev / test split")
  p.add_argument("--pretrain-steps", type=int, default=0,
                 help="override pre-training steps (default: experiments/lora_moe.py's 400); "
                 "the cosine schedule spans them. Use one --out per value: bases are cached "
                 "there by seed only")
  p.add_argument("--pretrain-eval-every", type=int, default=0,
                 help="also record the other topics' validation loss every N pre-training "
                 "steps (val_curve in the pretrain row)")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--table", default="", help="print the table of this results.jsonl and exit")
  p.add_argument("--plot", default="", help="with --table: also draw the sweep into this png")
  a = p.parse_args(argv)
  if a.table:
    with open(a.table) as f:
      rows = [json.loads(l) for l in f if l.strip()]
    print(table(rows))
    if a.plot:
      plot(rows, a.plot)
    return 0
  os.makedirs(a.out, exist_ok=True)
  # Identical step functions (other seeds, the chosen learning rates) reuse earlier compiles.
  jax.config.update("jax_compilation_cache_dir", os.path.join(a.out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  a.sfx = ",smoke" if a.smoke else ""
  a.sfx_b = f" B-lr×{a.b_lr_ratio:g}" if a.b_lr_ratio != 1.0 else ""
  rows_path = a.rows_path = os.path.join(a.out, "results.jsonl")

  def emit(row):
    print(json.dumps(row), flush=True)
    with open(rows_path, "a") as f:
      f.write(json.dumps(row) + "\n")

  if a.phase == "sweep":
    a.full_lr, a.lora_lr = choose_lr(rows_path, "full", a.full_lr), choose_lr(
        rows_path, f"lora r=8 {MAIN_TARGET}", a.lora_lr)
    print(f"learning rates: full {a.full_lr:g}, LoRA {a.lora_lr:g}", flush=True)
  seeds = [0] if a.phase == "tune" else list(map(int, a.seeds.split(",")))
  for seed in seeds:
    base, prow = pretrain(a, seed)
    if prow:
      emit(prow)
    if a.phase == "pretrain":
      continue
    cfg0, held_out = load_experiment("adapt" + a.sfx)
    cfg0.seed = seed
    data = AdaptData(cfg0, held_out)
    mc = model_config(cfg0.model)
    task = LMTask(cfg0, mc)
    plain_eval = jax.jit(functools.partial(eval_step, task=task))
    st0 = TrainState(step=jnp.zeros((), jnp.int32), params=base, opt_state=(), frozen={},
                     skipped=jnp.zeros((), jnp.int32))
    before = {"dev": mean_nll(plain_eval, st0, data.dev),
              "test": mean_nll(plain_eval, st0, data.test)}
    n_base = lora.count_params(base)["base"]
    done = [json.loads(l) for l in open(rows_path)] if os.path.exists(rows_path) else []
    for name, lc, lr in variant_list(a):
      cfg, _ = load_experiment("adapt" + a.sfx)
      cfg.seed = seed
      if a.steps:
        cfg.steps = a.steps
      same = [r for r in done if r.get("phase") == "tune" and (r["run"], r["seed"], r["lr"],
                                                                r["steps"]) == (name, seed, lr, cfg.steps)]
      if any(r.get("phase") == a.phase and (r["run"], r["seed"], r["lr"], r["steps"]) ==
             (name, seed, lr, cfg.steps) for r in done):
        continue  # already in results.jsonl (an earlier or parallel invocation)
      if a.phase == "sweep" and same:  # the identical run (seed, data, lr) of the tune phase
        emit(dict(same[-1], phase="sweep", reused_from_tune=True))
        continue
      cfg.optimizer.learning_rate = lr
      vtask = LMTask(cfg, mc)
      if lc is not None:
        cfg.lora.update(dict(enabled=True, r=lc["r"], lora_alpha=2.0 * lc["r"]))
        aff = (esft_affinity(a.out, seed, mc, base, data)
               if any(pt.get("esft_k") for pt in lc.get("parts") or [lc]) else None)
        trainable, frozen = adapter_partition(base, cfg.lora, lc, seed, aff)
        vtask.combine = lora.combine
        if lc.get("train_also"):
          trainable, frozen = train_also(trainable, frozen, lc["train_also"])
          vtask.combine = combine_also
      else:
        trainable, frozen = base, {}
      ratio = a.b_lr_ratio if lc is not None else 1.0
      vdata = generic_data(cfg, a.sfx) if name == GENERIC else data
      state, secs, losses = train(cfg, vtask, trainable, frozen, vdata, seed, (name, lr), ratio,
                                  lr_ratios=(lc or {}).get("lr_ratios"))
      if name not in _EVALS:  # one compile per adapter structure, not per seed / lr
        _EVALS[name] = jax.jit(functools.partial(eval_step, task=vtask))
      ev = _EVALS[name]
      after = {"dev": mean_nll(ev, state, data.dev), "test": mean_nll(ev, state, data.test)}
      n_train = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
      row = {"phase": a.phase, "run": name, "seed": seed, "lr": lr, "steps": cfg.steps,
             "dev_before": before["dev"], "dev_after": after["dev"],
             "test_before": before["test"], "test_after": after["test"],
             "improvement": before["test"] - after["test"],
             "dev_improvement": before["dev"] - after["dev"],
             "trainable": n_train, "base_params": n_base, "trainable_frac": n_train / n_base,
             "opt_state_bytes": lora.tree_bytes(state.opt_state), "train_seconds": secs,
             "train_losses": losses}
      if lc is not None:
        row["lora"] = dict(lc, lora_alpha=2.0 * lc["r"], b_lr_ratio=ratio)
        if aff is not None:  # the chosen experts and the share of routed slots they serve
          for pt in lc.get("parts") or [lc]:
            if pt.get("esft_k"):
              sub = esft.top_experts(aff, pt["esft_k"])
              row["esft_subset"] = [list(x) for x in sub]
              row["esft_share"] = [float(aff[i, list(x)].sum()) for i, x in enumerate(sub)]
        full = vtask.combine(state.params, state.frozen)
      if lc is not None and lc.get("init") != "pissa":  # a PiSSA adapter cannot be saved alone
        adir = os.path.join(a.out, "adapters", f"{name.replace(' ', '_')}_s{seed}")
        row["adapter_file_bytes"] = lora.save_adapter(adir, full, cfg.lora.adapter_name)[
            "adapter_model.safetensors"]
      emit(row)
  if os.path.exists(rows_path):
    print(table([json.loads(l) for l in open(rows_path) if l.strip()]))
  return 0


def table(rows: list[dict]) -> str:
  """Markdown summaries: the LR grid (dev) and the sweep (test, mean ± std over seeds)."""
  out = []
  tune = [r for r in rows if r.get("phase") == "tune"]
  if tune:
    best_full = {}
    for r in tune:
      if r["run"] == "full":
        best_full[r["steps"]] = max(best_full.get(r["steps"], -1e9), r["dev_improvement"])
    out += ["| run | lr | steps | trainable | dev before | dev after | dev improvement | "
            "% of best full FT (same steps) |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['run']} | {r['lr']:g} | {r['steps']} | {100 * r['trainable_frac']:.2f}% | "
            f"{r['dev_before']:.4f} | {r['dev_after']:.4f} | {r['dev_improvement']:.4f} | "
            + (f"{100 * r['dev_improvement'] / best_full[r['steps']]:.0f}% |"
               if r["steps"] in best_full else "— |") for r in tune]
  sweep = [r for r in rows if r.get("phase") == "sweep"]
  full = {r["seed"]: r["improvement"] for r in sweep if r["run"] == "full"}
  if sweep and full:
    seeds = sorted(full)
    by: dict[str, dict[int, dict]] = {}
    for r in sweep:
      by.setdefault(r["run"], {})[r["seed"]] = r
    out += ["", "| run | lr | trainable (% of model) | test before → after | improvement | "
            "% of full FT, per seed " + "/".join(f"s{s}" for s in seeds) + " | mean ± std | "
            "Adam state | adapter file |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in by.items():
      rr = [rs[s] for s in seeds if s in rs]
      imp = np.array([r["improvement"] for r in rr])
      frac = np.array([100 * r["improvement"] / full[r["seed"]] for r in rr])
      r0 = rr[0]
      out.append(
          f"| {name} | {r0['lr']:g} | {r0['trainable']:,} ({100 * r0['trainable_frac']:.2f}%) | "
          f"{np.mean([r['test_before'] for r in rr]):.3f} → "
          f"{np.mean([r['test_after'] for r in rr]):.3f} | {imp.mean():.4f} ± {imp.std():.4f} | "
          + "/".join(f"{x:.0f}" for x in frac) + f" | {frac.mean():.0f}% ± {frac.std():.0f} | "
          f"{r0['opt_state_bytes'] / 1e3:,.0f} kB | "
          + (f"{r0['adapter_file_bytes'] / 1e3:,.0f} kB |" if "adapter_file_bytes" in r0
             else "— |"))
  return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
  """Two panels: % of full FT's test improvement vs rank (main target), and per target at r=8;
  every seed as a dot, the mean as a bar / line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sweep = [r for r in rows if r.get("phase") == "sweep"]
  full = {r["seed"]: r["improvement"] for r in sweep if r["run"] == "full"}
  pct = lambda rs: [100 * r["improvement"] / full[r["seed"]] for r in rs]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
  ranks = sorted({int(r["run"].split()[1][2:]) for r in sweep
                  if r["run"].endswith(MAIN_TARGET)})
  means = []
  for k in ranks:
    rs = [r for r in sweep if r["run"] == f"lora r={k} {MAIN_TARGET}"]
    means.append(np.mean(pct(rs)))
    a1.scatter([k] * len(rs), pct(rs), color="C0", s=12)
    a1.annotate(f"{100 * rs[0]['trainable_frac']:.2g}%", (k, means[-1]), fontsize=7,
                xytext=(4, -10), textcoords="offset points")
  a1.plot(ranks, means, color="C0", label=f"LoRA on {MAIN_TARGET}, lr of r=8 (mean; label: % "
          "trainable)")
  own = [r for r in sweep if r["run"].endswith("(own lr)")]
  for k in sorted({int(r["run"].split()[1][2:]) for r in own}):
    rs = [r for r in own if r["run"].startswith(f"lora r={k} ")]
    a1.scatter([k] * len(rs), pct(rs), color="C2", s=12, marker="s")
    a1.scatter([k], [np.mean(pct(rs))], color="C2", marker="_", s=200,
               label=f"r={k} at its own dev-tuned lr {rs[0]['lr']:g}")
  a1.axhline(100, color="k", lw=0.8, label="full fine-tuning")
  a1.axhline(90, color="r", lw=0.8, ls="--", label="target 90%")
  a1.set(xscale="log", xlabel="rank r", ylabel="% of full FT's test-loss improvement")
  a1.set_xticks(ranks, [str(k) for k in ranks])
  a1.legend(fontsize=6, loc="lower left")
  names = [f"lora r=8 {t}" for t in TARGETS if any(r["run"] == f"lora r=8 {t}" for r in sweep)]
  for i, n in enumerate(names):
    rs = [r for r in sweep if r["run"] == n]
    a2.bar(i, np.mean(pct(rs)), color="C2" if rs[0]["trainable_frac"] <= 0.01 else "C1",
           label="≤ 1% trainable" if rs[0]["trainable_frac"] <= 0.01 else "> 1% trainable")
    a2.scatter([i] * len(rs), pct(rs), color="k", s=10, zorder=3)
  a2.axhline(100, color="k", lw=0.8)
  a2.axhline(90, color="r", lw=0.8, ls="--")
  a2.set_xticks(range(len(names)), [
      SHORT.get(n.split(maxsplit=2)[-1], n.split()[-1]) + "\n"
      + f"{100 * next(r['trainable_frac'] for r in sweep if r['run'] == n):.2g}%"
      for n in names], fontsize=7)
  a2.set(ylabel="% of full FT (r = 8)")
  h, l = a2.get_legend_handles_labels()
  a2.legend([h[l.index(x)] for x in dict.fromkeys(l)], list(dict.fromkeys(l)), fontsize=6,
            loc="upper left")
  pre = sorted({r["steps"] for r in rows if r.get("phase") == "pretrain"})
  fig.suptitle(f"LoRA vs full fine-tuning on held-out pydoc topics, seeds {sorted(full)}"
               + (f", bases pre-trained {'/'.join(map(str, pre))} steps" if pre else ""),
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  sys.exit(main())
