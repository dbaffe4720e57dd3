"""KV-cache generation against full recomputation, batching, sampling, retracing, cache size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax import generate as g
from ds_jax import kv_cache
from ds_jax.analysis import kv_cache_per_token
from ds_jax.config import ModelConfig
from ds_jax.models import lm

DENSE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
MLA_MOE = dict(DENSE, num_hidden_layers=3, attention_type="mla", kv_lora_rank=16,
               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
               num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
               first_k_dense_replace=1)
PROMPTS = [[1, 5, 9, 2, 7, 3, 11], [1, 4], [1, 8, 8, 6]]


def model(seed: int = 0, **kw):
  """A tiny model with weights scaled up so its greedy choices are far from ties."""
  mc = ModelConfig(**kw)
  params = lm.init(mc, jax.random.key(seed))
  return mc, jax.tree.map(lambda a: a * 4 if a.ndim >= 2 else a, params)


def reference_argmax(mc, params, prompts, tokens):
  """Argmax of one full (uncached) forward over prompt + generated tokens at every generated
  step: causal attention makes position j's logits a full recomputation of step j."""
  seqs = [list(p) + list(t) for p, t in zip(prompts, tokens)]
  width = max(map(len, seqs))
  batch = np.zeros((len(seqs), width), np.int32)  # right padding never reaches earlier positions
  for b, s in enumerate(seqs):
    batch[b, :len(s)] = s
  logits = np.asarray(lm.apply(mc, params, jnp.asarray(batch)))
  return [[int(np.argmax(logits[b, len(p) - 1 + i])) for i in range(len(t))]
          for b, (p, t) in enumerate(zip(prompts, tokens))]


@pytest.mark.parametrize("kind", ["dense_gqa", "dense_gqa_unscanned_tied", "mla_moe"])
def test_greedy_equals_full_recomputation(kind):
  kw = {"dense_gqa": DENSE, "mla_moe": MLA_MOE,
        "dense_gqa_unscanned_tied": dict(DENSE, scan_layers=False, tie_word_embeddings=True)}[kind]
  mc, params = model(**kw)
  out = g.generate(mc, params, PROMPTS, 6, bucket=4)
  assert out.tokens.shape == (3, 6) and list(out.lengths) == [6, 6, 6]
  assert out.tokens.tolist() == reference_argmax(mc, params, PROMPTS, out.tokens.tolist())


@pytest.mark.parametrize("kind", ["dense_gqa", pytest.param("mla_moe", marks=pytest.mark.slow)])
def test_batch_of_different_lengths_equals_each_alone(kind):
  mc, params = model(**{"dense_gqa": DENSE, "mla_moe": MLA_MOE}[kind])
  prompts = PROMPTS[:2]  # lengths 7 and 2: five padding slots in the batch, none alone
  batch = g.generate(mc, params, prompts, 6, bucket=4)
  for b, p in enumerate(prompts):
    alone = g.generate(mc, params, [p], 6, bucket=1)
    np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])


def test_prefill_logits_and_cache_positions():
  mc, params = model(**DENSE)
  tokens, lengths = g.pad_prompts(PROMPTS, pad_id=0, bucket=4)
  logits, cache = g.prefill(mc, params, jnp.asarray(tokens), jnp.asarray(lengths), cache_len=14)
  ref = reference_argmax(mc, params, PROMPTS, [[0]] * 3)
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), np.asarray(ref)[:, 0])
  pos = np.asarray(cache.positions)
  assert pos.shape == (3, 14)
  assert pos[1, :8].tolist() == [kv_cache.EMPTY] * 6 + [0, 1]  # left padding never attended
  assert (pos[:, 8:] == kv_cache.EMPTY).all()  # decode slots not yet written


def test_top_k_one_equals_greedy_and_seed_reproducible():
  mc, params = model(**DENSE)
  greedy = g.generate(mc, params, PROMPTS, 6, bucket=4)
  topk1 = g.generate(mc, params, PROMPTS, 6, temperature=1.5, top_k=1, seed=3, bucket=4)
  np.testing.assert_array_equal(greedy.tokens, topk1.tokens)
  a = g.generate(mc, params, PROMPTS, 6, temperature=1.0, seed=7, bucket=4)
  b = g.generate(mc, params, PROMPTS, 6, temperature=1.0, seed=7, bucket=4)
  c = g.generate(mc, params, PROMPTS, 6, temperature=1.0, seed=8, bucket=4)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)


