"""Tri-modal digits: real 8x8 handwritten digits (scikit-learn), espeak-ng speech, text templates.

Everything is generated from a seed at run time and cached under `<workdir>/data_cache/`; no audio
is committed. Speakers ("voices") are espeak-ng accent x voice-variant pairs; test voices use
accents *and* variants never used in training. TFDS loaders for COCO captions and LibriSpeech live
in `ds_jax.data.tfds_multimodal` for users with a network.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import time
from typing import Iterator, Optional

import numpy as np

from ds_jax.data import audio as A

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{w}", "{d}", "{w} ({d})", "the digit {w}", "the number {d}", "a photo of the digit {w}",
             "a handwritten {w}", "an image of the number {w}", "someone saying {w}",
             "the spoken word {w}")
TRAIN_ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "de", "fr", "es")
TEST_ACCENTS = ("en-us-nyc", "en-029", "en-gb-x-gbcwmd", "nl", "it")
# Validation *voices* (eval_split "voices"): two training accents and every 4th training variant
# are held out of training and used only for validation clips, so a recipe can be chosen on
# voices the model has not heard, without touching the test voices.
VAL_ACCENTS = ("en-gb-scotland", "fr")
SPLITS = ("train", "test", "val", "voices_train", "voices_val")  # index = the rng stream
SPOKEN = ("{w}", "{w}", "{w}", "{w}.", "{w}!", "{w}?")
CLIP_SAMPLES = A.SAMPLE_RATE  # 1 s at 16 kHz -> 100 log-mel frames


def class_texts(label: int) -> list[str]:
  return [t.format(w=WORDS[label], d=label) for t in TEMPLATES]


# ----------------------------------------------------------------------------------------------
# espeak-ng through the espeakng_loader wheel (ctypes; the library keeps global state).

_ESPEAK: dict = {}


def _espeak():
  if "lib" not in _ESPEAK:
    import espeakng_loader
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    sr = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # synchronous
    if sr <= 0:
      raise RuntimeError("espeak_Initialize failed")
    buf: list = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)

    def callback(wav, n, events):
      if n > 0:
        buf.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
      return 0

    _ESPEAK.update(lib=lib, sr=sr, buf=buf, cb=proto(callback))
    lib.espeak_SetSynthCallback(_ESPEAK["cb"])
  return _ESPEAK


def voice_variants() -> list[str]:
  import espeakng_loader
  return sorted(os.listdir(os.path.join(espeakng_loader.get_data_path(), "voices", "!v")))


def split_variants() -> tuple[list[str], list[str]]:
  """Every 4th variant (sorted by name) is held out for test voices."""
  v = voice_variants()
  return [x for i, x in enumerate(v) if i % 4], [x for i, x in enumerate(v) if i % 4 == 0]


def voice_pool(split: str, extra_accents: tuple = ()) -> tuple[tuple, list]:
  """(accents, variants) a split's clips are drawn from. "train" / "val": the training pool
  (+ extra_accents); "test": the held-out test pool; "voices_train": the training pool without
  the validation voices (VAL_ACCENTS, every 4th training variant); "voices_val": those voices."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
  train_v, test_v = split_variants()
  if split == "test":
    return TEST_ACCENTS, test_v
  if split == "voices_val":
    return VAL_ACCENTS, train_v[::4]
  accents = TRAIN_ACCENTS + tuple(a for a in extra_accents if a not in TRAIN_ACCENTS)
  if split == "voices_train":
    return tuple(a for a in accents if a not in VAL_ACCENTS), [
        v for i, v in enumerate(train_v) if i % 4]
  return accents, train_v


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50,
               pitch_range: int = 50) -> np.ndarray:
  """float32 waveform at 16 kHz of `text` spoken by espeak-ng voice `voice` (e.g. en-us+f3)."""
  e = _espeak()
  lib = e["lib"]
  if lib.espeak_SetVoiceByName(voice.encode()) != 0:
    raise ValueError(f"espeak-ng has no voice {voice!r}")
  for param, value in ((1, rate), (3, pitch), (4, pitch_range)):  # RATE, PITCH, RANGE
    lib.espeak_SetParameter(param, int(value), 0)
  e["buf"].clear()
  data = text.encode() + b"\0"
  lib.espeak_Synth(data, len(data), 0, 0, 0, 1, None, None)  # POS_CHARACTER, CHARS_UTF8
  lib.espeak_Synchronize()
  x = np.concatenate(e["buf"]) if e["buf"] else np.zeros(1, np.int16)
  return A.resample(x.astype(np.float32) / 32768.0, e["sr"], A.SAMPLE_RATE)


