"""TriModal: embeddings computed alone (no leakage), CMAA reads the other modality, pairing modes."""

import jax
import pytest
import jax.numpy as jnp
import numpy as np

from ds_jax.models import multimodal as mm
from ds_jax.models.encoders import EncoderConfig

ENC = EncoderConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2)
CFG = mm.MultimodalConfig(text=ENC.replace(max_position_embeddings=8),
                          image=ENC.replace(patch_size=4), audio=ENC.replace(max_frames=16),
                          shared_width=16, embed_dim=8, pool_heads=2)


def _inputs(seed=0, b=6):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"text": jax.random.randint(k[0], (b, 8), 1, 100),
          "image": jax.random.uniform(k[1], (b, 8, 8, 1)),
          "audio": jax.random.normal(k[2], (b, 16, 80))}


PARAMS = mm.init_params(CFG, jax.random.key(0), _inputs())


def test_embeddings_do_not_see_other_modalities():
  x = _inputs()
  model = mm.TriModal(CFG)
  out = model.apply({"params": PARAMS}, x)
  other = dict(x, audio=x["audio"] * 3 + 1, text=x["text"][::-1])
  out2 = model.apply({"params": PARAMS}, other)
  np.testing.assert_allclose(out["image"], out2["image"], atol=1e-6)
  alone = model.apply({"params": PARAMS}, "image", x["image"], method=mm.TriModal.encode)
  np.testing.assert_allclose(out["image"], alone, atol=1e-6)
  # ... while the cross-modal block does read the other modality's tokens.
  assert float(jnp.abs(out["image_audio"] - out2["image_audio"]).max()) > 1e-5
  z = mm.encode(CFG, PARAMS, "image", x["image"])
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_hard_negatives_are_most_similar_other_class():
  za = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
  labels = jnp.array([0, 0, 1])
  neg = mm.hard_negatives(za, za, labels)
  np.testing.assert_array_equal(neg, [2, 2, 1])  # row 2: most similar of class 0 is item 1


def _grads(pairs, cmaa=True):
  cfg = CFG.__class__(**{**CFG.__dict__, "cmaa": cmaa, "pairs": pairs})
  x = _inputs()
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  f = lambda p: mm.tri_modal_loss(mm.TriModal(cfg), p, x, labels, pairs=pairs)
  (loss, aux), g = jax.value_and_grad(f, has_aux=True)(PARAMS)
  norm = lambda t: float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(t)))
  return loss, aux, g, norm


@pytest.mark.slow  # ~70 s: three pairing modes, each a separate gradient compile
def test_pairing_modes_route_gradients():
  loss, aux, g, norm = _grads(mm.ALL_PAIRS)
  assert np.isfinite(float(loss)) and "audio_text/cmaa_bce" in aux
  for name in ("text_tower", "image_tower", "audio_tower", "cmaa_audio_text", "log_t_audio_text"):
    assert norm(g[name]) > 0, name
  loss, aux, g, norm = _grads(mm.IMAGE_ANCHORED)
  assert "audio_text/loss" not in aux and "image_audio/cmaa_bce" in aux
  # audio and text are never compared directly: their pair's parameters get no gradient
  assert norm(g["cmaa_audio_text"]) == 0 and norm(g["log_t_audio_text"]) == 0
  assert norm(g["audio_tower"]) > 0 and norm(g["text_tower"]) > 0
  loss, aux, g, norm = _grads(mm.ALL_PAIRS, cmaa=False)
  assert not any("cmaa" in k for k in aux) and norm(g["cmaa_image_text"]) == 0


def test_mse_ramp_and_step_cache_key():
  from ds_jax import multimodal_train as T
  c = T.default_config()
  c.mse_ramp = (0.1, 0.4)
  assert T.mse_scale(c, 0, 100) == 0.0 and T.mse_scale(c, 10, 100) == 0.0
  assert abs(T.mse_scale(c, 25, 100) - 0.5) < 1e-9 and T.mse_scale(c, 40, 100) == 1.0
  c.alignment_loss = "mse"
  assert T.mse_scale(c, 0, 100) == 1.0  # MSE-only training is not ramped away
  a, b = T.default_config(), T.default_config()
  b.seed, b.data.seed, b.epochs = 3, 5, 2
  assert T._step_key(a, 10) == T._step_key(b, 10) != T._step_key(a, 11)
  b.cmaa = not a.cmaa
  assert T._step_key(a, 10) != T._step_key(b, 10)


def test_sigmoid_init_is_the_batch_prior_and_cmaa_ramps():
  import math
  from ds_jax import multimodal_train as T
  from ds_jax.config import load_config
  c = load_config("experiments/mm_digits.py:sigmoid", [])
  mcfg = T.model_config(c)
  # log-odds of a positive: 1 in 10 with class-aware positives ...
  assert abs(mcfg.init_bias - math.log(0.1 / 0.9)) < 1e-6
  assert abs(mcfg.init_log_t - math.log(10.0)) < 1e-6
  c.multi_positive = False  # ... 1 in batch_size with one positive per row
  assert abs(T.model_config(c).init_bias + math.log(c.batch_size - 1)) < 1e-6
  c.sigmoid_init_bias = -10.0  # SigLIP's published init, for large batches
  assert T.model_config(c).init_bias == -10.0
  # the model's bias / temperature parameters start there
  cfg = CFG.__class__(**{**CFG.__dict__, "contrastive": "sigmoid", "init_bias": -2.5,
                         "init_log_t": 1.5})
  p = mm.init_params(cfg, jax.random.key(0), _inputs())
  assert float(p["bias_image_text"]) == -2.5 and float(p["log_t_audio_text"]) == 1.5
  assert float(PARAMS["log_t_image_text"]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
  assert T.model_config(load_config("experiments/mm_digits.py:softmax", [])).init_bias is None
  c = T.default_config()
  c.cmaa_ramp = (0.2, 0.4)
  assert T.cmaa_scale(c, 10, 100) == 0.0 and T.cmaa_scale(c, 30, 100) == pytest.approx(0.5)
  assert T.cmaa_scale(c, 40, 100) == 1.0
  c.cmaa_ramp = (0.0, 0.0)
  assert T.cmaa_scale(c, 0, 100) == 1.0
