"""MLA against slow NumPy references (ds_jax layout and HF's interleaved layout), causality,
the absorbed latent-cache path, and the YaRN softmax scale."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.config import ModelConfig, RopeScaling
from ds_jax.nn.mla import (MLAttention, hf_kv_a_columns, hf_q_columns, hf_rope_permutation,
                           softmax_scale)

YARN = RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                   beta_slow=1.0, mscale=0.9, mscale_all_dim=0.7)


def tiny_cfg(q_lora_rank=0, bias=False, rope_scaling=YARN, dtype="float32"):
  return ModelConfig(attention_type="mla", hidden_size=32, num_attention_heads=4,
                     q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=6, attention_bias=bias,
                     rope_scaling=rope_scaling, dtype=dtype)


def random_params(cfg, seed=0):
  """Initialise, then replace every parameter (norm scales and biases too) by random values."""
  b, l = 2, 7
  x = jnp.zeros((b, l, cfg.hidden_size))
  pos = jnp.zeros((b, l), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(MLAttention(cfg).init, jax.random.key(0), x, pos)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray((1.0 if len(s.shape) == 1 else 0.0) +
                                            0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def inputs(cfg, b=2, l=7, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, l, cfg.hidden_size)).astype(np.float32)
  pos = (np.arange(l)[None] + rng.integers(0, 300, size=(b, 1))).astype(np.int32)
  return x, pos


# ------------------------------------------------------------------------------------------------
# Slow NumPy reference, written from the DeepSeek-V2 paper's equations (one head at a time).


def np_yarn_inv_freq(dim, theta, s):
  """YaRN frequencies, transcribed loop by loop from the published formula."""
  out = []
  def corr_dim(rot):
    return dim * math.log(s.original_max_position_embeddings / (rot * 2 * math.pi)) / (
        2 * math.log(theta))
  low = max(math.floor(corr_dim(s.beta_fast)), 0)
  high = min(math.ceil(corr_dim(s.beta_slow)), dim - 1)
  for i in range(dim // 2):
    base = theta ** (-2 * i / dim)
    if s.type != "yarn":
      out.append(base)
      continue
    ramp = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
    out.append(base / s.factor * ramp + base * (1 - ramp))
  return np.array(out)


def np_mscale(scale, m):
  return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def np_rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rotate(x, pos, inv, att, interleaved):
  """Rotate vector x [R] at position pos; pairs (i, i+R/2) or, interleaved, (2i, 2i+1)."""
  r = x.shape[-1]
  out = np.empty_like(x)
  for i in range(r // 2):
    a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + r // 2)
    c, s = math.cos(pos * inv[i]) * att, math.sin(pos * inv[i]) * att
    out[a] = x[a] * c - x[b] * s
    out[b] = x[b] * c + x[a] * s
  return out


def np_mla(p, cfg, x, pos, interleaved=False):
  """Naive decompressed MLA. `p` holds 2-D [in, out] matrices named as HF's modules."""
  h, n, r, v, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                   cfg.v_head_dim, cfg.kv_lora_rank)
  s = cfg.rope_scaling
  inv = np_yarn_inv_freq(r, cfg.rope_theta, s)
  att = (np_mscale(s.factor, s.mscale) / np_mscale(s.factor, s.mscale_all_dim)
         if s.type == "yarn" else 1.0)
  scale = (n + r) ** -0.5 * (np_mscale(s.factor, s.mscale_all_dim) ** 2 if s.type == "yarn"
                             else 1.0)
  bsz, l, _ = x.shape
  y = np.zeros((bsz, l, cfg.hidden_size))
  for b in range(bsz):
    if cfg.q_lora_rank:
      q = np_rms(x[b] @ p["q_a"] + p["q_a_bias"], p["q_a_norm"]) @ p["q_b"]
    else:
      q = x[b] @ p["q"]
    q = q.reshape(l, h, n + r)
    kv = x[b] @ p["kv_a"] + p["kv_a_bias"]
    lat = np_rms(kv[:, :c], p["kv_a_norm"])
    kpe = np.stack([np_rotate(kv[t, c:], pos[b, t], inv, att, interleaved) for t in range(l)])
    kvb = (lat @ p["kv_b"]).reshape(l, h, n + v)
    heads = []
    for hh in range(h):
      qpe = np.stack([np_rotate(q[t, hh, n:], pos[b, t], inv, att, interleaved)
                      for t in range(l)])
      k = np.concatenate([kvb[:, hh, :n], kpe], -1)
      qq = np.concatenate([q[:, hh, :n], qpe], -1)
      logits = qq @ k.T * scale
      logits = np.where(pos[b][None, :] <= pos[b][:, None], logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      heads.append(w @ kvb[:, hh, n:])
    y[b] = np.concatenate(heads, -1) @ p["o"] + p["o_bias"]
  return y


def ds_to_np(params, cfg):
  """Flatten ds_jax MLA params into the reference's 2-D matrices (same column order)."""
  g = lambda name, k="kernel": np.asarray(params[name][k], np.float64)
  zeros = lambda n: np.zeros(n)
  p = {"kv_a": g("kv_a_proj_with_mqa"), "kv_a_norm": g("kv_a_layernorm", "scale"),
       "kv_b": g("kv_b_proj").reshape(cfg.kv_lora_rank, -1), "o": g("o_proj")}
  p["kv_a_bias"] = (g("kv_a_proj_with_mqa", "bias") if cfg.attention_bias
                    else zeros(p["kv_a"].shape[1]))
  p["o_bias"] = g("o_proj", "bias") if cfg.attention_bias else zeros(cfg.hidden_size)
  if cfg.q_lora_rank:
    p["q_a"], p["q_a_norm"] = g("q_a_proj"), g("q_a_layernorm", "scale")
    p["q_a_bias"] = g("q_a_proj", "bias") if cfg.attention_bias else zeros(cfg.q_lora_rank)
    p["q_b"] = g("q_b_proj").reshape(cfg.q_lora_rank, -1)
  else:
    p["q"] = g("q_proj").reshape(cfg.hidden_size, -1)
  return p


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank,bias", [(0, False), (16, True)])
def test_matches_naive_numpy_reference(q_lora_rank, bias):
  cfg = tiny_cfg(q_lora_rank, bias)
  params = random_params(cfg)
  x, pos = inputs(cfg)
  y = jax.jit(MLAttention(cfg).apply)({"params": params}, x, pos)
  ref = np_mla(ds_to_np(params, cfg), cfg, x.astype(np.float64), pos)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-4)


