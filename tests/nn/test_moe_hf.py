"""Parity with the transformers (PyTorch) MoE blocks of DeepSeek-V2, DeepSeek-V3 and Mixtral.

Slow tier: importing torch + transformers alone takes ~10-30 s on this machine.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ds_jax.config import ModelConfig  # noqa: E402
from ds_jax.nn.moe import MoE  # noqa: E402

D, F, E, K = 16, 8, 8, 2
SMALL = dict(hidden_size=D, num_attention_heads=2, num_key_value_heads=2)


def _to_ours(sd, shared: bool):
  """HF state dict (torch, [out, in] linears, fused gate_up [E, 2F, D]) -> ds_jax params."""
  t = {k: v.detach().numpy().astype(np.float32) for k, v in sd.items()}
  gu = t["experts.gate_up_proj"]
  p = {"gate": {"kernel": t["gate.weight"].T},
       "experts": {"gate_proj": gu[:, :F].transpose(0, 2, 1), "up_proj": gu[:, F:].transpose(0, 2, 1),
                   "down_proj": t["experts.down_proj"].transpose(0, 2, 1)}}
  if "gate.e_score_correction_bias" in t:
    p["gate"]["e_score_correction_bias"] = t["gate.e_score_correction_bias"]
  if shared:
    p["shared_experts"] = {n: {"kernel": t[f"shared_experts.{n}.weight"].T}
                           for n in ("gate_proj", "up_proj", "down_proj")}
  return jax.tree.map(jnp.asarray, p)


def _randomise(module, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, v in list(module.named_parameters()) + list(module.named_buffers()):
      v.copy_(torch.randn(v.shape, generator=g) * (0.1 if "bias" in name else 0.5))


def _check(hf_module, cfg, shared, seed=0):
  _randomise(hf_module, seed)
  x = np.random.default_rng(seed).normal(size=(2, 5, D)).astype(np.float32)
  with torch.no_grad():
    want = hf_module.eval()(torch.from_numpy(x))
  want = (want[0] if isinstance(want, tuple) else want).numpy()
  params = _to_ours(hf_module.state_dict(), shared)
  got, _ = jax.jit(MoE(cfg).apply)({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_deepseek_v3_noaux_tc():
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
  hf = transformers.DeepseekV3Config(moe_intermediate_size=F, n_routed_experts=E,
                                     num_experts_per_tok=K, n_shared_experts=1, n_group=4,
                                     topk_group=2, norm_topk_prob=True,
                                     routed_scaling_factor=2.5, **SMALL)
  cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                    moe_intermediate_size=F, n_shared_experts=1, n_group=4, topk_group=2,
                    topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                    routed_scaling_factor=2.5)
  _check(DeepseekV3MoE(hf), cfg, True)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2(method):
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
  hf = transformers.DeepseekV2Config(moe_intermediate_size=F, n_routed_experts=E,
                                     num_experts_per_tok=K, n_shared_experts=2, n_group=4,
                                     topk_group=2, topk_method=method,
                                     routed_scaling_factor=16.0, **SMALL)
  cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                    moe_intermediate_size=F, n_shared_experts=2, n_group=4, topk_group=2,
                    topk_method=method, routed_scaling_factor=16.0)
  _check(DeepseekV2Moe(hf), cfg, True, seed=1)


def test_mixtral():
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  hf = transformers.MixtralConfig(intermediate_size=F, num_local_experts=E,
                                  num_experts_per_tok=K, **SMALL)
  cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                    moe_intermediate_size=F, topk_method="mixtral")
  _check(MixtralSparseMoeBlock(hf), cfg, False, seed=2)
