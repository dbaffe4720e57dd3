"""Hugging Face checkpoints in and out: `load_pretrained(dir)` and `save_pretrained(cfg, params, dir)`.

A model directory is `config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json` (and optionally `tokenizer.json`). Conversion streams: reading fills
one preallocated float32 buffer per ds_jax parameter from tensors read one at a time (plain file
reads at the header's offsets, no mmap, so nothing stays resident); writing transposes one tensor
at a time into the current output shard. Peak memory is about the output plus one parameter
(loading) or the parameters plus one shard (saving). The tensor map is `ds_jax.convert.hf_params`,
the config map `ds_jax.convert.hf_config`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import jax
import ml_dtypes
import numpy as np

from ds_jax.config import ConfigDict, ModelConfig, model_config
from ds_jax.convert import hf_params as hp
from ds_jax.convert.hf_config import (ConvertError, MissingTensorError, ShapeMismatchError,
                                      UnsupportedModelError, from_hf_config, rope_interleaved,
                                      to_hf_config)

__all__ = ["load_pretrained", "save_pretrained", "load_tokenizer", "read_hf_config",
           "ConvertError", "MissingTensorError", "ShapeMismatchError", "UnsupportedModelError"]

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


# ----------------------------------------------------------------------------------------------
# safetensors files, read tensor by tensor.


class Checkpoint:
  """The tensors of a model directory: name -> (file, dtype, shape, byte offset)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
      files = ["model.safetensors"]
    else:
      raise ConvertError(f"{path}: no model.safetensors or model.safetensors.index.json")
    self.tensors: dict[str, tuple[str, str, tuple, int]] = {}
    for name in files:
      file = os.path.join(path, name)
      with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
      header.pop("__metadata__", None)
      for key, info in header.items():
        self.tensors[key] = (file, info["dtype"], tuple(info["shape"]),
                             8 + n + info["data_offsets"][0])

  def __contains__(self, name: str) -> bool:
    return self.resolve(name) is not None

  def resolve(self, name: str) -> Optional[tuple[str, Any]]:
    """(stored name, slice or None) for `name` or an equivalent fused / renamed layout."""
    if name in self.tensors:
      return name, None
    renamed = name.replace(".block_sparse_moe.", ".mlp.")
    if renamed in self.tensors:
      return renamed, None
    for alt, (e, half) in hp.fused_alternatives(name):
      if alt in self.tensors:
        return alt, (e, half)
    return None

  def shape(self, name: str) -> tuple[int, ...]:
    stored, sl = self.resolve(name)
    shape = self.tensors[stored][2]
    if sl is None:
      return shape
    e, half = sl
    if half is None:
      return shape[1:]
    return (shape[1] // 2,) + shape[2:]

  def read(self, name: str) -> np.ndarray:
    """One tensor (a fresh array in its stored dtype); raises MissingTensorError."""
    found = self.resolve(name)
    if found is None:
      raise MissingTensorError(f"tensor {name!r} is missing from {self.path}")
    stored, sl = found
    file, dt, shape, offset = self.tensors[stored]
    if dt not in _DTYPES:
      raise UnsupportedModelError(f"tensor {stored!r} has dtype {dt}; ds_jax reads "
                                  f"{', '.join(_DTYPES)} (dequantize FP8 checkpoints first)")
    dtype = np.dtype(_DTYPES[dt])
    count = int(np.prod(shape))
    if sl is not None:  # read only the expert's slab of a fused tensor
      e, half = sl
      slab = count // shape[0]
      offset += e * slab * dtype.itemsize
      count, shape = slab, shape[1:]
    with open(file, "rb") as f:
      f.seek(offset)
      w = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
    if sl is not None and sl[1] is not None:
      f2 = shape[0] // 2
      w = w[:f2] if sl[1] == 0 else w[f2:]
    return w


class ShardWriter:
  """Writes tensors into safetensors shards of at most `max_bytes`, then the index."""

  def __init__(self, path: str, max_bytes: int):
    self.path, self.max_bytes = path, max_bytes
    self.pending: list[tuple[str, np.ndarray]] = []
    self.pending_bytes = 0
    self.files: list[list[str]] = []
    self.total = 0

  def add(self, name: str, w: np.ndarray) -> None:
    if self.pending and self.pending_bytes + w.nbytes > self.max_bytes:
      self.flush()
    self.pending.append((name, w))
    self.pending_bytes += w.nbytes
    self.total += w.nbytes

  def flush(self) -> None:
    if not self.pending:
      return
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    start = 0
    for name, w in self.pending:
      header[name] = {"dtype": _NAMES[w.dtype], "shape": list(w.shape),
                      "data_offsets": [start, start + w.nbytes]}
      start += w.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(self.path, f"shard-{len(self.files)}.tmp"), "wb") as f:
      f.write(struct.pack("<Q", len(raw)))
      f.write(raw)
      for _, w in self.pending:
        f.write(np.ascontiguousarray(w).tobytes())
    self.files.append([n for n, _ in self.pending])
    self.pending, self.pending_bytes = [], 0

  def close(self) -> list[str]:
    self.flush()
    n = len(self.files)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    weight_map = {}
    for i, (fname, tensors) in enumerate(zip(names, self.files)):
      os.replace(os.path.join(self.path, f"shard-{i}.tmp"), os.path.join(self.path, fname))
      weight_map.update({t: fname for t in tensors})
    if n > 1:
      with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f,
                  indent=2)
    return names


