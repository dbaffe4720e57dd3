"""Text data: deterministic split, batches a pure function of (seed, step), local files, TFDS."""

import json

import numpy as np
import pytest

from ds_jax.data.text import PackedText, TextData, load_documents, pydoc_topics, split_names
from ds_jax.data.tokenizer import ByteTokenizer
from tests.helpers import tiny_cfg


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "héllo → wörld"
  assert tok.decode(tok.encode(text)) == text
  assert max(tok.encode(text)) < 256 and tok.vocab_size == 259


def test_pydoc_split_is_deterministic_and_disjoint():
  names = list(pydoc_topics())
  assert len(names) > 50
  tr1, va1 = split_names(names, 0.1)
  tr2, va2 = split_names(list(reversed(names)), 0.1)
  assert (tr1, va1) == (tr2, va2)
  assert not set(tr1) & set(va1) and len(va1) == round(0.1 * len(names))


def test_batches_are_pure_functions_of_seed_and_step():
  cfg = tiny_cfg()
  a, b = TextData(cfg), TextData(cfg)
  for step in (0, 7, 10_000):  # far past one epoch too
    x, y = a.batch(step), b.batch(step)
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  np.testing.assert_array_equal(a.batch(3)["targets"][:, :-1], a.batch(3)["inputs"][:, 1:])
  assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
  cfg.seed = 1
  assert not np.array_equal(TextData(cfg).batch(0)["inputs"], a.batch(0)["inputs"])


def test_each_epoch_visits_every_window_once():
  tokens = np.arange(10 * 4 + 1, dtype=np.int32)
  pt = PackedText(tokens, seq_len=4)
  seen = np.concatenate([pt.train_batch(0, s, 2)["inputs"][:, 0] for s in range(5)])
  assert sorted(seen.tolist()) == list(range(0, 40, 4))


def test_local_text_and_jsonl_files(tmp_path):
  (tmp_path / "a.txt").write_text("alpha " * 50)
  with open(tmp_path / "b.jsonl", "w") as f:
    for i in range(5):
      f.write(json.dumps({"body": f"document {i} " * 20}) + "\n")
  cfg = tiny_cfg()
  cfg.data.source = "files"
  cfg.data.path = str(tmp_path / "*")
  cfg.data.text_key = "body"
  train, val = load_documents(cfg.data)
  assert len(train) + len(val) == 6
  assert TextData(cfg).batch(0)["inputs"].shape == (cfg.batch_size, cfg.seq_len)


def test_tfds_text_source_with_mock_data():
  import tensorflow_datasets as tfds  # the `data` extra; `make test` installs it
  cfg = tiny_cfg()
  cfg.data.source = "tfds:lm1b"
  cfg.data.tfds_split = "train"
  cfg.data.tfds_validation_split = "test"
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    data = TextData(cfg)
  b = data.batch(0)
  assert b["inputs"].shape == (cfg.batch_size, cfg.seq_len)
  assert b["inputs"].max() < 259
