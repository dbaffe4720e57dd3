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


def test_spec_augment_identity_warp_and_masks():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 20, 16)).astype(np.float32)
  p = np.zeros((2, 7), np.float32)
  p[:, 0] = 1.0  # no warp, empty masks
  np.testing.assert_array_equal(np.asarray(audio.spec_augment(x, p)), x)
  p[0, 0] = 0.5  # output bin j reads input bin j / 2 (linear interpolation)
  y = np.asarray(audio.spec_augment(x, p))
  np.testing.assert_allclose(y[0, :, 6], x[0, :, 3], atol=1e-6)
  np.testing.assert_allclose(y[0, :, 7], (x[0, :, 3] + x[0, :, 4]) / 2, atol=1e-6)
  np.testing.assert_array_equal(y[1], x[1])
  p[0, 0] = 1.0
  p[1] = [1.0, 2, 5, 3, 4, 10, 13]  # mel bins 2..4, frames 3 and 10..12 -> the clip's mean
  y = np.asarray(audio.spec_augment(x, p))
  masked = np.zeros((20, 16), bool)
  masked[:, 2:5] = masked[3] = masked[10:13] = True
  np.testing.assert_allclose(y[1][masked], x[1].mean(), atol=1e-6)
  np.testing.assert_array_equal(y[1][~masked], x[1][~masked])
  q = audio.spec_augment_params(rng, 64, n_frames=20, n_mels=16, warp=0.1, max_f=4, max_t=3)
  assert q.shape == (64, 7) and np.all(np.abs(q[:, 0] - 1) <= 0.1)
  assert np.all(q[:, 2] - q[:, 1] <= 4) and np.all(q[:, 2] <= 16) and np.all(q[:, 6] <= 20)


def test_speed_perturb_changes_duration_and_pitch():
  sr, n = 16000, 8000
  x = np.sin(2 * np.pi * 200 * np.arange(n) / sr).astype(np.float32)
  y = audio.speed_perturb(x, 1.2)
  assert abs(len(y) - n / 1.2) <= 2
  spec = np.abs(np.fft.rfft(y[500:-500]))
  f = np.argmax(spec) * sr / len(y[500:-500])
  assert abs(f - 240) < 5  # 200 Hz played 1.2x faster
  np.testing.assert_array_equal(audio.speed_perturb(x, 1.0), x)


def test_normalize_mel_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 100, 80)).astype(np.float32) * 2 + 1.5
  x[1] *= np.linspace(0.2, 3.0, 80)  # per-channel scales: cmvn and utt differ
  np.testing.assert_array_equal(audio.normalize_mel(x, "none"), x)
  for kind, axes in (("cmvn", (1,)), ("utt", (1, 2))):
    want = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    got = np.asarray(audio.normalize_mel(x, kind))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # invariant to a per-clip gain in dB (a constant shift of the log-mel) and to the scale
    np.testing.assert_allclose(audio.normalize_mel(3.0 * x - 0.7, kind), got, atol=1e-4)
  # cmvn also removes a fixed per-channel offset (a channel's spectral tilt); utt does not
  tilt = np.linspace(-1, 1, 80, dtype=np.float32)
  np.testing.assert_allclose(audio.normalize_mel(x + tilt, "cmvn"), audio.normalize_mel(x, "cmvn"),
                             atol=1e-4)
  assert np.abs(np.asarray(audio.normalize_mel(x + tilt, "utt")
                           - audio.normalize_mel(x, "utt"))).max() > 1e-2
  with pytest.raises(ValueError):
    audio.normalize_mel(x, "bogus")