def test_parameter_names_and_shapes_follow_hf():
  cfg = tiny_cfg(q_lora_rank=16, bias=True)
  shapes = jax.tree.map(np.shape, random_params(cfg))
  assert shapes == {
      "q_a_proj": {"kernel": (32, 16), "bias": (16,)}, "q_a_layernorm": {"scale": (16,)},
      "q_b_proj": {"kernel": (16, 4, 16)},
      "kv_a_proj_with_mqa": {"kernel": (32, 20), "bias": (20,)},
      "kv_a_layernorm": {"scale": (12,)}, "kv_b_proj": {"kernel": (12, 4, 14)},
      "o_proj": {"kernel": (24, 32), "bias": (32,)}}


def test_causal_via_gradients():
  cfg = tiny_cfg(q_lora_rank=16)
  params = random_params(cfg)
  x, _ = inputs(cfg, b=1, l=6)
  pos = jnp.arange(6)[None]
  f = lambda xx: MLAttention(cfg).apply({"params": params}, xx, pos)[0].sum(-1)
  jac_LxL = np.abs(np.asarray(jax.jit(jax.jacrev(f))(jnp.asarray(x))[:, 0])).sum(-1)
  for t in range(6):  # output t depends on inputs 0..t only
    assert np.all(jac_LxL[t, t + 1:] == 0), t
    assert np.all(jac_LxL[t, :t + 1] > 0), t


def test_softmax_scale_matches_deepseek_v2_formula():
  # DeepSeek-V2 config.json: factor 40, mscale = mscale_all_dim = 0.707, nope 128 + rope 64.
  s = RopeScaling(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                  mscale=0.707, mscale_all_dim=0.707)
  cfg = ModelConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=s)
  m = 0.1 * 0.707 * math.log(40.0) + 1.0
  assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
  assert softmax_scale(cfg.replace(rope_scaling=RopeScaling())) == pytest.approx(192 ** -0.5)


# ------------------------------------------------------------------------------------------------
# HF checkpoint layout: interleaved rope columns, permuted once by the converter.