@dataclasses.dataclass
class SpeechSet:
  clips: list  # trimmed float32 waveforms at 16 kHz
  labels: np.ndarray
  voices: list  # "accent+variant"


def make_speech(split: str, per_class: int, seed: int, extra_accents: tuple = ()) -> SpeechSet:
  """`per_class` clips of each digit word, each by a random voice of the split's voice pool
  (`voice_pool`; "val": new clips by the *training* voices)."""
  accents, variants = voice_pool(split, extra_accents)
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  clips, labels, voices = [], [], []
  for label in range(10):
    for _ in range(per_class):
      voice = f"{accents[rng.integers(len(accents))]}+{variants[rng.integers(len(variants))]}"
      text = SPOKEN[rng.integers(len(SPOKEN))].format(w=WORDS[label])
      x = synthesize(text, voice, rng.integers(110, 250), rng.integers(20, 80),
                     rng.integers(20, 90))
      clips.append(A.trim_silence(x))
      labels.append(label)
      voices.append(voice)
  return SpeechSet(clips, np.asarray(labels, np.int32), voices)


def cached_speech(workdir: str, split: str, per_class: int, seed: int,
                  cache_dir: Optional[str] = None, extra_accents: tuple = ()) -> SpeechSet:
  """make_speech, cached as `<cache_dir or workdir/data_cache>/speech_<split>_<hash>.npz`."""
  tag = f"{split}:{per_class}:{seed}:{TRAIN_ACCENTS}{TEST_ACCENTS}{SPOKEN}"
  if split.startswith("voices_"):
    tag += f"{VAL_ACCENTS}"
  if extra_accents and split in ("train", "val", "voices_train"):
    tag += f"+{tuple(extra_accents)}"  # (keeps the hashes of the existing caches)
  key = hashlib.sha1(tag.encode())
  path = os.path.join(cache_dir or os.path.join(workdir, "data_cache"),
                      f"speech_{split}_{key.hexdigest()[:10]}.npz")
  if os.path.exists(path):
    d = np.load(path)
    cuts = np.cumsum(d["lengths"])[:-1]
    return SpeechSet(list(np.split(d["audio"], cuts)), d["labels"], list(d["voices"]))
  s = make_speech(split, per_class, seed, extra_accents)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, audio=np.concatenate(s.clips), lengths=np.asarray([len(c) for c in s.clips]),
           labels=s.labels, voices=np.asarray(s.voices))
  os.replace(tmp, path)
  return s


# ----------------------------------------------------------------------------------------------
# Images and the tri-modal set.


def digit_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x_train, y_train, x_test, y_test): [N, 8, 8, 1] in [0, 1]; fixed stratified 75/25 split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int32), test_size=0.25,
                                        random_state=0, stratify=d.target)
  return xtr, ytr, xte, yte


@dataclasses.dataclass
class DigitTri:
  """Images, speech and texts of the ten digits; pairs are formed by class at batch time."""
  images: np.ndarray
  image_labels: np.ndarray
  speech: SpeechSet

  @property
  def audio(self) -> np.ndarray:
    """Centred 1 s clips [N, 16000] (evaluation view)."""
    return np.stack([A.place(c, CLIP_SAMPLES) for c in self.speech.clips])


