"""ds_jax.analysis against the real parameter arrays, XLA's own FLOP count, optax's AdamW state,
the MLA cache size of the DeepSeek-V2 paper, and the quantization overheads of REFERENCES.md."""

import json
import math
import os

import jax
import jax.numpy as jnp
import optax
import pytest

from ds_jax import analysis
from ds_jax.config import ModelConfig
from ds_jax.models import lm

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MLA = dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6, num_key_value_heads=4)
BENCH = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench_dsv2_tiny.py")
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)

CASES = {
    "dense_gqa": dict(),
    "dense_tied_bias": dict(tie_word_embeddings=True, attention_bias=True, head_dim=12),
    "mla_dense": dict(MLA),
    "mla_qlora_bias": dict(MLA, q_lora_rank=12, attention_bias=True),
    "moe_greedy_shared": dict(MLA, **MOE, n_shared_experts=2, first_k_dense_replace=1),
    "moe_noaux_bias": dict(MLA, **MOE, n_shared_experts=1, first_k_dense_replace=1,
                           topk_method="noaux_tc", scoring_func="sigmoid", n_group=4,
                           topk_group=2, norm_topk_prob=True),
    "moe_mixtral_freq2": dict(MOE, topk_method="mixtral", moe_layer_freq=2,
                              num_hidden_layers=4),
    "moe_unscanned": dict(MOE, scan_layers=False, first_k_dense_replace=1),
    "moe_mtp": dict(MLA, **MOE, n_shared_experts=1, first_k_dense_replace=1,
                    num_nextn_predict_layers=2),
}


def _mc(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw})


def _bucket(path: str) -> str:
  if path.startswith("mtp"):
    return "mtp"
  if "shared_experts" in path:
    return "shared_experts"
  if "experts" in path:
    return "routed_experts"
  if "mlp/gate/" in path:
    return "router"
  if "self_attn" in path:  # MLA's latent norms included, as in the table
    return "attention"
  if "embed_tokens" in path:
    return "embedding"
  if "lm_head" in path:
    return "head"
  if "mlp/" in path:
    return "dense_mlp"
  return "other"


@pytest.mark.parametrize("name", sorted(CASES))
def test_counts_equal_the_real_arrays(name):
  """Total and every group (attention, experts, router, ...) equal jax.eval_shape of lm.init."""
  mc = _mc(**CASES[name])
  tree = analysis.abstract_params(mc)
  counts = analysis.count_params(mc)
  assert analysis.tree_size(tree) == counts["total_with_mtp"]
  assert counts["total_with_mtp"] == counts["total"] + counts["mtp"]
  got: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    got[_bucket(key)] = got.get(_bucket(key), 0) + math.prod(leaf.shape)
  for group in ("attention", "routed_experts", "shared_experts", "router", "embedding", "head",
                "dense_mlp", "mtp"):
    assert got.get(group, 0) == counts[group], (group, got)


def test_active_params_count_k_of_n_experts():
  mc = _mc(**CASES["moe_greedy_shared"])
  c = analysis.count_params(mc)
  n_moe = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
  per_expert = 3 * mc.hidden_size * mc.moe_intermediate_size
  unused = n_moe * (mc.n_routed_experts - mc.num_experts_per_tok) * per_expert
  assert c["active_with_embedding"] == c["total"] - unused
  assert c["active"] == c["active_with_embedding"] - c["embedding"]
  dense = analysis.count_params(_mc())
  assert dense["active"] == dense["total"] - dense["embedding"]


def _xla_forward_flops(mc: ModelConfig, seq_len: int) -> float:
  """XLA's FLOP count of the lowered forward (unscanned: XLA counts a loop body once)."""
  params = analysis.abstract_params(mc)
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  cost = jax.jit(lambda p, t: lm.apply(mc, p, t)).lower(params, tokens).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / seq_len


@pytest.mark.parametrize("name", ["dense_gqa", "mla_qlora_bias"])
def test_forward_flops_match_xla_cost_analysis(name):
  """Matmul + attention FLOPs equal XLA's count of the forward up to elementwise ops."""
  mc = _mc(**{**CASES[name], "hidden_size": 64, "intermediate_size": 192, "vocab_size": 512,
              "scan_layers": False})
  seq = 64
  ours = analysis.flops_per_token(mc, seq)["forward"]
  xla = _xla_forward_flops(mc, seq)
  # XLA also counts softmax, norms, RoPE, SiLU (a few % here); it never counts fewer matmuls.
  assert ours <= xla <= 1.08 * ours, (ours, xla)


def test_flop_invariants():
  mc = _mc(**CASES["moe_greedy_shared"])
  f = analysis.flops_per_token(mc, 128)
  c = analysis.count_params(mc)
  vectors = sum(t.active_size for t in analysis.param_table(mc) if t.kind == "vector")
  assert f["matmul"] == pytest.approx(2 * (c["active"] - vectors))
  assert f["train"] == pytest.approx(3 * f["forward"])
  h, dqk, dv = mc.num_attention_heads, 12, 6
  extra = analysis.flops_per_token(mc, 256)["forward"] - f["forward"]
  assert extra == pytest.approx(2 * 128 * h * (dqk + dv) * mc.num_hidden_layers)
  causal = analysis.flops_per_token(mc, 128, causal=True)
  assert causal["attention"] == pytest.approx(f["attention"] / 2)
  # More experts at the same top-k cost only the larger router.
  more = mc.replace(n_routed_experts=16)
  n_moe = sum(mc.is_moe_layer(i) for i in range(mc.num_hidden_layers))
  grow = analysis.flops_per_token(more, 128)["forward"] - f["forward"]
  assert grow == pytest.approx(2 * mc.hidden_size * 8 * n_moe)


