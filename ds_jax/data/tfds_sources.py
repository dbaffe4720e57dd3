"""TensorFlow Datasets pairs for tri-modal training: COCO captions (image-text) and LibriSpeech
(audio-text), as numpy batches in the tri-modal trainer's format.

Batches use the keys and dtypes of `ds_jax.data.multimodal.batches`:
  image  float32 [B, H, W, 3] in [0, 1] (or CLIP-normalised)   coco_captions
  audio  float32 [B, S] 16 kHz waveform in [-1, 1], zero-padded librispeech (+ audio_mask bool)
  text   int32 [B, text_len] UTF-8 bytes + 1, 0 = padding      both (`tokenize_bytes`)
  label  int32 [B]: the item's identity (COCO image id, hash of the LibriSpeech utterance id), so
         the multi-positive contrastive loss treats captions of the same image as positives.
A batch holds two modalities: train the pair with
`multimodal.tri_modal_loss(model, params, {"image": ..., "text": ...}, label, pairs=[("image",
"text")])` (the towers are independent, so pairs may alternate between steps).

The datasets must already be prepared in `data_dir` (`tfds.builder(name).download_and_prepare()`;
COCO 2014 is ~38 GB, LibriSpeech ~60 GB). Shuffling is a pure function of (seed, epoch).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAMPLE_RATE = 16000


def _tf():
  import tensorflow as tf
  try:  # the input pipeline only: keep TensorFlow off the accelerators JAX uses
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  return tf


def _load(name: str, split: str, data_dir: Optional[str], seed: int, epoch: int,
          shuffle_files: bool = True):
  import tensorflow_datasets as tfds
  rc = tfds.ReadConfig(shuffle_seed=_seed(seed, epoch), try_autocache=False)
  return tfds.load(name, split=split, data_dir=data_dir, shuffle_files=shuffle_files,
                   read_config=rc, download=False)


def _seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def _bytes_tokens(strings: np.ndarray, text_len: int) -> np.ndarray:
  from ds_jax.models.encoders import tokenize_bytes
  return tokenize_bytes([s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
                         for s in strings], text_len)


def resize_center_crop(image, size: int):
  """CLIP preprocessing in TF: shorter side to `size` (bicubic), centre crop, float in [0, 1]."""
  tf = _tf()
  img = tf.cast(image, tf.float32) / 255.0
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  scale = size / tf.reduce_min(hw)
  new = tf.cast(tf.math.ceil(hw * scale), tf.int32)
  img = tf.image.resize(img, new, method="bicubic", antialias=True)
  img = tf.image.resize_with_crop_or_pad(img, size, size)
  return tf.clip_by_value(img, 0.0, 1.0)


def coco_caption_batches(split: str = "train", batch_size: int = 64, image_size: int = 224,
                         text_len: int = 64, seed: int = 0, epoch: int = 0,
                         captions: str = "random", clip_normalize: bool = False,
                         data_dir: Optional[str] = None, shuffle_buffer: int = 2048,
                         name: str = "coco_captions") -> Iterator[dict]:
  """Image-text batches from TFDS `coco_captions` (Karpathy splits: train, val, test, restval).

  `captions`: "random" (one caption per image, drawn per epoch), "first", or "all" (every
  caption is a pair; the same image may then meet itself in a batch, as a positive by label).
  """
  if captions not in ("random", "first", "all"):
    raise ValueError(f"captions must be random, first or all; got {captions!r}")
  tf = _tf()
  s = _seed(seed, epoch)
  ds = _load(name, split, data_dir, seed, epoch)

  def prep(ex):
    img = resize_center_crop(ex["image"], image_size)
    if img.shape[-1] != 3:
      img = tf.image.grayscale_to_rgb(img[..., :1]) if img.shape[-1] == 1 else img[..., :3]
    texts = ex["captions"]["text"]
    n = tf.shape(texts)[0]
    out = {"image": img, "label": tf.cast(ex["image/id"] % 0x7FFFFFFF, tf.int32)}
    if captions == "all":
      out["text"] = texts
      return out
    if captions == "first":
      i = tf.constant(0)
    else:
      i = tf.random.stateless_uniform((), tf.stack([s, tf.cast(ex["image/id"], tf.int32)]),
                                      0, tf.maximum(n, 1), tf.int32)
    out["text"] = tf.cond(n > 0, lambda: texts[tf.minimum(i, n - 1)], lambda: tf.constant(""))
    return out

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  if captions == "all":
    ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensor_slices(ex["text"]).map(
        lambda t: {"image": ex["image"], "label": ex["label"], "text": t}))
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=s)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  mean = np.asarray(CLIP_MEAN, np.float32)
  std = np.asarray(CLIP_STD, np.float32)
  for b in ds.as_numpy_iterator():
    img = b["image"].astype(np.float32)
    if clip_normalize:
      img = (img - mean) / std
    yield {"image": img, "text": _bytes_tokens(b["text"], text_len),
           "label": b["label"].astype(np.int32)}


def librispeech_batches(split: str = "train_clean100", batch_size: int = 32,
                        clip_seconds: float = 4.0, text_len: int = 64, seed: int = 0,
                        epoch: int = 0, crop: str = "start", data_dir: Optional[str] = None,
                        shuffle_buffer: int = 1024, name: str = "librispeech"
                        ) -> Iterator[dict]:
  """Audio-text batches from TFDS `librispeech` (16 kHz int16 speech, scaled to [-1, 1]).

  Each utterance is cropped or zero-padded to `clip_seconds` (`audio_mask` marks real samples).
  `crop="start"` keeps the beginning, which matches the transcript's first `text_len` bytes best;
  `"random"` takes a random window per epoch (the transcript is not cut to it). Transcripts are
  lower-cased (LibriSpeech's are upper case).
  """
  if crop not in ("start", "random"):
    raise ValueError(f"crop must be start or random; got {crop!r}")
  tf = _tf()
  s = _seed(seed, epoch)
  n_out = int(round(clip_seconds * SAMPLE_RATE))
  ds = _load(name, split, data_dir, seed, epoch)

  def prep(ex):
    x = tf.cast(tf.reshape(ex["speech"], [-1]), tf.float32) / 32768.0
    n = tf.shape(x)[0]
    label = tf.strings.to_hash_bucket_fast(ex["id"], 0x7FFFFFFF)
    if crop == "random":
      start = tf.random.stateless_uniform((), tf.stack([s, tf.cast(label, tf.int32)]), 0,
                                          tf.maximum(n - n_out, 0) + 1, tf.int32)
    else:
      start = tf.constant(0)
    x = x[start:start + n_out]
    m = tf.shape(x)[0]
    return {"audio": tf.pad(x, [[0, n_out - m]]), "audio_mask": tf.range(n_out) < m,
            "text": ex["text"], "label": tf.cast(label, tf.int32)}

  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=s)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  for b in ds.as_numpy_iterator():
    yield {"audio": b["audio"].astype(np.float32), "audio_mask": b["audio_mask"],
           "text": _bytes_tokens(b["text"], text_len), "label": b["label"].astype(np.int32)}
