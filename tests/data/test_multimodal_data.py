"""Tri-modal digits data: deterministic espeak-ng speech, disjoint voices, cache, split, batches;
and the zero-shot folder path on a bad / stereo / 8 kHz / image mix."""

import os

import numpy as np
import pytest

from ds_jax.data import audio as A
from ds_jax.data import multimodal as D

pytest.importorskip("espeakng_loader")


def test_voices_disjoint_and_synthesis_deterministic():
  train_v, test_v = D.split_variants()
  assert train_v and test_v and not set(train_v) & set(test_v)
  assert not set(D.TRAIN_ACCENTS) & set(D.TEST_ACCENTS)
  a = D.make_speech("test", 1, seed=3)
  b = D.make_speech("test", 1, seed=3)
  # Same voices, texts, prosody and lengths. espeak-ng adds its own random jitter / breath noise
  # to the samples of some variants, so waveforms are not bit-identical: the workdir cache is what
  # makes reruns identical.
  assert a.voices == b.voices and [len(x) for x in a.clips] == [len(y) for y in b.clips]
  assert all(v.split("+")[1] in test_v for v in a.voices)
  assert list(a.labels) == list(range(10))
  lengths = [len(c) / A.SAMPLE_RATE for c in a.clips]
  assert 0.1 < min(lengths) and max(lengths) < 1.2
  with pytest.raises(ValueError):
    D.synthesize("one", "no-such-voice")


def test_validation_voices_are_held_out_of_training_and_test():
  train_v, test_v = D.split_variants()
  tr_a, tr_v = D.voice_pool("voices_train", ("pt",))
  va_a, va_v = D.voice_pool("voices_val", ("pt",))
  te_a, te_v = D.voice_pool("test")
  assert set(D.VAL_ACCENTS) <= set(D.TRAIN_ACCENTS)  # carved out of the training pool
  for (a1, v1), (a2, v2) in ((( tr_a, tr_v), (va_a, va_v)), ((tr_a, tr_v), (te_a, te_v)),
                             ((va_a, va_v), (te_a, te_v))):
    assert not set(a1) & set(a2) and not set(v1) & set(v2)
  assert sorted(tr_v + va_v) == sorted(train_v) and len(va_v) == len(train_v[::4])
  assert "pt" in tr_a and "pt" in D.voice_pool("train", ("pt",))[0] and "pt" not in va_a
  assert D.voice_pool("train") == (D.TRAIN_ACCENTS, train_v) == D.voice_pool("val")
  s = D.make_speech("voices_val", 1, seed=0)
  assert all(v.split("+")[0] in va_a and v.split("+")[1] in va_v for v in s.voices)
  with pytest.raises(ValueError):
    D.voice_pool("bogus")


def test_cache_keys_of_existing_splits_unchanged(tmp_path, monkeypatch):
  """Round-2 caches (train / test / val) keep their file names; extra accents get a new one."""
  made = []
  monkeypatch.setattr(D, "make_speech", lambda *a: made.append(a) or D.SpeechSet(
      [np.zeros(4, np.float32)], np.zeros(1, np.int32), ["en+x"]))
  for split in ("train", "test", "val"):
    D.cached_speech(str(tmp_path), split, 1, 0)
  D.cached_speech(str(tmp_path), "train", 1, 0, extra_accents=("pt",))
  D.cached_speech(str(tmp_path), "test", 1, 0, extra_accents=("pt",))  # test ignores extras
  import hashlib
  names = sorted(os.listdir(tmp_path / "data_cache"))
  for split in ("train", "test", "val"):
    key = hashlib.sha1(f"{split}:1:0:{D.TRAIN_ACCENTS}{D.TEST_ACCENTS}{D.SPOKEN}".encode())
    assert f"speech_{split}_{key.hexdigest()[:10]}.npz" in names
  assert len(names) == 4 and len(made) == 4


def test_cache_roundtrip_and_image_split(tmp_path):
  s = D.cached_speech(str(tmp_path), "train", 1, seed=0)
  files = os.listdir(tmp_path / "data_cache")
  assert len(files) == 1 and files[0].endswith(".npz")
  s2 = D.cached_speech(str(tmp_path), "train", 1, seed=0)
  assert all(np.array_equal(x, y) for x, y in zip(s.clips, s2.clips)) and s.voices == s2.voices
  xtr, ytr, xte, yte = D.digit_images()
  assert xtr.shape == (1347, 8, 8, 1) and xte.shape == (450, 8, 8, 1)
  per_class = np.bincount(np.concatenate([ytr, yte]))
  assert np.all(np.abs(np.bincount(yte) - per_class / 4) <= 1)  # stratified
  assert 0 <= xtr.min() and xtr.max() <= 1
  data = D.DigitTri(xtr, ytr, s)
  batch = next(D.batches(data, 16, seed=0, epoch=0))
  assert batch["audio"].shape == (16, 16000) and batch["text"].shape == (16, 32)
  # every text names the image's class
  texts = [bytes((t[t > 0] - 1).astype(np.uint8)).decode() for t in batch["text"]]
  for t, y in zip(texts, batch["label"]):
    assert D.WORDS[y] in t or str(y) in t


