"""Hugging Face conversion: logit parity with transformers for all four families, exact round
trips, errors that name the tensor or field, tokenizer loading."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ds_jax.convert import hf  # noqa: E402
from ds_jax.models import lm  # noqa: E402
from tests.convert.hf_models import CASES, build, hf_logits, save_case, tokens  # noqa: E402


def random_params(mc, seed: int) -> dict:
  """O(1) random float32 parameters in ds_jax's layout, without running the model's init."""
  rng = np.random.default_rng(seed)
  out: dict = {}
  for path, shape in hf.abstract_params(mc).items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = (rng.standard_normal(shape) * 0.3 + (path[-1] == "scale")).astype(
        np.float32)
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_logit_parity_with_transformers(name, tmp_path):
  model = save_case(name, str(tmp_path))
  mc, params = hf.load_pretrained(str(tmp_path))
  x = tokens(mc.vocab_size)
  want = hf_logits(model, x)
  got = np.asarray(lm.apply(mc, params, x))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  assert np.abs(want).max() > 0.5  # the comparison is not between near-zero logits


def test_config_fields_mapped(tmp_path):
  save_case("v3_noaux_qlora_yarn", str(tmp_path))
  mc, _ = hf.load_pretrained(str(tmp_path))
  assert (mc.model_type, mc.attention_type, mc.topk_method, mc.scoring_func) == (
      "deepseek_v3", "mla", "noaux_tc", "sigmoid")
  assert (mc.q_lora_rank, mc.kv_lora_rank, mc.n_group, mc.topk_group) == (12, 16, 4, 2)
  assert (mc.first_k_dense_replace, mc.n_shared_experts, mc.norm_topk_prob) == (1, 1, True)
  assert mc.routed_scaling_factor == 2.5 and mc.num_nextn_predict_layers == 0  # no MTP saved
  assert mc.rope_scaling.type == "yarn" and mc.rope_scaling.factor == 4.0
  assert mc.rope_scaling.mscale_all_dim == pytest.approx(0.707)


def test_config_reads_rope_parameters_and_legacy_keys():
  from ds_jax.convert.hf_config import from_hf_config
  base = dict(model_type="llama", vocab_size=16, hidden_size=8, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=8)
  new = from_hf_config({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                    "rope_theta": 5e5}})
  old = from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear",
                                                                     "factor": 2.0}})
  assert new.rope_theta == old.rope_theta == 5e5
  assert new.rope_scaling.to_dict() == old.rope_scaling.to_dict()
  mix = from_hf_config(dict(base, model_type="mixtral", num_local_experts=4,
                            num_experts_per_tok=2, router_aux_loss_coef=0.02))
  assert (mix.n_routed_experts, mix.aux_loss_alpha, mix.topk_method) == (4, 0.02, "mixtral")
  ds = from_hf_config(dict(base, model_type="deepseek_v2", q_lora_rank=None, kv_lora_rank=4,
                           qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, n_group=None,
                           topk_group=None, seq_aux=True, aux_loss_alpha=0.003))
  assert (ds.q_lora_rank, ds.n_group, ds.topk_group, ds.seq_aux_loss_alpha) == (0, 1, 1, 0.003)


@pytest.mark.parametrize("name", ["llama_tied_linear_headdim", "mixtral", "v2_group_limited_qlora",
                                  "v3_noaux_qlora_yarn"])
def test_round_trip_ds_to_hf_to_ds_is_exact(name, tmp_path):
  """Random ds_jax params -> HF directory (sharded) -> ds_jax: bit-identical; transformers
  loads the export and agrees with ds_jax."""
  save_case(name, str(tmp_path / "src"))
  mc, _ = hf.load_pretrained(str(tmp_path / "src"))
  params = random_params(mc, seed=1)
  files = hf.save_pretrained(mc, params, str(tmp_path / "out"), max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  mc2, back = hf.load_pretrained(str(tmp_path / "out"))
  assert mc2 == mc
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back)
  if name not in ("mixtral", "v3_noaux_qlora_yarn"):
    return  # transformers re-load checked on two families (each costs a forward pass)
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager").eval()
  x = tokens(mc.vocab_size, seed=3)
  np.testing.assert_allclose(np.asarray(lm.apply(mc, params, x)), hf_logits(model, x),
                             rtol=0, atol=1e-4)


def test_unscanned_layout_and_bf16_export(tmp_path):
  save_case("v2_greedy_yarn_tied", str(tmp_path / "src"))
  mc, scanned = hf.load_pretrained(str(tmp_path / "src"))
  mcu, flat = hf.load_pretrained(str(tmp_path / "src"), scan_layers=False)
  for i in range(mc.num_hidden_layers):  # layer i unstacked == slice of its scanned segment
    name, pos = lm.layer_location(mc, i)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[pos], np.asarray(b)),
                 scanned[name], flat[f"layer_{i}"])
  hf.save_pretrained(mcu, flat, str(tmp_path / "bf16"), dtype="bfloat16")
  _, back = hf.load_pretrained(str(tmp_path / "bf16"))
  leaf = back["layers_1"]["block"]["mlp"]["experts"]["up_proj"][0]
  want = flat["layer_1"]["block"]["mlp"]["experts"]["up_proj"]
  np.testing.assert_allclose(np.asarray(leaf), np.asarray(want), rtol=1e-2, atol=1e-2)


def test_mtp_round_trip(tmp_path):
  """DeepSeek-V3 multi-token prediction layers (model.layers.{L}) convert both ways."""
  save_case("v3_noaux_no_qlora_tied", str(tmp_path / "src"))
  mc, _ = hf.load_pretrained(str(tmp_path / "src"))
  mc = mc.replace(num_nextn_predict_layers=1)
  params = random_params(mc, seed=4)
  hf.save_pretrained(mc, params, str(tmp_path / "out"))
  mc2, back = hf.load_pretrained(str(tmp_path / "out"))
  assert mc2.num_nextn_predict_layers == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back)
  names = hf.Checkpoint(str(tmp_path / "out")).tensors
  assert "model.layers.3.eh_proj.weight" in names
  assert "model.layers.3.shared_head.head.weight" in names


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the field or tensor.


def _llama_dir(tmp_path):
  save_case("llama", str(tmp_path))
  return str(tmp_path)


def _edit_config(path, **kw):
  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  c.update(kw)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)


def test_unsupported_model_type(tmp_path):
  d = _llama_dir(tmp_path)
  _edit_config(d, model_type="gpt2")
  with pytest.raises(hf.UnsupportedModelError, match="model_type: 'gpt2'") as e:
    hf.load_pretrained(d)
  assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_shape_disagreeing_with_config(tmp_path):
  d = _llama_dir(tmp_path)
  _edit_config(d, intermediate_size=40)
  with pytest.raises(hf.ShapeMismatchError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight'"
                     r".*intermediate_size") as e:
    hf.load_pretrained(d)
  assert "\n" not in str(e.value)


def test_missing_tensor(tmp_path):
  d = _llama_dir(tmp_path)
  from safetensors.numpy import load_file, save_file
  t = load_file(os.path.join(d, "model.safetensors"))
  del t["model.layers.1.self_attn.k_proj.weight"]
  save_file(t, os.path.join(d, "model.safetensors"))
  with pytest.raises(hf.MissingTensorError, match="model.layers.1.self_attn.k_proj.weight") as e:
    hf.load_pretrained(d)
  assert "\n" not in str(e.value)


def test_unsupported_rope_type(tmp_path):
  d = _llama_dir(tmp_path)
  _edit_config(d, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4})
  with pytest.raises(hf.UnsupportedModelError, match="rope_scaling.type: 'llama3'"):
    hf.load_pretrained(d)


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _tiny_tokenizer(path):
  """A word-level tokenizer.json built with the `tokenizers` library (ids < the tiny vocab)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
  tok.save(os.path.join(path, "tokenizer.json"))


def test_tokenizer_loads_with_model_dir(tmp_path):
  d = _llama_dir(tmp_path)
  _tiny_tokenizer(d)
  tok = hf.load_tokenizer(d)
  ids = tok.encode("the lazy fox")
  assert tok.decode(ids) == "the lazy fox"
  assert (tok.bos_id, tok.eos_id) == (1, 2) and max(ids) < 96
  mc, params = hf.load_pretrained(d)
  logits = lm.apply(mc, params, np.asarray([ids], np.int32))
  assert logits.shape == (1, len(ids), mc.vocab_size)
  hf.save_pretrained(mc, params, str(tmp_path / "out"), tokenizer_dir=d)
  assert hf.load_tokenizer(str(tmp_path / "out")).encode("the lazy fox") == ids
