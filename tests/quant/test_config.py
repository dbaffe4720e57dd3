"""Rule matching over parameter paths, stacked-axis inference, config section parsing."""

import numpy as np
import pytest

from ds_jax import quant
from ds_jax.quant.config import QuantRule, parse_rules, stacked_axes

MOE_PATHS = {
    "embed_tokens/embedding": None,
    "lm_head/kernel": None,
    "norm/scale": None,
    "layers_0/block/input_layernorm/scale": None,
    "layers_0/block/self_attn/q_proj/kernel": 1,
    "layers_0/block/self_attn/kv_a_layernorm/scale": None,
    "layers_0/block/mlp/gate_proj/kernel": 1,  # dense SwiGLU gate: quantized
    "layers_1/block/mlp/gate/kernel": None,  # MoE router: float
    "layers_1/block/mlp/experts/gate_proj": 2,
    "layers_1/block/mlp/experts/down_proj": 2,
    "layers_1/block/mlp/shared_experts/up_proj/kernel": 1,
    "layer_3/mlp/experts/up_proj": 1,  # unscanned layer: only the expert axis is stacked
    "layer_3/self_attn/o_proj/kernel": 0,
    "layer_3/self_attn/o_proj/bias": None,
}


def test_default_rules_keep_router_norms_embeddings_float():
  qcfg = quant.quant_config(bits=4, group_size=128)
  for path, stacked in MOE_PATHS.items():
    rule = qcfg.rule_for(path)
    if stacked is None:
      assert rule is None, path
    else:
      assert rule is not None and rule.bits == 4 and rule.group_size == 128, path
      assert stacked_axes(path, rule) == stacked, path


def test_first_match_wins_and_bits_zero_keeps_float():
  extra = parse_rules("self_attn/.*kernel:bits=8,group_size=0,symmetric=false;"
                      "down_proj:bits=0")
  qcfg = quant.QuantConfig(extra + quant.quant_config(4, 64).rules)
  r = qcfg.rule_for("layers_0/block/self_attn/q_proj/kernel")
  assert (r.bits, r.group_size, r.symmetric) == (8, 0, False)
  assert qcfg.rule_for("layers_1/block/mlp/experts/down_proj") is None
  assert qcfg.rule_for("layers_1/block/mlp/experts/up_proj").group_size == 64


def test_quantized_paths_on_a_tree():
  tree = {"a": {"kernel": np.zeros((4, 4))}, "norm": {"scale": np.zeros(4)},
          "gate": {"kernel": np.zeros((4, 2))}}
  assert list(quant.quantized_paths(tree, quant.quant_config())) == ["a/kernel"]


def test_from_config_section():
  c = quant.default_quant_config()
  assert quant.from_config(c) is None  # disabled by default
  c.enabled, c.bits, c.group_size, c.act_bits, c.start_step = True, 8, 32, 8, 100
  c.rules = "q_proj:bits=4,calibration=mse"
  q = quant.from_config(c)
  assert q.start_step == 100 and not q.active(99) and q.active(100)
  assert q.rule_for("x/q_proj/kernel").calibration == "mse"
  r = q.rule_for("x/k_proj/kernel")
  assert (r.bits, r.group_size, r.act_bits) == (8, 32, 8)
  assert q.rule_for("embed_tokens/embedding") is None
  assert quant.QuantConfig.from_json(q.to_json()) == q


@pytest.mark.parametrize("kw", [dict(bits=3), dict(act_bits=2), dict(calibration="gptq"),
                                dict(calibration="lsq", symmetric=False), dict(group_size=-1)])
def test_bad_rules_raise(kw):
  with pytest.raises(ValueError):
    QuantRule("kernel$", **kw)


def test_bad_rule_string_raises():
  with pytest.raises(ValueError, match="unknown option"):
    parse_rules("kernel:bitz=4")
  with pytest.raises(ValueError):
    quant.QuantConfig((), scale_dtype="float16")