# ----------------------------------------------------------------------------------------------
# Loading.


def read_hf_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise ConvertError(f"{path}: no config.json")
  with open(file) as f:
    return json.load(f)


def model_section(path: str, scan_layers: bool = True, ckpt: Optional[Checkpoint] = None
                  ) -> tuple[ConfigDict, dict]:
  """(ds_jax `config.model` section, raw HF config) of a model directory. MTP layers that
  config.json announces but the checkpoint lacks (transformers does not save them) are dropped."""
  hf = read_hf_config(path)
  m = from_hf_config(hf)
  m.scan_layers = scan_layers
  if m.num_nextn_predict_layers:
    ckpt = ckpt or Checkpoint(path)
    first = f"model.layers.{m.num_hidden_layers}.eh_proj.weight"
    if first not in ckpt:
      m.num_nextn_predict_layers = 0
  return m, hf


def _leaves(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  if isinstance(tree, Mapping):
    for k in tree:
      yield from _leaves(tree[k], prefix + (k,))
  else:
    yield prefix, tree


def _set(tree: dict, path: tuple, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _check_coverage(entries: list[hp.Entry], shapes: dict[tuple, tuple]) -> None:
  paths = {e.path for e in entries}
  missing = sorted(set(shapes) - paths)
  extra = sorted(paths - set(shapes))
  if missing or extra:  # a model change the converter does not know about
    raise ConvertError(f"converter and model disagree: ds_jax leaves without a tensor "
                       f"{['/'.join(p) for p in missing[:3]]}, map entries without a leaf "
                       f"{['/'.join(p) for p in extra[:3]]}")


def abstract_params(mc: ModelConfig) -> dict[tuple, tuple]:
  """{leaf path: shape} of ds_jax's parameters, without allocating them."""
  from ds_jax.models import lm
  tree = jax.eval_shape(lambda: lm.init(mc, jax.random.key(0)))
  return {p: tuple(x.shape) for p, x in _leaves(tree)}


def load_pretrained(path: str, scan_layers: bool = True, as_numpy: bool = False
                    ) -> tuple[ModelConfig, dict]:
  """(ModelConfig, float32 params) of a Hugging Face model directory.

  `lm.apply(config, params, tokens)` then gives HF's logits; `experiment_config(config)` the full
  experiment ConfigDict. Raises a `ConvertError` (a ValueError, one line) for an unsupported
  model_type or config value, a missing tensor (named) or a shape disagreeing with config.json.
  """
  ckpt = Checkpoint(path)
  m, hf = model_section(path, scan_layers, ckpt)
  mc = model_config(m)
  shapes = abstract_params(mc)
  entries = hp.param_entries(mc, rope_interleaved(hf))
  _check_coverage(entries, shapes)
  by_path: dict[tuple, list[hp.Entry]] = {}
  for e in entries:
    by_path.setdefault(e.path, []).append(e)
  params: dict = {}
  for p, shape in shapes.items():
    buf = np.empty(shape, np.float32)
    for e in by_path[p]:
      want = hp.hf_shape(e, shape[len(e.index):])
      if e.hf not in ckpt:
        raise MissingTensorError(f"tensor {e.hf!r} is missing from {path} (needed by "
                                 f"config.json {e.fields})")
      got = ckpt.shape(e.hf)
      if tuple(got) != tuple(want):
        raise ShapeMismatchError(f"tensor {e.hf!r} has shape {list(got)} but config.json "
                                 f"({e.fields}) implies {list(want)}")
      hp.fill_ds(e, ckpt.read(e.hf), buf[e.index])
    _set(params, p, buf if as_numpy else jax.device_put(buf))
    del buf
  return mc, params


def load_tokenizer(path: str):
  """The directory's `tokenizer.json` as a `ds_jax.data.tokenizer.HFTokenizer`, or None."""
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    return None
  from ds_jax.data.tokenizer import HFTokenizer
  return HFTokenizer(path)


def experiment_config(mc: ModelConfig | ConfigDict, tokenizer_path: str = "") -> ConfigDict:
  """`base_config()` with the model section filled from `mc` (and an HF tokenizer if given)."""
  from ds_jax.config import base_config
  c = base_config()
  d = mc.to_dict()
  for k, v in d.items():
    if k == "rope_scaling":
      for kk, vv in dict(v).items():
        c.model.rope_scaling[kk] = vv
    else:
      c.model[k] = v
  if tokenizer_path:
    c.data.tokenizer, c.data.tokenizer_path = "hf", tokenizer_path
  c.lock()
  return c


# ----------------------------------------------------------------------------------------------
# Saving.


def _model_config(config: Any) -> ModelConfig:
  if isinstance(config, ModelConfig):
    return config
  if isinstance(config, (ConfigDict, dict)) and "model" in config:
    config = config["model"]
  return model_config(config)


def save_pretrained(config: Any, params: Any, path: str, dtype: str = "float32",
                    max_shard_bytes: int = 5 * 2 ** 30, tokenizer_dir: str = "") -> list[str]:
  """Write `params` as a Hugging Face model directory transformers loads with from_pretrained.

  `config` is a ModelConfig, a `config.model` section or a whole experiment config; `dtype`
  "float32" or "bfloat16". Tensors stream into shards of at most `max_shard_bytes` (one file, or
  several plus `model.safetensors.index.json`). Tokenizer files in `tokenizer_dir` are copied.
  Returns the safetensors file names.
  """
  mc = _model_config(config)
  if dtype not in ("float32", "bfloat16"):
    raise ConvertError(f"dtype: {dtype!r} must be float32 or bfloat16")
  np_dtype = np.dtype(np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
  interleaved = mc.attention_type == "mla"
  entries = hp.param_entries(mc, interleaved)
  tree = {p: x for p, x in _leaves(_plain(params))}
  _check_coverage(entries, {p: () for p in tree})
  os.makedirs(path, exist_ok=True)
  writer = ShardWriter(path, max_shard_bytes)
  for e in entries:
    leaf = np.asarray(tree[e.path])
    writer.add(e.hf, hp.to_hf(e, leaf[e.index] if e.index else leaf).astype(np_dtype))
  by_hf = {e.hf: e for e in entries}
  for name, src in hp.mtp_shared_copies(mc):  # DeepSeek-V3 stores these per MTP layer
    e = by_hf[src]
    writer.add(name, hp.to_hf(e, np.asarray(tree[e.path])).astype(np_dtype))
  writer_files = writer.close()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(to_hf_config(mc, dtype), f, indent=2)
  for name in TOKENIZER_FILES if tokenizer_dir else ():
    src = os.path.join(tokenizer_dir, name)
    if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
      shutil.copy(src, os.path.join(path, name))
  return writer_files


def _plain(params: Any) -> Any:
  """Unbox flax Partitioned leaves and unfreeze, keeping the nested-dict structure."""
  import flax
  import flax.linen as nn
  params = nn.unbox(params)
  return flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
