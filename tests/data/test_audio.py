"""Log-mel in JAX equals the NumPy Whisper feature extractor of transformers; WAV I/O, resampling."""

import numpy as np
import pytest

from ds_jax.data import audio


def _signal(n, sr=16000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / sr
  return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t)
          + 0.05 * rng.normal(size=n)).astype(np.float32)


def test_mel_filterbank_matches_transformers():
  au = pytest.importorskip("transformers.audio_utils")
  ref = au.mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0,
                           max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                           mel_scale="slaney")
  np.testing.assert_allclose(audio.mel_filterbank(), ref, atol=1e-7, rtol=1e-5)


def test_log_mel_matches_numpy_whisper_reference():
  tr = pytest.importorskip("transformers")
  fe = tr.WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160,
                                  n_fft=400, dither=0.0)
  x_BxS = np.stack([_signal(8000, seed=s) * (s + 1) for s in range(3)])
  ref_BxMxT = fe._np_extract_fbank_features(x_BxS.astype(np.float64), "cpu")
  got_BxTxM = np.asarray(audio.log_mel(x_BxS))
  assert got_BxTxM.shape == (3, 50, 80)
  np.testing.assert_allclose(got_BxTxM, ref_BxMxT.transpose(0, 2, 1), atol=1e-4)


def test_wav_roundtrip_stereo_and_resample(tmp_path):
  sr = 8000
  t = np.arange(sr) / sr
  tone = 0.5 * np.sin(2 * np.pi * 300 * t)
  path = tmp_path / "x.wav"
  audio.write_wav(path, np.stack([tone, tone], 1), sr)
  y = audio.load_audio(path)
  assert y.shape == (16000,)
  # a 300 Hz tone stays a 300 Hz tone at 16 kHz
  spec = np.abs(np.fft.rfft(y))
  assert abs(np.argmax(spec) * 16000 / len(y) - 300) < 2
  np.testing.assert_allclose(np.max(np.abs(y[1000:-1000])), 0.5, atol=0.01)
  with pytest.raises(ValueError):
    audio.read_wav(b"not a wav file at all")
