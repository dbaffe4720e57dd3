"""The tensor map between Hugging Face checkpoints and ds_jax parameters.

`param_entries(cfg, interleaved)` lists one `Entry` per HF tensor: its HF name, the ds_jax leaf
it fills (path + leading index: the stacked layer of a scanned segment, the expert), and how the
values move. HF stores linear weights [out, in]; ds_jax kernels are [in, *out] (e.g. q_proj
[D, H, K]), so a weight is transposed and reshaped. DeepSeek checkpoints store the MLA rope
columns interleaved; ds_jax rotates half-split, so those output columns are permuted once
(`ds_jax.nn.mla.hf_q_columns` / `hf_kv_a_columns`). Both directions use the same entries, so
ds_jax -> HF -> ds_jax is exact by construction.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ds_jax.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str                 # HF tensor name
  path: Path              # ds_jax leaf, e.g. ("layers_1", "block", "mlp", "experts", "up_proj")
  index: tuple[int, ...]  # leading indices into that leaf (stacked layer, expert)
  kind: str               # "linear" (transpose + reshape), "vec" (flatten), "same"
  fields: str             # the config.json fields that set the shape, for error messages
  cols: Optional[np.ndarray] = None  # ds_jax output column j reads HF output row cols[j]


def hf_shape(e: Entry, ds_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape implied by the ds_jax slice shape."""
  if e.kind == "linear":
    return (int(np.prod(ds_shape[1:])), ds_shape[0])
  if e.kind == "vec":
    return (int(np.prod(ds_shape)),)
  return tuple(ds_shape)


def fill_ds(e: Entry, w: np.ndarray, dest: np.ndarray) -> None:
  """Write HF tensor `w` into the ds_jax slice `dest` (a contiguous view), converting to its
  dtype in the same pass: no transposed copy of the tensor is made."""
  if e.cols is not None:
    w = w[e.cols]
  if e.kind == "linear":
    w = w.T
  np.copyto(dest.reshape(w.shape), w, casting="unsafe")


def to_hf(e: Entry, x: np.ndarray) -> np.ndarray:
  """ds_jax slice -> HF tensor (same dtype as x; a fresh array)."""
  if e.kind == "linear":
    w = x.reshape(x.shape[0], -1).T
  elif e.kind == "vec":
    w = x.reshape(-1)
  else:
    w = x
  if e.cols is not None:
    out = np.empty_like(w)
    out[e.cols] = w
    return out
  return np.ascontiguousarray(w)


def _attention(c: ModelConfig, hf: str, ds: Path, idx: tuple, interleaved: bool) -> list[Entry]:
  a, p = hf + "self_attn.", ds + ("self_attn",)
  out: list[Entry] = []

  def add(name, kind, fields, cols=None, bias=False, ds_name=None):
    ds_name = ds_name or name
    out.append(Entry(f"{a}{name}.weight", p + (ds_name, "kernel" if kind == "linear" else
                                               "scale"), idx, kind, fields, cols))
    if bias:
      out.append(Entry(f"{a}{name}.bias", p + (ds_name, "bias"), idx, "vec", fields, cols))

  if c.attention_type == "gqa":
    b = c.attention_bias
    heads = "hidden_size, num_attention_heads, head_dim"
    kv = "hidden_size, num_key_value_heads, head_dim"
    add("q_proj", "linear", heads, bias=b)
    add("k_proj", "linear", kv, bias=b)
    add("v_proj", "linear", kv, bias=b)
    add("o_proj", "linear", heads)
    return out
  from ds_jax.nn.mla import hf_kv_a_columns, hf_q_columns
  qcols = hf_q_columns(c) if interleaved else None
  qf = "num_attention_heads, qk_nope_head_dim, qk_rope_head_dim"
  b = c.attention_bias
  if c.q_lora_rank:
    add("q_a_proj", "linear", "hidden_size, q_lora_rank", bias=b)
    add("q_a_layernorm", "same", "q_lora_rank")
    add("q_b_proj", "linear", "q_lora_rank, " + qf, cols=qcols)
  else:
    add("q_proj", "linear", "hidden_size, " + qf, cols=qcols)
  add("kv_a_proj_with_mqa", "linear", "hidden_size, kv_lora_rank, qk_rope_head_dim",
      cols=hf_kv_a_columns(c) if interleaved else None, bias=b)
  add("kv_a_layernorm", "same", "kv_lora_rank")
  add("kv_b_proj", "linear", "kv_lora_rank, num_attention_heads, qk_nope_head_dim, v_head_dim")
  add("o_proj", "linear", "num_attention_heads, v_head_dim, hidden_size", bias=b)
  return out


