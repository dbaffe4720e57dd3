"""Write a folder-per-class set of WAV files for `ds-jax zero-shot` that looks like real uploads:
held-out test voices (accents and variants never trained on), several sample rates, mono and
stereo, 16-bit PCM and float, some with leading / trailing silence and background noise, class
folders named by digit or by word, and one corrupt file.

  python scripts/mm_zero_shot_folder.py --out /tmp/zs_wavs [--per-class 6] [--seed 123]
  ds-jax zero-shot --workdir W --modality audio --data-dir /tmp/zs_wavs
  python scripts/mm_zero_shot_folder.py --modality image --out /tmp/zs_pngs [--per-class 6]
  ds-jax zero-shot --workdir W --modality image --data-dir /tmp/zs_pngs

The clips come from `make_speech("test", ...)` with a seed other than the training run's, so they
are new utterances by held-out voices. Images: test-split digits (never trained on) as PNG files
at 8, 28 and 64 pixels, grey or RGB, every other one dark ink on white, plus one corrupt PNG.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RATES = (8000, 11025, 16000, 22050, 44100, 48000)


def write_float_wav(path: str, x: np.ndarray, rate: int) -> None:
  from scipy.io import wavfile
  wavfile.write(path, rate, np.asarray(x, np.float32))


def write_images(out: str, per_class: int, seed: int) -> str:
  """Test digits as PNG files of several sizes / modes / polarities, and one corrupt file."""
  from PIL import Image
  from ds_jax.data import multimodal as D
  rng = np.random.default_rng(seed)
  _, _, xte, yte = D.digit_images()
  n = 0
  for label in range(10):
    folder = str(label) if label % 2 == 0 else D.WORDS[label]
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    for j, i in enumerate(rng.choice(np.nonzero(yte == label)[0], per_class, replace=False)):
      x = xte[i, :, :, 0]
      if j % 2:
        x = 1.0 - x  # dark ink on a light background
      size = (8, 28, 64)[j % 3]
      im = Image.fromarray((x * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
      if j % 4 == 3:
        im = im.convert("RGB")
      im.save(os.path.join(out, folder, f"{i:03d}_{size}px.png"))
      n += 1
  bad = os.path.join(out, D.WORDS[3], "corrupt.png")
  with open(bad, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))
  return f"{n} images in {out} (sizes 8 / 28 / 64, grey and RGB, both polarities) + 1 corrupt " \
         f"file ({bad})"


def main(argv=None) -> int:
  from ds_jax.data import audio as A
  from ds_jax.data import multimodal as D
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--per-class", type=int, default=6)
  p.add_argument("--seed", type=int, default=123)
  p.add_argument("--modality", default="audio", choices=("audio", "image"))
  a = p.parse_args(argv)
  if a.modality == "image":
    print(write_images(a.out, a.per_class, a.seed))
    return 0
  rng = np.random.default_rng(a.seed)
  s = D.make_speech("test", a.per_class, a.seed)
  counts = {"stereo": 0, "float": 0}
  for i, (x, label, voice) in enumerate(zip(s.clips, s.labels, s.voices)):
    folder = str(label) if label % 2 == 0 else D.WORDS[label]  # "4" and "seven" both work
    d = os.path.join(a.out, folder)
    os.makedirs(d, exist_ok=True)
    rate = int(RATES[i % len(RATES)])
    pad = lambda n: np.zeros(int(n), np.float32)
    x = np.concatenate([pad(rng.integers(0, 8000)), x, pad(rng.integers(0, 8000))])
    if i % 3 == 0:  # background noise at 20-35 dB SNR
      sig = np.sqrt(np.mean(x ** 2))
      x = x + rng.normal(size=x.shape).astype(np.float32) * sig * 10 ** (-rng.uniform(20, 35) / 20)
    x = A.resample(x, A.SAMPLE_RATE, rate) * 10 ** (rng.uniform(-12, 0) / 20)
    if i % 4 == 1:
      x = np.stack([x, 0.8 * x], axis=1)
      counts["stereo"] += 1
    name = f"{i:03d}_{voice.replace('+', '_')}_{rate}.wav"
    if i % 5 == 2:
      write_float_wav(os.path.join(d, name), x, rate)
      counts["float"] += 1
    else:
      A.write_wav(os.path.join(d, name), x, rate)
  # inside the folder of digit 3 as named above ("three"): a second folder "3" would be a second
  # class with the same prompts (that mistake cost 5 clips in the first run, docs/multimodal.md)
  bad = os.path.join(a.out, D.WORDS[3], "corrupt.wav")
  os.makedirs(os.path.dirname(bad), exist_ok=True)
  with open(bad, "wb") as f:
    f.write(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(40)))
  print(f"{len(s.clips)} clips in {a.out} ({counts['stereo']} stereo, {counts['float']} float, "
        f"rates {RATES}) + 1 corrupt file ({bad})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