def hf_layout_params(cfg, seed=3):
  """Random weights as an HF checkpoint holds them (2-D [in, out], interleaved rope columns)."""
  rng = np.random.default_rng(seed)
  h, n, r, v, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                   cfg.v_head_dim, cfg.kv_lora_rank)
  d = cfg.hidden_size
  w = lambda *s: 0.3 * rng.normal(size=s)
  p = {"kv_a": w(d, c + r), "kv_a_bias": w(c + r), "kv_a_norm": 1 + w(c),
       "kv_b": w(c, h * (n + v)), "o": w(h * v, d), "o_bias": w(d)}
  if cfg.q_lora_rank:
    p.update(q_a=w(d, cfg.q_lora_rank), q_a_bias=w(cfg.q_lora_rank),
             q_a_norm=1 + w(cfg.q_lora_rank), q_b=w(cfg.q_lora_rank, h * (n + r)))
  else:
    p["q"] = w(d, h * (n + r))
  return p


def convert_hf(p, cfg):
  """What the checkpoint converter does: permute rope columns, reshape per head."""
  h, n, r, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                cfg.v_head_dim)
  qcols, kvcols = hf_q_columns(cfg), hf_kv_a_columns(cfg)
  out = {"kv_a_proj_with_mqa": {"kernel": p["kv_a"][:, kvcols], "bias": p["kv_a_bias"][kvcols]},
         "kv_a_layernorm": {"scale": p["kv_a_norm"]},
         "kv_b_proj": {"kernel": p["kv_b"].reshape(-1, h, n + v)},
         "o_proj": {"kernel": p["o"], "bias": p["o_bias"]}}
  if cfg.q_lora_rank:
    out["q_a_proj"] = {"kernel": p["q_a"], "bias": p["q_a_bias"]}
    out["q_a_layernorm"] = {"scale": p["q_a_norm"]}
    out["q_b_proj"] = {"kernel": p["q_b"][:, qcols].reshape(-1, h, n + r)}
  else:
    out["q_proj"] = {"kernel": p["q"][:, qcols].reshape(-1, h, n + r)}
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def test_hf_rope_permutation_values():
  np.testing.assert_array_equal(hf_rope_permutation(6), [0, 2, 4, 1, 3, 5])
  cfg = tiny_cfg().replace(num_attention_heads=2, qk_nope_head_dim=1, qk_rope_head_dim=4)
  np.testing.assert_array_equal(hf_q_columns(cfg), [0, 1, 3, 2, 4, 5, 6, 8, 7, 9])
  np.testing.assert_array_equal(hf_kv_a_columns(cfg)[-4:], 12 + np.array([0, 2, 1, 3]))


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_hf_interleaved_layout_parity(q_lora_rank):
  cfg = tiny_cfg(q_lora_rank, bias=True)
  p = hf_layout_params(cfg)
  x, pos = inputs(cfg, seed=5)
  ref = np_mla(p, cfg, x.astype(np.float64), pos, interleaved=True)
  y = jax.jit(MLAttention(cfg).apply)({"params": convert_hf(p, cfg)}, x, pos)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-4)
  # Without the permutation the layouts disagree: the test can fail.
  unpermuted = np_mla(p, cfg, x.astype(np.float64), pos, interleaved=False)
  assert np.abs(unpermuted - ref).max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Generation path: latent cache + absorbed attention.


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_absorbed_attention_over_cache_equals_naive(q_lora_rank):
  cfg = tiny_cfg(q_lora_rank)
  params = {"params": random_params(cfg)}
  attn = MLAttention(cfg)
  x, pos = inputs(cfg, b=2, l=7)
  naive = jax.jit(attn.apply)(params, x, pos)
  ckv, kpe = jax.jit(functools.partial(attn.apply, method="compress_kv"))(params, x, pos)
  assert ckv.shape == (2, 7, cfg.kv_lora_rank) and kpe.shape == (2, 7, cfg.qk_rope_head_dim)
  absorbed = jax.jit(functools.partial(attn.apply, method="attend_compressed"))
  full = absorbed(params, x, pos, ckv, kpe, pos)
  np.testing.assert_allclose(np.asarray(full), np.asarray(naive), rtol=1e-4, atol=1e-5)

  # Decoding: a 10-slot cache holding the 7 tokens' entries (the last 2 just written; the other 3
  # slots garbage at position 0, so only the validity mask hides them). The last 2 tokens attend
  # over it and equal the naive output at their positions.
  slots = 10
  cache_c = jnp.asarray(np.random.default_rng(0).normal(size=(2, slots, cfg.kv_lora_rank)))
  cache_p = jnp.asarray(np.random.default_rng(1).normal(size=(2, slots, cfg.qk_rope_head_dim)))
  cache_c, cache_p = cache_c.at[:, :7].set(ckv), cache_p.at[:, :7].set(kpe)
  kpos = jnp.concatenate([jnp.asarray(pos), jnp.zeros((2, slots - 7), jnp.int32)], axis=1)
  valid = jnp.arange(slots)[None].repeat(2, 0) < 7
  step = absorbed(params, x[:, 5:], pos[:, 5:], cache_c, cache_p, kpos, valid)
  np.testing.assert_allclose(np.asarray(step), np.asarray(naive[:, 5:]), rtol=1e-4, atol=1e-5)



