"""TFDS coco_captions / librispeech loaders, offline on `tfds.testing.mock_data` (random examples
generated from the builders' feature specs in code: no download, no metadata fetch)."""

import socket

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tensorflow")  # tfds' Image / Audio features need it to build these datasets

from ds_jax.data import tfds_sources as S  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
  """Python-level network use fails the test (mock_data USE_CODE never reads GCS metadata)."""
  def guard(*a, **k):
    raise OSError("network disabled in this test")
  monkeypatch.setattr(socket.socket, "connect", guard)
  monkeypatch.setattr(socket, "create_connection", guard)
  monkeypatch.setattr(socket, "getaddrinfo", guard)


def _mock(n):
  return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_coco_captions_image_text_batches(offline, tmp_path):
  with _mock(4):
    kw = dict(batch_size=2, image_size=16, text_len=20, seed=1, data_dir=str(tmp_path))
    bs = list(S.coco_caption_batches("train", **kw))
    again = list(S.coco_caption_batches("train", **kw))
    every = list(S.coco_caption_batches("val", captions="all", clip_normalize=True, **kw))
  assert len(bs) == 2
  for b in bs:
    assert set(b) == {"image", "text", "label"}
    assert b["image"].shape == (2, 16, 16, 3) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["text"].shape == (2, 20) and b["text"].dtype == np.int32
    assert b["label"].shape == (2,) and b["label"].dtype == np.int32
  for x, y in zip(bs, again):  # a pure function of (seed, epoch)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for b in every:
    assert b["image"].shape == (2, 16, 16, 3) and b["text"].shape == (2, 20)


def test_librispeech_audio_text_batches(offline, tmp_path):
  with _mock(5):
    bs = list(S.librispeech_batches("train_clean100", batch_size=2, clip_seconds=0.1,
                                    text_len=24, seed=0, data_dir=str(tmp_path)))
    rnd = list(S.librispeech_batches("dev_clean", batch_size=2, clip_seconds=0.1, text_len=24,
                                     crop="random", data_dir=str(tmp_path)))
  assert len(bs) == 2 and len(rnd) == 2
  for b in bs + rnd:
    assert set(b) == {"audio", "audio_mask", "text", "label"}
    assert b["audio"].shape == (2, 1600) and b["audio"].dtype == np.float32
    assert b["audio_mask"].shape == (2, 1600) and b["audio_mask"].dtype == bool
    assert np.abs(b["audio"]).max() <= 1.0
    assert not b["audio"][~b["audio_mask"]].any()  # padding is zero
    assert b["text"].shape == (2, 24) and b["label"].dtype == np.int32
