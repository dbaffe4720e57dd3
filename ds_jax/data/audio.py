"""Whisper-style log-mel spectrograms in JAX, plus WAV reading and resampling to 16 kHz.

log_mel: reflect-pad n_fft/2, frame (n_fft 400, hop 160), periodic Hann window, |rfft|^2, drop the
last frame, 80 slaney-normalised mel filters (slaney mel scale), log10(max(., 1e-10)), clip to
(per-clip max - 8), then (x + 4) / 4. Output is time-major [batch, frames, mels].
"""

from __future__ import annotations

import io
import wave
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  f = np.asarray(f, np.float64)
  mel = 3.0 * f / 200.0
  log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
  return np.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
  m = np.asarray(m, np.float64)
  return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
  """[n_fft//2 + 1, n_mels] triangular filters, slaney area normalisation (as librosa/Whisper)."""
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
  lo, mid, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
  up = (fft_hz[None] - lo) / (mid - lo)
  down = (hi - fft_hz[None]) / (hi - mid)
  tri = np.maximum(0.0, np.minimum(up, down))
  tri *= (2.0 / (hi - lo))
  return tri.T.astype(np.float32)


def num_frames(num_samples: int, hop: int = HOP) -> int:
  return num_samples // hop


@partial(jax.jit, static_argnames=("n_fft", "hop", "n_mels", "sample_rate"))
def log_mel(wave_BxS: jax.Array, n_fft: int = N_FFT, hop: int = HOP, n_mels: int = N_MELS,
            sample_rate: int = SAMPLE_RATE) -> jax.Array:
  """Whisper log-mel of 16 kHz mono waveforms [B, S] -> [B, S // hop, n_mels]."""
  x = jnp.asarray(wave_BxS, jnp.float32)
  x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
  n = 1 + (x.shape[1] - n_fft) // hop
  idx_TxN = jnp.arange(n)[:, None] * hop + jnp.arange(n_fft)[None]
  window = jnp.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft), jnp.float32)
  frames_BxTxN = x[:, idx_TxN] * window
  spec = jnp.fft.rfft(frames_BxTxN, axis=-1)
  power_BxTxF = (jnp.real(spec) ** 2 + jnp.imag(spec) ** 2)[:, :-1]
  fb = jnp.asarray(mel_filterbank(n_mels, n_fft, sample_rate))
  mel_BxTxM = jnp.einsum("btf,fm->btm", power_BxTxF, fb, precision="highest")
  logm = jnp.log10(jnp.maximum(mel_BxTxM, 1e-10))
  logm = jnp.maximum(logm, jnp.max(logm, axis=(1, 2), keepdims=True) - 8.0)
  return (logm + 4.0) / 4.0


MEL_NORMS = ("none", "cmvn", "utt")


def normalize_mel(mel_BxTxM: jax.Array, kind: str = "none", eps: float = 1e-5) -> jax.Array:
  """Per-utterance normalisation of a log-mel [B, T, M]: "cmvn" subtracts each mel channel's mean
  over time and divides by its standard deviation (cepstral mean / variance normalisation, which
  removes a fixed spectral tilt: channel and part of the speaker's timbre); "utt" uses one mean and
  standard deviation over the whole clip (removes gain and dynamic-range differences only)."""
  if kind == "none":
    return mel_BxTxM
  if kind not in MEL_NORMS:
    raise ValueError(f"mel_norm must be one of {', '.join(MEL_NORMS)}; got {kind!r}")
  axes = (1,) if kind == "cmvn" else (1, 2)
  x = jnp.asarray(mel_BxTxM, jnp.float32)
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


SPEC_AUG_FIELDS = ("warp", "f_lo", "f_hi", "t1_lo", "t1_hi", "t2_lo", "t2_hi")


def spec_augment_params(rng: np.random.Generator, batch: int, n_frames: int = 100,
                        n_mels: int = N_MELS, warp: float = 0.1, max_f: int = 12,
                        max_t: int = 10) -> np.ndarray:
  """Random `spec_augment` parameters [batch, 7] (float32): a mel-axis warp factor in
  [1 - warp, 1 + warp], one frequency band of width 0..max_f bins and two time spans of width
  0..max_t frames (SpecAugment's masks; the warp approximates vocal-tract-length perturbation)."""
  out = np.zeros((batch, len(SPEC_AUG_FIELDS)), np.float32)
  out[:, 0] = rng.uniform(1 - warp, 1 + warp, batch)
  for lo, size, width in ((1, n_mels, max_f), (3, n_frames, max_t), (5, n_frames, max_t)):
    w = rng.integers(0, width + 1, batch)
    start = rng.integers(0, size - w + 1)
    out[:, lo], out[:, lo + 1] = start, start + w
  return out


