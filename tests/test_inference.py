"""`ds_jax.load(...).infer(...)`, `load_params`, `ds-jax generate`: workdir, packed int4 export,
Hugging Face directory, adapters."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ds_jax import checkpoint as ckpt
from ds_jax import generate as g
from ds_jax import lora
from ds_jax.config import model_config
from ds_jax.data.tokenizer import ByteTokenizer
from ds_jax.inference import Model, load, load_params
from ds_jax.models import lm
from ds_jax.train import TrainState
from tests.helpers import tiny_cfg


def _scaled(params):
  return jax.tree.map(lambda a: a * 4 if a.ndim >= 2 else a, params)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir as training leaves it: config.json and two orbax TrainState checkpoints whose
  params are sharded over the 8 test devices; returns (path, cfg, newest params)."""
  wd = str(tmp_path_factory.mktemp("wd"))
  cfg = tiny_cfg()
  mc = model_config(cfg.model)
  ckpt.write_config(wd, cfg.to_dict())
  mesh = jax.make_mesh((8,), ("data",))
  tx = optax.adamw(1e-3)
  mngr = ckpt.manager(wd)
  for step in (1, 2):
    params = _scaled(lm.init(mc, jax.random.key(step)))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = TrainState(step=jnp.int32(step), params=params, opt_state=tx.init(params), frozen={},
                       skipped=jnp.int32(0))
    ckpt.save(mngr, step, state, force=True)
  mngr.wait_until_finished()
  return wd, cfg, jax.device_get(params)


def test_load_params_reads_the_newest_checkpoint(workdir):
  wd, _, params = workdir
  got = load_params(wd)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, b)


def test_infer_greedy_equals_generate_text(workdir):
  wd, cfg, params = workdir
  model = load(wd)
  assert isinstance(model, Model) and isinstance(model.tokenizer, ByteTokenizer)
  text = model.infer("The ", max_tokens=12, temperature=0.0)
  assert isinstance(text, str)
  mc = model_config(cfg.model)
  assert text == g.generate_text(mc, params, ByteTokenizer(), "The ", 12, temperature=0.0)
  a = model.infer("The ", max_tokens=12, temperature=0.9, seed=4)
  assert a == model.infer("The ", max_tokens=12, temperature=0.9, seed=4)
  assert len(model.infer_batch(["a", "longer prompt"], max_tokens=4)) == 2


def test_seed_adapter_api_and_adapter_loading(workdir):
  wd, _, _ = workdir
  model = load(wd)
  base = model.infer("x", max_tokens=8, temperature=0.0)
  model.add_adapter("financial_domain", lora.LoRAAdapter(target_modules=["q_proj", "v_proj"],
                                                         r=64, lora_alpha=32, dropout=0.1))
  assert model.active_adapter == "financial_domain"
  assert model.infer("x", max_tokens=8, temperature=0.0) == base  # B = 0 at initialisation
  model.add_adapter("fin", lora.LoRAAdapter(["q_proj", "v_proj"], r=4))
  model.params = jax.tree_util.tree_map_with_path(  # a trained adapter: B != 0
      lambda p, x: x + 0.5 if "'fin'" in jax.tree_util.keystr(p) and "lora_b" in
      jax.tree_util.keystr(p) else x, model.params)
  tuned = model.infer("x", max_tokens=8, temperature=0.0)
  assert tuned != base
  model.save_adapter(os.path.join(wd, "adapters", "fin"))
  loaded = load(wd, adapter="fin")
  assert loaded.active_adapter == "fin" and loaded.adapters == ["fin"]
  assert loaded.infer("x", max_tokens=8, temperature=0.0) == tuned


def test_int4_on_load_and_from_a_packed_export(workdir, tmp_path):
  from ds_jax.quant import PackedKernel, quant_config
  from ds_jax.quant.cli import quantize_checkpoint
  wd, cfg, params = workdir
  model = load(wd, quant="int4")
  kernels = [x for x in jax.tree.leaves(model.params, is_leaf=lambda x: isinstance(
      x, PackedKernel)) if isinstance(x, PackedKernel)]
  assert kernels and all(k.bits == 4 for k in kernels)
  text = model.infer("The ", max_tokens=6, temperature=0.0)
  out = str(tmp_path / "q")
  quantize_checkpoint(cfg.to_dict(), params, out, quant_config(bits=4, group_size=32))
  packed = load(out)
  assert any(isinstance(x, PackedKernel) for x in jax.tree.leaves(
      packed.params, is_leaf=lambda x: isinstance(x, PackedKernel)))
  assert isinstance(packed.infer("The ", max_tokens=6, temperature=0.0), str)
  assert isinstance(text, str)


def test_hugging_face_directory(workdir, tmp_path):
  from ds_jax.convert.hf import save_pretrained
  _, cfg, params = workdir
  mc = model_config(cfg.model)
  save_pretrained(mc, params, str(tmp_path / "hf"))
  model = load(str(tmp_path / "hf"))
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6)
  assert model.infer("ab", max_tokens=5, temperature=0.0) == g.generate_text(
      mc, params, ByteTokenizer(), "ab", 5, temperature=0.0)


def test_generate_cli(workdir, capsys):
  from ds_jax.cli import main
  wd, cfg, params = workdir
  assert main(["generate", "--workdir", wd, "--prompt", "Hi", "--max-tokens", "5",
               "--temperature", "0"]) == 0
  expected = g.generate_text(model_config(cfg.model), params, ByteTokenizer(), "Hi", 5, 0.0)
  assert capsys.readouterr().out == "Hi" + expected + "\n"
  assert main(["generate", "--workdir", wd, "--prompt", "Hi", "--max-tokens", "0"]) == 2
  assert main(["generate", "--workdir", os.path.join(wd, "nope"), "--prompt", "Hi"]) == 2