def load_digit_tri(workdir: str, seed: int = 0, train_per_class: int = 200,
                   test_per_class: int = 50, eval_split: str = "test",
                   cache_dir: Optional[str] = None,
                   extra_accents: tuple = ()) -> tuple[DigitTri, DigitTri]:
  """(train, eval) sets. eval_split "test": the 450 test images and held-out voices; "val": 20%
  of the training images (stratified, held out of training) and new clips by training voices;
  "voices": the same images as "val", training clips without the validation voices and eval
  clips by those voices only (VAL_ACCENTS x every 4th training variant): unseen voices."""
  t0 = time.time()
  xtr, ytr, xte, yte = digit_images()
  if eval_split in ("val", "voices"):
    from sklearn.model_selection import train_test_split
    xtr, xte, ytr, yte = train_test_split(xtr, ytr, test_size=0.2, random_state=1, stratify=ytr)
  elif eval_split != "test":
    raise ValueError(f"eval_split must be test, val or voices; got {eval_split!r}")
  tr_split, ev_split = ("voices_train", "voices_val") if eval_split == "voices" else (
      "train", eval_split)
  extra = tuple(extra_accents)
  train = DigitTri(xtr, ytr, cached_speech(workdir, tr_split, train_per_class, seed, cache_dir,
                                           extra))
  test = DigitTri(xte, yte, cached_speech(workdir, ev_split, test_per_class, seed, cache_dir,
                                          extra))
  load_digit_tri.seconds = time.time() - t0
  return train, test


def augment_clip(x: np.ndarray, rng: np.random.Generator, speed: float = 0.0) -> np.ndarray:
  """Random speed (factor in [1 - speed, 1 + speed], if speed > 0), gain, placement,
  telephone-band low-pass (8 kHz round trip) and additive noise."""
  if speed > 0:
    x = A.speed_perturb(x, rng.uniform(1 - speed, 1 + speed))
  if rng.random() < 0.3:
    x = A.resample(A.resample(x, A.SAMPLE_RATE, 8000), 8000, A.SAMPLE_RATE)
  if len(x) < CLIP_SAMPLES:
    x = A.place(x, CLIP_SAMPLES, int(rng.integers(0, CLIP_SAMPLES - len(x) + 1)))
  else:
    x = A.place(x, CLIP_SAMPLES)
  x = x * 10 ** (rng.uniform(-20, 6) / 20)
  snr_db = rng.uniform(5, 45)
  sig = np.sqrt(np.mean(x ** 2) + 1e-12)
  noise = rng.normal(size=x.shape).astype(np.float32)
  if rng.random() < 0.5:  # brown-ish noise
    noise = np.cumsum(noise)
    noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
    noise /= noise.std() + 1e-9
  return (x + noise * sig * 10 ** (-snr_db / 20)).astype(np.float32)


def batches(data: DigitTri, batch_size: int, seed: int, epoch: int, text_len: int = 32,
            augment: bool = True, speed: float = 0.0,
            spec_augment: bool = False) -> Iterator[dict]:
  """One epoch over the images (shuffled); each image gets a random same-class clip and text.
  With augment: waveform augmentation (augment_clip, `speed` perturbation) and, if
  spec_augment, per-clip `mel_aug` parameters for audio.spec_augment (applied in the step)."""
  from ds_jax.models.encoders import tokenize_bytes
  rng = np.random.default_rng([seed, epoch, 7])
  order = rng.permutation(len(data.images))
  by_class = [np.nonzero(data.speech.labels == c)[0] for c in range(10)]
  for start in range(0, len(order) - batch_size + 1, batch_size):
    idx = order[start:start + batch_size]
    labels = data.image_labels[idx]
    clips = [data.speech.clips[rng.choice(by_class[c])] for c in labels]
    wave = np.stack([augment_clip(c, rng, speed) if augment else A.place(c, CLIP_SAMPLES)
                     for c in clips])
    texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(w=WORDS[c], d=c) for c in labels]
    out = {"image": data.images[idx], "audio": wave, "text": tokenize_bytes(texts, text_len),
           "label": labels.astype(np.int32)}
    if augment and spec_augment:
      out["mel_aug"] = A.spec_augment_params(rng, batch_size, A.num_frames(CLIP_SAMPLES))
    yield out
