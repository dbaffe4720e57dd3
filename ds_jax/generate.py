"""KV-cache generation: prefill, a jit-compiled decode loop, sampling, and `ds-jax generate`.

    out = generate(mc, params, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.7, top_p=0.9)
    out.tokens  # [B, max_new_tokens] int32, pad_id after a stop token
    out.lengths # [B] generated tokens before the stop token (or max_new_tokens)

Prompts of different lengths are left-padded to a common length P (rounded up to `bucket`, so
nearby lengths share one compiled program): every row's last prompt token sits in slot P - 1 and
decode step i writes slot P + i for all rows. Padding slots are recorded with position EMPTY in the
cache, so they are never attended; real tokens keep positions 0..len-1 as if decoded alone.

Two jitted programs, each traced once per (config, batch, P, max_new_tokens): `prefill` (one pass
over the prompt, returns the last logits and the cache) and `decode` (a `lax.while_loop` that
samples, writes, and runs one cached step per token until every row stopped). Sampling settings
(temperature, top-k, top-p, stop ids, seed) are traced values: changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.config import ModelConfig
from ds_jax.kv_cache import EMPTY, KVCache, forward, init_cache

MAX_STOP_IDS = 8
TRACES = {"prefill": 0, "decode": 0}  # incremented while tracing: tests assert no retracing


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Next tokens [B]: argmax when temperature <= 0, else a sample from softmax(logits / T)
  restricted to the top_k largest (top_k <= 0: all) and then to the smallest set whose
  probability reaches top_p (nucleus; top_p >= 1: all)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  v = logits_BxV.shape[-1]
  greedy_B = jnp.argmax(logits_BxV, axis=-1)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  desc_BxV = -jnp.sort(-scaled, axis=-1)
  k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
  kth_Bx1 = jax.lax.dynamic_slice_in_dim(desc_BxV, k - 1, 1, axis=-1)
  desc_BxV = jnp.where(desc_BxV < kth_Bx1, -jnp.inf, desc_BxV)
  probs = jax.nn.softmax(desc_BxV, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the first token is always kept
  n_keep_B = jnp.maximum(jnp.sum(keep, axis=-1), 1)
  cut_Bx1 = jnp.take_along_axis(desc_BxV, n_keep_B[:, None] - 1, axis=-1)
  scaled = jnp.where(scaled < jnp.maximum(cut_Bx1, kth_Bx1), -jnp.inf, scaled)
  sampled_B = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature <= 0, greedy_B, sampled_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("mc", "cache_len"))
def prefill(mc: ModelConfig, params: Any, tokens_BxP: jax.Array, lengths_B: jax.Array,
            cache_len: int) -> tuple[jax.Array, KVCache]:
  """Left-padded prompts [B, P] (row b's tokens in the last lengths[b] columns) -> logits of the
  next token [B, V] and a cache of `cache_len` slots holding the prompt in slots [0, P)."""
  TRACES["prefill"] += 1
  b, p = tokens_BxP.shape
  pos_BxP = jnp.arange(p)[None, :] - (p - lengths_B)[:, None]
  valid = pos_BxP >= 0
  pos_BxP = jnp.maximum(pos_BxP, 0)
  cache = init_cache(mc, b, cache_len)
  logits, cache = forward(mc, params, tokens_BxP, pos_BxP, cache, jnp.int32(0),
                          slot_pos_BxT=jnp.where(valid, pos_BxP, EMPTY), last_only=True)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("mc", "max_new"))
def decode(mc: ModelConfig, params: Any, logits_BxV: jax.Array, cache: KVCache,
           lengths_B: jax.Array, start: jax.Array, rng: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, stop_ids: jax.Array, pad_id: jax.Array,
           max_new: int) -> tuple[jax.Array, jax.Array]:
  """Sample up to `max_new` tokens per row; stops early when every row produced a stop id.

  `start` is the first free cache slot (P after prefill). Returns (tokens [B, max_new] with
  pad_id after a row's stop, number of tokens before the stop [B])."""
  TRACES["decode"] += 1
  b = logits_BxV.shape[0]

  def is_stop(tok_B):
    return jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1)

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_new - 1) & ~jnp.all(done)

  def body(state):  # feed token i, sample token i + 1 (no forward after the last token)
    i, out, done, tok, cache = state
    logits, cache = forward(mc, params, tok[:, None], (lengths_B + i)[:, None], cache, start + i)
    tok = sample_logits(logits[:, 0], jax.random.fold_in(rng, i + 1), temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    out = jax.lax.dynamic_update_index_in_dim(out, tok, i + 1, axis=1)
    return i + 1, out, done | is_stop(tok), tok, cache

  tok = sample_logits(logits_BxV, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
  out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  state = (jnp.int32(0), out, is_stop(tok), tok, cache)
  _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
  stops_BxN = jnp.any(out[:, :, None] == stop_ids[None, None, :], axis=-1)
  n = jnp.where(jnp.any(stops_BxN, axis=1), jnp.argmax(stops_BxN, axis=1), max_new)
  return out, n.astype(jnp.int32)


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray  # [B, max_new_tokens]
  lengths: np.ndarray  # [B] tokens before the stop token

  def sequences(self) -> list[list[int]]:
    return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = 16
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad to a length rounded up to a multiple of `bucket`: ([B, P] int32, lengths [B])."""
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  p = int(-(-lengths.max() // bucket) * bucket)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  for b, ids in enumerate(prompts):
    tokens[b, p - len(ids):] = ids
  return tokens, lengths


def stop_array(stop_ids: Sequence[int]) -> jax.Array:
  ids = list(stop_ids)[:MAX_STOP_IDS]
  return jnp.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), jnp.int32)


def generate(mc: ModelConfig, params: Any, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0, pad_id: int = 0,
             bucket: int = 16) -> GenerateOutput:
  """Decode a batch of token-id prompts (any lengths) with the KV cache."""
  tokens, lengths = pad_prompts(prompts, pad_id, bucket)
  p = tokens.shape[1]
  logits, cache = prefill(mc, params, jnp.asarray(tokens), jnp.asarray(lengths),
                          cache_len=p + max_new_tokens)
  out, n = decode(mc, params, logits, cache, jnp.asarray(lengths), jnp.int32(p),
                  jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
                  jnp.float32(top_p), stop_array(stop_ids), jnp.int32(pad_id),
                  max_new=max_new_tokens)
  return GenerateOutput(np.asarray(out), np.asarray(n))


def generate_text(mc: ModelConfig, params: Any, tokenizer: Any, prompt: str, max_tokens: int,
                  temperature: float = 0.7, seed: int = 0, top_k: int = 0,
                  top_p: float = 1.0) -> str:
  """The continuation of `prompt` (BOS + its tokens, as training documents start), until EOS."""
  ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
  out = generate(mc, params, [ids], max_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, stop_ids=[tokenizer.eos_id], seed=seed, pad_id=tokenizer.pad_id)
  return tokenizer.decode(out.sequences()[0])


def cli(argv: Sequence[str]) -> int:
  """`ds-jax generate --workdir W --prompt "..." [--max-tokens N] [--temperature T] ...`"""
  import argparse
  import sys
  from ds_jax.cli import UsageError

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise UsageError(message)

  p = Parser(prog="ds-jax generate")
  p.add_argument("--workdir", required=True, help="a ds_jax workdir or a Hugging Face directory")
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--max-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quant", choices=("int4",), default=None)
  p.add_argument("--adapter", default=None)
  args = p.parse_args(list(argv))
  if args.max_tokens < 1:
    raise UsageError(f"--max-tokens must be >= 1; got {args.max_tokens}")
  if args.temperature < 0:
    raise UsageError(f"--temperature must be >= 0; got {args.temperature}")
  from ds_jax.inference import load
  model = load(args.workdir, quant=args.quant, adapter=args.adapter)
  texts = model.infer_batch(args.prompt, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)
  for prompt, text in zip(args.prompt, texts):
    if len(args.prompt) > 1:
      print(f"--- {prompt!r}")
    sys.stdout.write(prompt + text + "\n")
  return 0
