"""Text corpora packed into fixed-length windows; batches are a pure function of (seed, step).

Sources (`config.data.source`):
  "pydoc"          CPython's `pydoc_data.topics` (~465k characters, always installed); split by
                   topic into train / validation with a fixed permutation.
  "files"          `config.data.path` is a glob of .txt / .md / .jsonl files (JSONL: field
                   `config.data.text_key`); split by document.
  "tfds:<name>"    a TFDS dataset through `tfds.data_source` (array_record, no TensorFlow needed).

Documents are joined with EOS and cut into non-overlapping windows of seq_len + 1 tokens. Sample
`i = step * batch + row` of epoch `i // num_windows` is window `perm_epoch[i % num_windows]`, with
`perm_epoch` drawn from (seed, epoch): the data order never depends on restarts.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable, Optional

import numpy as np

from ds_jax.data.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

SPLIT_SEED = 20240501  # the train/validation split is fixed, independent of config.seed


def pydoc_topics() -> dict[str, str]:
  from pydoc_data import topics
  return dict(sorted(topics.topics.items()))


def split_names(names: list[str], validation_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic split of document names into (train, validation)."""
  names = sorted(names)
  if len(names) < 2:
    return names, names
  order = np.random.default_rng(SPLIT_SEED).permutation(len(names))
  n_val = max(1, int(round(validation_fraction * len(names))))
  val = sorted(names[i] for i in order[:n_val])
  train = sorted(names[i] for i in order[n_val:])
  return train, val


def _read_files(pattern: str, text_key: str) -> dict[str, str]:
  docs: dict[str, str] = {}
  for path in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
    if os.path.isdir(path):
      continue
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
          if line.strip():
            docs[f"{path}:{n}"] = json.loads(line)[text_key]
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        docs[path] = f.read()
  if not docs:
    raise FileNotFoundError(f"no documents match {pattern!r}")
  return docs


def _tfds_docs(name: str, split: str, text_key: str, data_dir: Optional[str]) -> list[str]:
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  out = []
  for i in range(len(source)):
    value = source[i][text_key]
    out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return out


def load_documents(data_cfg) -> tuple[list[str], list[str]]:
  """(train documents, validation documents) for a `config.data` section."""
  source = data_cfg.source
  include = data_cfg.get("include", "")
  exclude = data_cfg.get("exclude", "")

  def keep(name: str) -> bool:
    return (not include or re.search(include, name)) and not (exclude and re.search(exclude,
                                                                                    name))
  if source == "pydoc" or source == "files":
    docs = pydoc_topics() if source == "pydoc" else _read_files(data_cfg.path, data_cfg.text_key)
    docs = {k: v for k, v in docs.items() if keep(k)}
    if not docs:
      raise ValueError(f"data.include/exclude leave no documents of {source!r}")
    train, val = split_names(list(docs), data_cfg.validation_fraction)
    return [docs[n] for n in train], [docs[n] for n in val]
  if source.startswith("tfds:"):
    name = source.split(":", 1)[1]
    data_dir = data_cfg.get("path", "") or None
    return (_tfds_docs(name, data_cfg.tfds_split, data_cfg.text_key, data_dir),
            _tfds_docs(name, data_cfg.tfds_validation_split, data_cfg.text_key, data_dir))
  raise ValueError(f"unknown data.source {source!r}")


def tokenize_documents(docs: Iterable[str], tok) -> np.ndarray:
  """Concatenate documents as [BOS] doc [EOS] ... into one int32 stream."""
  parts = []
  for d in docs:
    parts.append(np.asarray([tok.bos_id], np.int32))
    parts.append(tok.encode_np(d))
    parts.append(np.asarray([tok.eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class PackedText:
  """Fixed windows over a token stream with the (seed, step) -> batch map described above."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len
    self.num_windows = (len(tokens) - 1) // seq_len
    if self.num_windows < 1:
      raise ValueError(f"corpus of {len(tokens)} tokens is shorter than seq_len + 1 = "
                       f"{seq_len + 1}")

  def window(self, j: int) -> np.ndarray:
    s = j * self.seq_len
    return self.tokens[s:s + self.seq_len + 1]

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    w = np.stack([self.window(int(j)) for j in indices])
    return {"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32),
            "weights": np.ones(w[:, 1:].shape, np.float32)}

  def train_batch(self, seed: int, step: int, batch_size: int) -> dict[str, np.ndarray]:
    idx = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = idx // self.num_windows
    out = np.empty_like(idx)
    for e in np.unique(epochs):
      perm = np.random.default_rng([seed, int(e)]).permutation(self.num_windows)
      sel = epochs == e
      out[sel] = perm[idx[sel] % self.num_windows]
    return self.rows(out)

  def eval_batch(self, k: int, batch_size: int) -> dict[str, np.ndarray]:
    idx = np.arange(k * batch_size, (k + 1) * batch_size) % self.num_windows
    return self.rows(idx)


class TextData:
  """Train and validation streams for an LM config."""

  def __init__(self, cfg):
    d = cfg.data
    self.tokenizer = get_tokenizer(d.tokenizer, d.get("tokenizer_path", "") or d.path)
    train_docs, val_docs = load_documents(d)
    self.train = PackedText(tokenize_documents(train_docs, self.tokenizer), cfg.seq_len)
    self.val = PackedText(tokenize_documents(val_docs, self.tokenizer), cfg.seq_len)
    self.seed = cfg.seed
    self.batch_size = cfg.batch_size

  def batch(self, step: int) -> dict[str, np.ndarray]:
    return self.train.train_batch(self.seed, step, self.batch_size)

  def eval_batch(self, k: int) -> dict[str, np.ndarray]:
    return self.val.eval_batch(k, self.batch_size)