def spec_augment(mel_BxTxM: jax.Array, params_Bx7: jax.Array) -> jax.Array:
  """Warp the mel axis (bin j takes the value at j * warp, linearly interpolated, clamped to the
  top bin) and set one mel band and two time spans [lo, hi) to the clip's mean (jittable)."""
  x = jnp.asarray(mel_BxTxM, jnp.float32)
  p = jnp.asarray(params_Bx7, jnp.float32)
  _, t, m = x.shape
  src_BxM = jnp.clip(jnp.arange(m, dtype=jnp.float32)[None] * p[:, :1], 0.0, m - 1.0)
  i0 = jnp.floor(src_BxM).astype(jnp.int32)
  i1 = jnp.minimum(i0 + 1, m - 1)
  frac = (src_BxM - i0)[:, None, :]
  take = lambda i: jnp.take_along_axis(x, jnp.broadcast_to(i[:, None, :], x.shape), axis=2)
  x = take(i0) * (1.0 - frac) + take(i1) * frac
  fill = jnp.mean(x, axis=(1, 2), keepdims=True)
  fi = jnp.arange(m, dtype=jnp.float32)[None, None, :]
  ti = jnp.arange(t, dtype=jnp.float32)[None, :, None]
  band = lambda idx, lo, hi: (idx >= p[:, lo, None, None]) & (idx < p[:, hi, None, None])
  masked = band(fi, 1, 2) | band(ti, 3, 4) | band(ti, 5, 6)
  return jnp.where(masked, fill, x)


def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
  """Play `x` `factor` times faster (resampling: duration / factor, pitch and formants x factor)."""
  from scipy.signal import resample_poly
  up = 50
  down = int(round(up * factor))
  if down == up:
    return np.asarray(x, np.float32)
  return resample_poly(np.asarray(x, np.float64), up, down).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Reading files: any sample rate, mono or stereo, 8/16/24/32-bit PCM or float WAV.


def to_mono(x: np.ndarray) -> np.ndarray:
  """[S] or [S, C] -> [S] float32 by averaging channels."""
  x = np.asarray(x)
  return (x.mean(axis=1) if x.ndim == 2 else x).astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling with a Kaiser-windowed anti-aliasing filter (scipy)."""
  if sr_in == sr_out:
    return np.asarray(x, np.float32)
  from math import gcd
  from scipy.signal import resample_poly
  g = gcd(int(sr_in), int(sr_out))
  return resample_poly(np.asarray(x, np.float64), sr_out // g, sr_in // g).astype(np.float32)


def read_wav(path_or_bytes) -> tuple[np.ndarray, int]:
  """(samples [S] or [S, C] float32 in [-1, 1], sample_rate). Raises ValueError if unreadable."""
  from scipy.io import wavfile
  src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
  try:
    sr, x = wavfile.read(src)
  except Exception as e:  # scipy raises ValueError / EOFError / struct.error on bad files
    raise ValueError(f"unreadable WAV: {e}") from None
  if x.dtype == np.uint8:
    x = (x.astype(np.float32) - 128.0) / 128.0
  elif np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
  x = x.astype(np.float32)
  if x.size == 0:
    raise ValueError("empty WAV")
  return x, int(sr)


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Read a WAV file, mix to mono, resample to `sample_rate`."""
  x, sr = read_wav(path)
  return resample(to_mono(x), sr, sample_rate)


def write_wav(path, x: np.ndarray, sample_rate: int) -> None:
  """16-bit PCM; x is [S] or [S, C] floats in [-1, 1]."""
  x = np.asarray(x, np.float32)
  pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm.tobytes())


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
  """Crop or zero-pad the end to exactly `length` samples."""
  return x[:length] if len(x) >= length else np.pad(x, (0, length - len(x)))


def trim_silence(x: np.ndarray, sample_rate: int = SAMPLE_RATE, top_db: float = 40.0,
                 frame: int = 320) -> np.ndarray:
  """Drop leading / trailing frames whose RMS is `top_db` below the loudest frame."""
  n = len(x) // frame
  if n == 0:
    return x
  rms = np.sqrt(np.mean(np.square(x[:n * frame].reshape(n, frame)), axis=1) + 1e-20)
  keep = np.nonzero(rms > rms.max() * 10 ** (-top_db / 20))[0]
  if len(keep) == 0:
    return x
  return x[keep[0] * frame:(keep[-1] + 1) * frame]


def place(x: np.ndarray, length: int, offset: int | None = None) -> np.ndarray:
  """Put x into a zero buffer of `length` samples at `offset` (centred if None), cropping."""
  if len(x) > length:
    start = (len(x) - length) // 2
    return x[start:start + length].astype(np.float32)
  offset = (length - len(x)) // 2 if offset is None else min(offset, length - len(x))
  out = np.zeros(length, np.float32)
  out[offset:offset + len(x)] = x
  return out