def test_stop_tokens_end_rows_independently():
  mc, params = model(**DENSE)
  free = g.generate(mc, params, PROMPTS, 6, bucket=4)
  stop = int(free.tokens[0, 2])
  out = g.generate(mc, params, PROMPTS, 6, stop_ids=[stop], pad_id=63, bucket=4)
  for b in range(3):
    row = free.tokens[b].tolist()
    n = row.index(stop) if stop in row else 6
    assert out.lengths[b] == n
    assert out.tokens[b, :n + 1].tolist() == row[:n + 1]
    assert (out.tokens[b, n + 1:] == 63).all()
  assert out.sequences()[0] == free.tokens[0, :2].tolist()


def test_decode_does_not_retrace():
  mc, params = model(**DENSE)
  g.generate(mc, params, PROMPTS, 6, bucket=4)
  before = dict(g.TRACES)
  g.generate(mc, params, [[1, 2, 3], [1], [1, 9, 9, 9, 9]], 6, temperature=0.8, top_k=5,
             top_p=0.9, stop_ids=[3, 4], seed=11, bucket=4)
  g.generate(mc, params, [[2] * 8, [1], [1, 3]], 6, temperature=0.0, seed=1, bucket=4)
  assert g.TRACES == before


def test_sample_logits_distribution():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0]])
  keys = jax.random.split(jax.random.key(0), 4000)

  def draw(t, k, p):
    f = jax.vmap(lambda r: g.sample_logits(logits, r, jnp.float32(t), jnp.int32(k),
                                           jnp.float32(p))[0])
    return np.bincount(np.asarray(f(keys)), minlength=5) / len(keys)

  probs = np.asarray(jax.nn.softmax(logits[0] / 2.0))
  np.testing.assert_allclose(draw(2.0, 0, 1.0), probs, atol=0.03)  # temperature
  top2 = draw(1.0, 2, 1.0)
  assert top2[2:].sum() == 0
  np.testing.assert_allclose(top2[0], 1 / (1 + np.exp(-1.0)), atol=0.03)
  p = np.asarray(jax.nn.softmax(logits[0]))  # 0.61, 0.22, 0.14, ...: top-p 0.7 keeps two
  nucleus = draw(1.0, 0, 0.7)
  assert nucleus[2:].sum() == 0
  np.testing.assert_allclose(nucleus[0], p[0] / p[:2].sum(), atol=0.03)
  assert draw(0.0, 0, 1.0)[0] == 1.0  # greedy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_bytes_per_token_match_analysis(dtype):
  gqa = ModelConfig(**dict(DENSE, dtype=dtype))
  mla = ModelConfig(**dict(MLA_MOE, dtype=dtype))
  measured = {}
  for name, mc in (("gqa", gqa), ("mla", mla)):
    cache = jax.eval_shape(lambda mc=mc: kv_cache.init_cache(mc, 2, 16))
    measured[name] = kv_cache.cache_bytes_per_token(mc, cache)
    assert measured[name] == kv_cache_per_token(mc, dtype)["bytes"]
  itemsize = jnp.dtype(dtype).itemsize
  assert measured["mla"] == (16 + 4) * 3 * itemsize  # (kv_lora_rank + rope) x layers
  assert measured["gqa"] == 2 * 2 * 8 * 2 * itemsize  # K and V x kv heads x head dim x layers


@pytest.mark.slow  # another MLA + MoE compile
def test_lora_kernels_decode_through_the_absorbed_mla_cache():
  """kv_b_proj is used transposed by the absorbed attention: an adapter on it must still work."""
  from ds_jax import lora
  mc, params = model(**MLA_MOE)
  p = lora.add_adapter(params, "a", lora.LoRAAdapter(["q_proj", "kv_b_proj"], r=4,
                                                     init="pissa"), jax.random.key(1))
  out = g.generate(mc, p, PROMPTS, 6, bucket=4)
  assert out.tokens.tolist() == reference_argmax(mc, p, PROMPTS, out.tokens.tolist())


@pytest.mark.slow  # imports torch + transformers and runs their generate
@pytest.mark.parametrize("case", ["llama", "v2_greedy_yarn_tied"])
def test_greedy_tokens_equal_transformers_generate(case, tmp_path):
  import torch
  from ds_jax.inference import load
  from tests.convert.hf_models import save_case
  hf_model = save_case(case, str(tmp_path / "hf"))
  model = load(str(tmp_path / "hf"))
  prompts = [[5, 17, 3, 88, 41, 2, 9], [60, 1]]
  ours = g.generate(model.mc, model.params, prompts, 8, bucket=4)
  for b, p in enumerate(prompts):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    assert out[0, len(p):].tolist() == ours.tokens[b].tolist()