def test_mtp_adds_training_flops_not_total():
  mc = _mc(**CASES["moe_noaux_bias"], num_nextn_predict_layers=1)
  c = analysis.count_params(mc)
  base = analysis.count_params(mc.replace(num_nextn_predict_layers=0))
  assert c["total"] == base["total"] and c["mtp"] > 0
  d = mc.hidden_size
  assert c["total_with_mtp"] - c["total"] == c["mtp"]
  # One MTP module = eh_proj [2D, D] + 3 norms + one MoE block (= the last layer's size).
  fewer = mc.replace(num_nextn_predict_layers=0, num_hidden_layers=mc.num_hidden_layers - 1)
  per_block = base["total"] - analysis.count_params(fewer)["total"]
  assert c["mtp"] == 2 * d * d + 3 * d + per_block
  f = analysis.flops_per_token(mc, 64)
  assert f["train"] > 3 * f["forward"] and f["mtp_forward"] > 0


def test_train_state_matches_optax_adamw():
  mc = _mc(**CASES["moe_greedy_shared"])
  params = analysis.abstract_params(mc)
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt_elems = sum(math.prod(x.shape) for x in jax.tree.leaves(opt) if x.ndim > 0)
  st = analysis.train_state_bytes(mc)
  assert st["adam_mu_nu"] == 4 * opt_elems
  assert st["total"] == 16 * analysis.tree_size(params)


def test_kv_cache_mla_vs_gqa():
  v2 = ModelConfig(attention_type="mla", kv_lora_rank=512, qk_rope_head_dim=64,
                   qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=128,
                   num_key_value_heads=128, hidden_size=5120, num_hidden_layers=60)
  kv = analysis.kv_cache_per_token(v2)
  assert kv["values"] == 576 * 60  # REFERENCES: kv_lora_rank + qk_rope_head_dim per layer
  assert kv["values"] == 4.5 * 128 * 60  # DeepSeek-V2 paper: (d_c + d_h^R) l = 4.5 d_h l
  assert kv["bytes"] == 2 * kv["values"]
  gqa = analysis.kv_cache_per_token(_mc(), dtype="float32")
  assert gqa["values"] == 2 * 2 * 8 * 3 and gqa["bytes"] == 4 * gqa["values"]


def test_quantized_weight_bytes():
  """int4 group 128, bf16 scales = 4.125 bits per kernel weight (REFERENCES)."""
  mc = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
  table = analysis.param_table(mc)
  kernels = sum(t.size for t in table if t.kind == "matmul")
  other = sum(t.size for t in table if t.kind != "matmul")
  assert analysis.weight_bytes(mc, "int4", 128) == kernels * 4.125 / 8 + 2 * other
  assert analysis.weight_bytes(mc, "int4", 32) == kernels * 4.5 / 8 + 2 * other
  # Per-channel int8: one scale per output column of each kernel.
  cols = sum(t.size // t.shape[0] for t in table if t.kind == "matmul")
  assert analysis.weight_bytes(mc, "int8", 0) == kernels + 2 * cols + 2 * other
  assert analysis.weight_bytes(mc, "float32") == 2 * analysis.weight_bytes(mc, "bfloat16")
  with pytest.raises(ValueError):
    analysis.weight_bytes(mc, "fp8")


def test_activation_estimate_orders():
  mc = _mc(**CASES["moe_greedy_shared"])
  a = analysis.activation_bytes_per_token(mc, 128)
  assert a["full_remat"] < a["no_remat"]
  assert analysis.activation_bytes_per_token(mc, 256)["no_remat"] > a["no_remat"]
  bf16 = analysis.activation_bytes_per_token(mc.replace(dtype="bfloat16"), 128)
  assert bf16["no_remat"] < a["no_remat"]


def test_cli_prints_and_overrides(capsys):
  assert analysis.cli(["--config", BENCH]) == 0
  out = capsys.readouterr().out
  assert "6,420,992" in out and "KV cache/token" in out
  assert analysis.cli(["--config", BENCH, "--json", "--seq_len", "64",
                       "--config.model.num_hidden_layers=2"]) == 0
  d = json.loads(capsys.readouterr().out)
  assert d["params"]["total"] < 6_420_992
  assert d["flops"]["forward"] > 0
  with pytest.raises(SystemExit):
    analysis.cli(["--config", BENCH, "--bogus"])


def test_seed_table_script(tmp_path):
  """The comparison script runs, rewrites only its marked block, and counts Falcon exactly."""
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "scripts", "seed_table.py")
  spec = importlib.util.spec_from_file_location("seed_table", path)
  st = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(st)
  doc = tmp_path / "doc.md"
  doc.write_text(f"intro\n{st.START}\nSTALE-BLOCK\n{st.END}\noutro\n")
  assert st.main(["--write", str(doc)]) == 0
  text = doc.read_text()
  assert text.startswith("intro\n") and text.endswith("outro\n") and "STALE-BLOCK" not in text
  assert "| DeepSeek-V2 | 235.7B | 20.9B |" in text
  st.main(["--write", str(doc)])
  assert doc.read_text() == text  # idempotent
  falcon = ModelConfig(vocab_size=65024, hidden_size=14848, num_hidden_layers=80,
                       num_attention_heads=232, num_key_value_heads=8, head_dim=64)
  assert st.falcon_exact_params(falcon) == 178_557_088_768