# ------------------------------------------------------------------------------------------------
# transformers' PyTorch DeepseekV2Attention (complex rotation of interleaved pairs) and
# DeepseekV3Attention (rope_interleave=True), weights converted with the permutation helpers.


@pytest.mark.slow  # importing torch + transformers costs ~10 s here
@pytest.mark.parametrize("family,q_lora_rank", [("v2", 0), ("v3", 16), ("v3", 0)])
def test_transformers_parity(family, q_lora_rank):
  torch = pytest.importorskip("torch")
  import transformers
  cfg = tiny_cfg(q_lora_rank, bias=True)
  s = cfg.rope_scaling
  kw = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads, q_lora_rank=q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
            attention_bias=True, num_hidden_layers=1, vocab_size=16,
            max_position_embeddings=s.original_max_position_embeddings * int(s.factor),
            rope_scaling={"type": "yarn", "rope_theta": cfg.rope_theta, "factor": s.factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings,
                          "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                          "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim})
  if family == "v2":
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m
    hcfg = transformers.DeepseekV2Config(**kw)
    attn_cls, rope_cls = m.DeepseekV2Attention, m.DeepseekV2RotaryEmbedding
  else:
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    hcfg = transformers.DeepseekV3Config(rope_interleave=True, **kw)
    attn_cls, rope_cls = m.DeepseekV3Attention, m.DeepseekV3RotaryEmbedding
  hcfg._attn_implementation = "eager"
  torch.manual_seed(0)
  attn = attn_cls(hcfg, layer_idx=0).double().eval()
  with torch.no_grad():
    for prm in attn.parameters():
      prm.copy_(torch.randn_like(prm) * 0.3 + (1.0 if prm.ndim == 1 else 0.0))
  x, pos = inputs(cfg, seed=9)
  xt, post = torch.tensor(x, dtype=torch.float64), torch.tensor(pos, dtype=torch.long)
  mask = torch.where(post[:, None, None, :] <= post[:, None, :, None], 0.0, float("-inf"))
  with torch.no_grad():
    pe = rope_cls(hcfg)(xt, post)
    ref = attn(xt, position_embeddings=pe, attention_mask=mask.double())[0].numpy()
  w = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
  p = {"kv_a": w["kv_a_proj_with_mqa.weight"].T, "kv_a_bias": w["kv_a_proj_with_mqa.bias"],
       "kv_a_norm": w["kv_a_layernorm.weight"], "kv_b": w["kv_b_proj.weight"].T,
       "o": w["o_proj.weight"].T, "o_bias": w["o_proj.bias"]}
  if q_lora_rank:
    p.update(q_a=w["q_a_proj.weight"].T, q_a_bias=w["q_a_proj.bias"],
             q_a_norm=w["q_a_layernorm.weight"], q_b=w["q_b_proj.weight"].T)
  else:
    p["q"] = w["q_proj.weight"].T
  y = jax.jit(MLAttention(cfg).apply)({"params": convert_hf(p, cfg)}, x, pos)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-4, atol=2e-4)


def test_sharded_over_mesh_equals_single_device():
  """Heads on "tensor", embed on "fsdp", batch on data*fsdp: same output as one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from ds_jax.sharding import make_mesh, param_shardings
  cfg = tiny_cfg(q_lora_rank=16)
  params = random_params(cfg)
  x, pos = inputs(cfg, b=4, l=5)
  want = jax.jit(MLAttention(cfg).apply)({"params": params}, x, pos)
  mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 1, "tensor": 2})
  boxed = jax.eval_shape(MLAttention(cfg).init, jax.random.key(0), x, pos)["params"]
  shardings = param_shardings(boxed, mesh)
  assert shardings["q_b_proj"]["kernel"].spec == P(None, "tensor", None)
  assert shardings["kv_b_proj"]["kernel"].spec == P(None, "tensor", None)
  assert shardings["o_proj"]["kernel"].spec == P("tensor", "fsdp")
  sharded = jax.device_put(params, shardings)
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    got = jax.jit(MLAttention(cfg).apply)({"params": sharded}, xs, pos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
