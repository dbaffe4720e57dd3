"""Tokenizers: byte-level by default (no files, no network); Hugging Face `tokenizer.json`."""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259)."""
  vocab_size = 259
  bos_id, eos_id, pad_id = 256, 257, 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_np(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face fast tokenizer from a model directory's `tokenizer.json`."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as _Tok
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    self._tok = _Tok.from_file(file)
    self.vocab_size = self._tok.get_vocab_size()
    self.bos_id = self._special(("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>"))
    self.eos_id = self._special(("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>"))
    self.pad_id = self.eos_id

  def _special(self, names) -> int:
    for n in names:
      i = self._tok.token_to_id(n)
      if i is not None:
        return i
    return 0

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def get_tokenizer(name: str = "byte", path: str = "") -> ByteTokenizer | HFTokenizer:
  if name == "byte":
    return ByteTokenizer()
  if name == "hf":
    return HFTokenizer(path)
  raise ValueError(f"unknown tokenizer {name!r}; use 'byte' or 'hf'")
