"""A ds_jax LM as the tri-modal text tower (ds_jax.models.lm_tower)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ds_jax import checkpoint as ckpt
from ds_jax.config import model_config
from ds_jax.models import lm
from ds_jax.models import lm_tower as LT
from ds_jax.models.encoders import tokenize_bytes
from tests.helpers import tiny_cfg

TEXTS = ["seven", "a photo of the digit seven"]


def test_lm_tower_hidden_states_ignore_padding_and_pool_by_mask():
  cfg = LT.lm_tower_config(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, patch_frames=4))  # extra key ignored
  tokens = jnp.asarray(tokenize_bytes(TEXTS, 32))
  ids = jnp.asarray(np.frombuffer(b"seven", np.uint8).astype(np.int32))[None]
  tower = LT.LMTower(cfg)
  last_bos = LT.LMTower(cfg.replace(pooling="last", bos_id=256))

  @jax.jit
  def run(rng):  # one compile for everything below
    params = tower.init(rng, tokens)["params"]
    h, mask = tower.apply({"params": params}, tokens)
    _, aux = lm.Transformer(cfg.model).apply({"params": params["lm"]}, ids)
    return h, mask, aux["hidden"], last_bos.apply({"params": params}, tokens)

  h, mask, want, (pooled, pmask) = run(jax.random.key(0))
  assert h.shape == (2, 32, 32) and mask.sum(1).tolist() == [5, 26]
  # == the LM's own final hidden state on the unpadded byte ids (ByteTokenizer: byte b -> id b)
  np.testing.assert_allclose(h[0, :5], want[0], atol=1e-5)
  # mask-aware pooling
  hn, mn = np.asarray(h), np.asarray(mask)
  np.testing.assert_allclose(LT.pool(h, mask, "mean"),
                             np.stack([hn[i, mn[i]].mean(0) for i in range(2)]), atol=1e-5)
  np.testing.assert_allclose(LT.pool(h, mask, "last"), np.stack([hn[0, 4], hn[1, 25]]),
                             atol=1e-6)
  assert pooled.shape == (2, 1, 32) and pmask.shape == (2, 1)


def _lm_workdir(path):
  from ds_jax.train import TrainState
  wd = str(path)
  lc = tiny_cfg()
  mc = model_config(lc.model)
  ckpt.write_config(wd, lc.to_dict())
  lm_params = jax.tree.map(lambda a: a * 3, lm.init(mc, jax.random.key(1)))
  mngr = ckpt.manager(wd)
  tx = optax.adamw(1e-3)
  ckpt.save(mngr, 1, TrainState(step=jnp.int32(1), params=lm_params, opt_state=tx.init(lm_params),
                                frozen={}, skipped=jnp.int32(0)), force=True)
  mngr.wait_until_finished()
  return wd, mc, lm_params


def test_lm_tower_config_selection():
  from ds_jax import multimodal_train as MT
  c = MT.default_config()
  c.text_encoder = "lm"
  c.freeze = "text"
  c.model.text.pooling = "mean"
  mcfg = MT.model_config(c)
  assert isinstance(mcfg.text, LT.LMTowerConfig) and mcfg.frozen == ("text",)
  assert mcfg.text.pooling == "mean" and mcfg.text.model.hidden_size == 64
  assert mm_tower(mcfg) is LT.LMTower


def mm_tower(mcfg):
  from ds_jax.models import multimodal as mm
  return mm.tower_module("text", mcfg.text)


@pytest.mark.slow  # orbax save / restore: ~20 s on a shared core
def test_lm_tower_from_workdir_and_config_selection(tmp_path):
  """load_lm_tower reads a ds_jax LM workdir; text_encoder=lm + pretrained.text selects it."""
  from ds_jax import multimodal_train as MT
  wd, mc, lm_params = _lm_workdir(tmp_path / "lm")
  cfg, params = LT.load_lm_tower(wd)
  assert cfg.model == mc and cfg.bos_id == 256
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, lm_params)
  c = MT.default_config()
  c.text_encoder = "lm"
  c.pretrained.text = wd
  c.freeze = "text"
  mcfg = MT.model_config(c)
  assert isinstance(mcfg.text, LT.LMTowerConfig) and mcfg.text.model == mc
  assert mcfg.text.bos_id == 256 and mcfg.frozen == ("text",)
  c.pretrained.text = ""
  c.model.text.pooling = "mean"
  mcfg = MT.model_config(c)
  assert mcfg.text.pooling == "mean" and mcfg.text.model.hidden_size == 64


@pytest.mark.slow
def test_lm_text_tower_from_workdir_in_trimodal(tmp_path):
  """text_encoder=lm initialised from a ds_jax LM workdir (byte tokenizer), frozen."""
  from ds_jax import multimodal_train as MT
  from ds_jax.models import multimodal as mm
  wd, mc, lm_params = _lm_workdir(tmp_path / "lm")
  c = MT.default_config()
  c.text_encoder = "lm"
  c.pretrained.text = wd
  c.freeze = "text"
  mcfg = MT.model_config(c)
  assert isinstance(mcfg.text, LT.LMTowerConfig) and mcfg.text.model == mc
  assert mcfg.text.bos_id == 256 and mcfg.frozen == ("text",)
  example = {"image": np.zeros((2, 8, 8, 1), np.float32), "audio": np.zeros((2, 16000), np.float32),
             "text": tokenize_bytes(TEXTS, c.text_len), "label": np.arange(2, dtype=np.int32)}
  params = MT.init_state(c, mcfg, example)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params["text_tower"]["lm"],
               lm_params)
  z = mm.encode(mcfg, params, "text", jnp.asarray(example["text"]))
  assert z.shape == (2, c.model.embed_dim) and bool(jnp.isfinite(z).all())