def _moe(c: ModelConfig, hf: str, ds: Path, idx: tuple) -> list[Entry]:
  mixtral = c.topk_method == "mixtral"
  m = hf + ("block_sparse_moe." if mixtral else "mlp.")
  p = ds + ("mlp",)
  out = [Entry(m + "gate.weight", p + ("gate", "kernel"), idx, "linear",
               "hidden_size, n_routed_experts")]
  if c.topk_method == "noaux_tc":
    out.append(Entry(m + "gate.e_score_correction_bias", p + ("gate", "e_score_correction_bias"),
                     idx, "same", "n_routed_experts"))
  names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
  ffn = "intermediate_size" if mixtral else "moe_intermediate_size"
  for e in range(c.n_routed_experts):
    for n, d in zip(names, ("gate_proj", "up_proj", "down_proj")):
      out.append(Entry(f"{m}experts.{e}.{n}.weight", p + ("experts", d), idx + (e,), "linear",
                       f"hidden_size, {ffn}, n_routed_experts"))
  if c.n_shared_experts:
    for n in ("gate_proj", "up_proj", "down_proj"):
      out.append(Entry(f"{m}shared_experts.{n}.weight", p + ("shared_experts", n, "kernel"),
                       idx, "linear", "hidden_size, moe_intermediate_size, n_shared_experts"))
  return out


def block_entries(c: ModelConfig, hf: str, ds: Path, idx: tuple, moe: bool,
                  interleaved: bool) -> list[Entry]:
  """One decoder layer: HF prefix `model.layers.N.`, ds_jax prefix (..., "block")."""
  out = _attention(c, hf, ds, idx, interleaved)
  for n in ("input_layernorm", "post_attention_layernorm"):
    out.append(Entry(f"{hf}{n}.weight", ds + (n, "scale"), idx, "same", "hidden_size"))
  if moe:
    out += _moe(c, hf, ds, idx)
  else:
    out += [Entry(f"{hf}mlp.{n}.weight", ds + ("mlp", n, "kernel"), idx, "linear",
                  "hidden_size, intermediate_size")
            for n in ("gate_proj", "up_proj", "down_proj")]
  return out


def param_entries(c: ModelConfig, interleaved: bool = False) -> list[Entry]:
  """Every HF tensor of a model, in HF layer order (embeddings, layers, MTP layers, norm, head)."""
  from ds_jax.models.lm import layer_location
  out = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), "same",
               "vocab_size, hidden_size")]
  for i in range(c.num_hidden_layers):
    name, pos = layer_location(c, i)
    idx = () if pos is None else (pos,)
    out += block_entries(c, f"model.layers.{i}.", (name, "block"), idx, c.is_moe_layer(i),
                         interleaved)
  for j in range(c.num_nextn_predict_layers):
    out += mtp_entries(c, j, interleaved)
  out.append(Entry("model.norm.weight", ("norm", "scale"), (), "same", "hidden_size"))
  if not c.tie_word_embeddings:
    out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (), "linear",
                     "vocab_size, hidden_size"))
  return out


def mtp_entries(c: ModelConfig, j: int, interleaved: bool) -> list[Entry]:
  """DeepSeek-V3 multi-token prediction depth j: HF `model.layers.{num_hidden_layers + j}`."""
  i = c.num_hidden_layers + j
  hf, ds = f"model.layers.{i}.", (f"mtp_{j}",)
  out = [Entry(hf + "enorm.weight", ds + ("enorm", "scale"), (), "same", "hidden_size"),
         Entry(hf + "hnorm.weight", ds + ("hnorm", "scale"), (), "same", "hidden_size"),
         Entry(hf + "eh_proj.weight", ds + ("eh_proj", "kernel"), (), "linear", "hidden_size"),
         Entry(hf + "shared_head.norm.weight", ds + ("shared_head_norm", "scale"), (), "same",
               "hidden_size")]
  return out + block_entries(c, hf, ds + ("block",), (), c.is_moe_layer(i), interleaved)


def mtp_shared_copies(c: ModelConfig) -> list[tuple[str, str]]:
  """(HF name, HF source name) of the MTP layers' copies of the embedding and output head,
  which DeepSeek-V3 checkpoints store per MTP layer and ds_jax shares."""
  head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
  out = []
  for j in range(c.num_nextn_predict_layers):
    p = f"model.layers.{c.num_hidden_layers + j}."
    out += [(p + "embed_tokens.weight", "model.embed_tokens.weight"),
            (p + "shared_head.head.weight", head)]
  return out


def fused_alternatives(name: str) -> list[tuple[str, tuple]]:
  """Other layouts of a per-expert tensor: transformers 5.x in-memory names (fused experts
  `mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj` [E, D, F]). Returns
  [(name, (expert, half))], half 0/1 for the gate/up halves of gate_up_proj, None for whole."""
  parts = name.split(".")
  if "experts" not in parts:
    return []
  k = parts.index("experts")
  if k + 2 >= len(parts) or not parts[k + 1].isdigit():
    return []
  e, which = int(parts[k + 1]), parts[k + 2]
  base = ".".join(parts[:k]).replace("block_sparse_moe", "mlp") + ".experts."
  if which in ("gate_proj", "w1"):
    return [(base + "gate_up_proj", (e, 0))]
  if which in ("up_proj", "w3"):
    return [(base + "gate_up_proj", (e, 1))]
  if which in ("down_proj", "w2"):
    return [(base + "down_proj", (e, None))]
  return []