@pytest.mark.slow  # compiles three encoders: ~4 min on the loaded 2-core machine
def test_zero_shot_folder_skips_unreadable(tmp_path):
  import jax
  from PIL import Image
  from ds_jax import multimodal_eval as E
  from ds_jax.models import multimodal as mm
  from ds_jax.models.encoders import EncoderConfig
  enc = EncoderConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2)
  cfg = mm.MultimodalConfig(text=enc.replace(max_position_embeddings=32), image=enc,
                            audio=enc.replace(max_frames=100), shared_width=16, embed_dim=8,
                            pool_heads=2)
  params = mm.init_params(cfg, jax.random.key(0), {
      "text": np.ones((1, 32), np.int32), "image": np.zeros((1, 8, 8, 1), np.float32),
      "audio": np.zeros((1, 100, 80), np.float32)})
  for label in ("3", "seven"):
    os.makedirs(tmp_path / "a" / label)
    x = D.synthesize("three" if label == "3" else "seven", "en-us")
    stereo = np.stack([x, 0.5 * x], 1)
    A.write_wav(tmp_path / "a" / label / "s.wav", A.resample(stereo[:, 0], 16000, 8000), 8000)
    A.write_wav(tmp_path / "a" / label / "st.wav", stereo, 16000)
  (tmp_path / "a" / "3" / "broken.wav").write_bytes(b"RIFF....garbage")
  res = E.zero_shot_folder(cfg, params, "audio", str(tmp_path / "a"))
  assert res["num_files"] == 4 and len(res["unreadable"]) == 1
  assert res["classes"] == ["3", "seven"] and 0 <= res["accuracy"] <= 1
  os.makedirs(tmp_path / "i" / "0")
  Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(
      tmp_path / "i" / "0" / "x.png")
  (tmp_path / "i" / "0" / "bad.png").write_bytes(b"not png")
  res = E.zero_shot_folder(cfg, params, "image", str(tmp_path / "i"))
  assert res["num_files"] == 1 and len(res["unreadable"]) == 1 and res["accuracy"] == 1.0


def test_val_split_uses_training_voices_and_training_images(tmp_path):
  train_v, _ = D.split_variants()
  v = D.make_speech("val", 1, seed=0)
  assert all(x.split("+")[0] in D.TRAIN_ACCENTS and x.split("+")[1] in train_v for x in v.voices)
  t = D.make_speech("train", 1, seed=0)
  assert v.voices != t.voices  # its own random stream, not a copy of the training clips
  with pytest.raises(ValueError):
    D.make_speech("dev", 1, seed=0)
  tr, va = D.load_digit_tri(str(tmp_path), 0, 1, 1, eval_split="val",
                            cache_dir=str(tmp_path / "shared"))
  assert len(tr.images) + len(va.images) == 1347  # the 450 test images are not used
  assert sorted(os.listdir(tmp_path / "shared"))[0].startswith("speech_train")


def test_batches_speed_perturb_and_spec_augment_parameters():
  rng = np.random.default_rng(0)
  clips = [rng.normal(size=8000).astype(np.float32) * 0.1 for _ in range(20)]
  speech = D.SpeechSet(clips, np.repeat(np.arange(10), 2).astype(np.int32), ["v"] * 20)
  data = D.DigitTri(rng.uniform(size=(16, 8, 8, 1)).astype(np.float32),
                    np.arange(16, dtype=np.int32) % 10, speech)
  plain = next(D.batches(data, 8, 0, 0))
  assert "mel_aug" not in plain and plain["audio"].shape == (8, D.CLIP_SAMPLES)
  b = next(D.batches(data, 8, 0, 0, speed=0.1, spec_augment=True))
  assert b["mel_aug"].shape == (8, 7) and np.all(np.abs(b["mel_aug"][:, 0] - 1) <= 0.1)
  assert "mel_aug" not in next(D.batches(data, 8, 0, 0, augment=False, spec_augment=True))
  # the training step applies it to the log-mel (identity parameters change nothing)
  from ds_jax import multimodal_train as T
  ident = dict(b, mel_aug=np.tile(np.array([[1, 0, 0, 0, 0, 0, 0]], np.float32), (8, 1)))
  no_aug = {k: v for k, v in b.items() if k != "mel_aug"}
  np.testing.assert_allclose(T.model_inputs(ident)["audio"], T.model_inputs(no_aug)["audio"])
  assert float(np.abs(T.model_inputs(b)["audio"] - T.model_inputs(no_aug)["audio"]).max()) > 0


def test_folders_with_the_same_prompts_are_flagged():
  from ds_jax import multimodal_eval as E
  assert E.folder_digit("3") == E.folder_digit(" Three ") == 3 and E.folder_digit("cat") is None
  assert E.label_prompts("three") == E.label_prompts("3") == D.class_texts(3)
  assert E.same_prompt_folders(["3", "cat", "seven", "three", "Cat"]) == [["3", "three"],
                                                                           ["cat", "Cat"]]
  assert E.same_prompt_folders(["0", "one", "2"]) == []
