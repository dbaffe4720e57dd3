"""wav2vec2 tower: output parity with transformers' Wav2Vec2Model (tiny random models)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.models import hf_wav2vec2 as W

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
            num_feat_extract_layers=3, mask_time_prob=0.0, layerdrop=0.0)
VARIANTS = {
    # wav2vec2-base: group norm after conv 0, no conv bias, post-norm stack, even pos kernel
    "base": dict(feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
    # large-lv60 / "stable": layer norm after every conv, conv bias, pre-norm stack, odd kernel
    "large": dict(feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
                  num_conv_pos_embeddings=15, num_conv_pos_embedding_groups=2),
}


def _hf_model(variant):
  hf_cfg = tr.Wav2Vec2Config(**TINY, **VARIANTS[variant])
  torch.manual_seed(0)
  model = tr.Wav2Vec2Model(hf_cfg).eval()
  with torch.no_grad():  # non-trivial norm parameters and biases
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias") or "original0" in n or "weight_g" in n:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("variant", ["base", "large"])
def test_wav2vec2_parity_with_transformers(variant):
  model = _hf_model(variant)
  cfg, params = W.load_wav2vec2(model)
  assert cfg.do_stable_layer_norm == (variant == "large")
  net = W.Wav2Vec2(cfg)
  # shapes agree with a freshly initialised tower
  fresh = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 1600))))
  assert (jax.tree.map(np.shape, W.nn.unbox(fresh)["params"]) ==
          jax.tree.map(np.shape, params))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 1600)).astype(np.float32)
  lengths = np.array([1600, 1000])
  mask = np.arange(1600)[None] < lengths[:, None]
  x_pad = np.where(mask, x, 0.0).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x)).last_hidden_state.numpy()
    want_pad = model(torch.from_numpy(x_pad),
                     attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
    want_short = model(torch.from_numpy(x[1:, :1000])).last_hidden_state.numpy()
  # one compiled call: rows 0-1 unpadded (all-ones mask == no mask), rows 2-3 padded + mask
  got, fmask = jax.jit(net.apply)({"params": params}, jnp.asarray(np.concatenate([x, x_pad])),
                                  jnp.asarray(np.concatenate([np.ones_like(mask), mask])))
  got, got_pad = np.asarray(got[:2]), np.asarray(got[2:])
  n_all, n_valid = cfg.frames(1600), cfg.frames(1000)
  assert got.shape == want.shape == (2, n_all, 32)
  assert np.asarray(fmask).sum(1).tolist() == [n_all, n_all, n_all, n_valid]
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(got_pad, want_pad, atol=1e-4)
  # with the mask, the valid frames of the padded clip do not see the padding (layer-norm
  # feature encoder only: base's GroupNorm over time sees the zeros, as in fairseq / HF)
  if variant == "large":
    np.testing.assert_allclose(got_pad[1, :n_valid], want_short[0], atol=1e-4)
  else:
    assert np.abs(got_pad[1, :n_valid] - want_short[0]).max() > 1e-3


def test_wav2vec2_config_from_dict_and_normalize():
  d = tr.Wav2Vec2Config(**TINY, **VARIANTS["base"]).to_dict()
  cfg = W.wav2vec2_config(d)
  assert cfg.conv_dim == (16, 16, 16) and cfg.feat_extract_norm == "group"
  assert cfg.tower_cls is W.Wav2Vec2
  x = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 500)).astype(np.float32)
  m = np.arange(500)[None] < np.array([[500], [300]])
  fe = tr.Wav2Vec2FeatureExtractor(do_normalize=True)
  want = fe.zero_mean_unit_var_norm([x[0], x[1]], m.astype(np.int32))
  got = np.asarray(W.normalize_waveform(jnp.asarray(x), jnp.asarray(m)))
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_wav2vec2_tower_selection_and_lit_optimizer_mask():
  from ds_jax import multimodal_train as MT
  from ds_jax.config import ConfigError
  c = MT.default_config()
  c.audio_encoder = "wav2vec2"
  with pytest.raises(ConfigError, match="audio_processor"):  # wav2vec2 needs waveforms
    MT.model_config(c)
  c.audio_processor = "waveform"
  c.model.audio.update(dict(conv_dim=[8, 8], conv_stride=[5, 4], conv_kernel=[10, 4]))
  mcfg = MT.model_config(c)
  a = mcfg.audio  # the model.audio fields that are wav2vec2 fields; patch_frames etc. ignored
  assert isinstance(a, W.Wav2Vec2Config) and a.hidden_size == c.model.audio.hidden_size
  assert (a.conv_dim, a.conv_stride, a.conv_kernel) == ((8, 8), (5, 4), (10, 4))
  assert a.num_hidden_layers == c.model.audio.num_hidden_layers and a.feat_extract_norm == "group"
  assert mcfg.frozen == ()
  c.freeze = "audio,sound"
  with pytest.raises(ConfigError, match="freeze"):
    MT.model_config(c)
  c.freeze = "image,audio"
  assert MT.model_config(c).frozen == ("image", "audio")
  params = {"audio_tower": {"w": jnp.ones((2, 2))}, "image_tower": {"w": jnp.ones((2, 2))},
            "text_tower": {"w": jnp.ones((2, 2))}, "audio_head": {"w": jnp.ones((2, 2))}}
  tx = MT.make_optimizer(c, 10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
  assert not updates["audio_tower"]["w"].any() and not updates["image_tower"]["w"].any()
  assert updates["text_tower"]["w"].all() and updates["audio_head"]["w"].all()


@pytest.mark.slow
def test_wav2vec2_audio_tower_in_trimodal_pretrained_and_frozen(tmp_path):
  """audio_encoder=wav2vec2 from a HF directory, frozen (LiT): one train step leaves it as
  loaded while the other towers move."""
  from ds_jax import multimodal_train as MT
  from ds_jax.models import multimodal as mm
  from ds_jax.models.encoders import tokenize_bytes
  model = _hf_model("large")
  model.save_pretrained(str(tmp_path))
  c = MT.default_config()
  c.audio_encoder, c.audio_processor = "wav2vec2", "waveform"
  c.pretrained.audio = str(tmp_path)
  c.freeze = "audio"
  c.cmaa = False
  small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
  c.model.text.update(small)
  c.model.image.update(small)
  c.model.shared_width = c.model.embed_dim = 16
  mcfg = MT.model_config(c)
  assert isinstance(mcfg.audio, W.Wav2Vec2Config) and mcfg.frozen == ("audio",)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(4, 8, 8, 1)).astype(np.float32),
           "audio": rng.normal(size=(4, 1600)).astype(np.float32),
           "text": tokenize_bytes(["one", "two", "three", "four"], 32),
           "label": np.arange(4, dtype=np.int32)}
  params = MT.init_state(c, mcfg, batch)
  want = W.load_wav2vec2(model)[1]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params["audio_tower"], want)
  before = jax.tree.map(np.asarray, params)
  tx = MT.make_optimizer(c, 10)
  step = MT.make_train_step(c, mcfg, tx)
  opt_state = tx.init(params)
  for _ in range(2):  # the first step has learning rate 0 (warmup from 0)
    params, opt_state, m = step(params, opt_state, batch)
    assert np.isfinite(float(m["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params["audio_tower"],
               before["audio_tower"])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       params["image_tower"], before["image_tower"])
  assert max(jax.tree.leaves(moved)) > 0
  # the audio input is the normalised raw waveform (also in evaluation)
  np.testing.assert_allclose(mm.audio_features(mcfg, jnp.asarray(batch["audio"])),
                             W.normalize_waveform(jnp.asarray(batch["audio"])), atol=1e-6)
