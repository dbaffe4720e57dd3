"""Encoders: ViT patching == a convolution, padding invariance, CLIP-vision parity with transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax.models import encoders as E
from ds_jax.models import hf_encoders

TINY = E.EncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4)


def test_vit_patch_embedding_is_a_strided_convolution():
  cfg = TINY.replace(image_size=8, patch_size=4, num_channels=3, num_hidden_layers=0)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  vit = E.ViT(cfg)
  params = E.nn.unbox(vit.init(jax.random.key(1), x)["params"])
  kernel = np.asarray(params["patch_embedding"]["kernel"]).reshape(4, 4, 3, 32)
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = conv.reshape(2, 4, 32) + params["patch_embedding"]["bias"] + params["position_embedding"]
  # With zero layers the output is post_layernorm(patches + positions).
  ln = E.nn.LayerNorm(cfg.layer_norm_eps)
  want = ln.apply({"params": params["post_layernorm"]}, conv)
  got, mask = vit.apply({"params": params}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert mask.shape == (2, 4) and bool(mask.all())


def test_text_encoder_ignores_padding():
  enc = E.TextEncoder(TINY)
  toks = E.tokenize_bytes(["seven", "a photo of the digit two"], 16)
  longer = np.pad(toks, ((0, 0), (0, 8)))
  params = E.nn.unbox(enc.init(jax.random.key(0), toks)["params"])
  a, ma = enc.apply({"params": params}, toks)
  b, mb = enc.apply({"params": params}, longer)
  np.testing.assert_allclose(np.asarray(a)[0, :5], np.asarray(b)[0, :5], atol=1e-5)
  assert int(ma[0].sum()) == 5 and toks[0, 0] == ord("s") + 1
  # bidirectional: the first token's state depends on the last real token
  changed = toks.copy()
  changed[0, 4] = ord("x") + 1
  c = enc.apply({"params": params}, changed)[0]
  assert float(jnp.abs(c[0, 0] - a[0, 0]).max()) > 1e-4


def test_audio_encoder_tokens():
  cfg = TINY.replace(patch_frames=4, max_frames=100)
  mel = jax.random.normal(jax.random.key(0), (2, 100, 80))
  enc = E.AudioEncoder(cfg)
  params = E.nn.unbox(enc.init(jax.random.key(1), mel)["params"])
  out, mask = enc.apply({"params": params}, mel)
  assert out.shape == (2, 25, 32)
  # frames past the last whole patch are dropped; frame 0 reaches every token via attention
  out2, _ = enc.apply({"params": params}, mel.at[:, 0].add(1.0))
  assert float(jnp.abs(out2 - out)[:, -1].max()) > 1e-4
  out3, _ = enc.apply({"params": params}, jnp.pad(mel, ((0, 0), (0, 3), (0, 0))))
  np.testing.assert_allclose(out3, out, atol=1e-6)


def test_clip_vision_parity_with_transformers():
  torch = pytest.importorskip("torch")
  tr = pytest.importorskip("transformers")
  hf_cfg = tr.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, image_size=16, patch_size=4,
                               num_channels=3, hidden_act="quick_gelu")
  torch.manual_seed(0)
  model = tr.CLIPVisionModel(hf_cfg).eval()
  with torch.no_grad():  # non-trivial layer-norm parameters
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(x))
    vm = getattr(model, "vision_model", model)  # transformers 5 flattened CLIPVisionModel
    want_tokens = vm.post_layernorm(out.last_hidden_state).numpy()
    want_pooled = out.pooler_output.numpy()
  cfg = hf_encoders.clip_vision_config(hf_cfg)
  params = hf_encoders.clip_vision_params(model.state_dict(), cfg)
  # shapes agree with a freshly initialised ViT
  fresh = E.nn.unbox(E.ViT(cfg).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, params)
  got, _ = E.ViT(cfg).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want_tokens, atol=1e-4)
  np.testing.assert_allclose(got[:, 0], want_pooled, atol=1e-4)


def test_audio_conv_stem_and_pixel_normalisation():
  cfg = TINY.replace(patch_frames=4, max_frames=100, audio_stem="conv")
  mel = jax.random.normal(jax.random.key(0), (2, 100, 80))
  enc = E.AudioEncoder(cfg)
  params = E.nn.unbox(enc.init(jax.random.key(1), mel)["params"])
  out, mask = enc.apply({"params": params}, mel)
  assert out.shape == (2, 25, 32) and mask.shape == (2, 25)  # same token count as the patch stem
  assert sorted(k for k in params if k.startswith("conv")) == ["conv1", "conv2", "conv3"]
  with pytest.raises(ValueError):
    E.AudioEncoder(cfg.replace(patch_frames=3)).init(jax.random.key(1), mel)
  # pixel_mean / pixel_std standardise the image inside the ViT
  img = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  vit = E.ViT(TINY.replace(patch_size=2))
  vp = E.nn.unbox(vit.init(jax.random.key(3), img)["params"])
  normed = E.ViT(TINY.replace(patch_size=2, pixel_mean=0.3, pixel_std=0.4))
  np.testing.assert_allclose(normed.apply({"params": vp}, img)[0],
                             vit.apply({"params": vp}, (img - 0.3) / 0.4)[0], atol=1e-5)


def test_audio_encoder_mel_norm_is_applied_before_the_stem():
  from ds_jax.data.audio import normalize_mel
  mel = jax.random.normal(jax.random.key(0), (2, 100, 80)) + jnp.linspace(-2, 2, 80)
  plain = E.AudioEncoder(TINY.replace(patch_frames=4, max_frames=100))
  params = E.nn.unbox(plain.init(jax.random.key(1), mel)["params"])
  normed = E.AudioEncoder(TINY.replace(patch_frames=4, max_frames=100, mel_norm="cmvn"))
  got, _ = normed.apply({"params": params}, mel)  # same parameters: normalisation has none
  np.testing.assert_allclose(got, plain.apply({"params": params}, normalize_mel(mel, "cmvn"))[0],
                             atol=1e-5)
  # and a gain change (constant shift of the log-mel) no longer changes the tokens
  np.testing.assert_allclose(normed.apply({"params": params}, mel + 0.5)[0], got, atol=1e-4)
