"""Config loading, overrides and validation: bad values are named in one line, exit code 2."""

import pytest

from ds_jax import cli
from ds_jax.config import (ConfigError, apply_override, base_config, load_config, mesh_shape,
                           model_config, validate)
from tests.helpers import run_cli, tiny_cfg


def test_load_and_override_types():
  cfg = load_config("experiments/tiny_lm.py:smoke",
                    ["model.hidden_size=96", "config.optimizer.learning_rate=1e-3",
                     "model.tie_word_embeddings=true", "mesh.data=-1"])
  assert cfg.model.hidden_size == 96 and isinstance(cfg.model.hidden_size, int)
  assert cfg.optimizer.learning_rate == 1e-3
  assert cfg.model.tie_word_embeddings is True
  mc = validate(cfg, 8)
  assert mc.hidden_size == 96 and mc.head_size == 24


@pytest.mark.parametrize("override,field", [
    ("model.hiden_size=3", "model.hiden_size"),           # misspelt key
    ("model.hidden_size=abc", "model.hidden_size"),       # wrong type
    ("optimizer.learning_rate=fast", "optimizer.learning_rate"),
    ("model.tie_word_embeddings=maybe", "model.tie_word_embeddings"),
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_override_rejected(override, field):
  cfg = base_config()
  cfg.lock()
  with pytest.raises(ConfigError) as e:
    apply_override(cfg, override)
  assert e.value.field == field


def _bad(**kw):
  cfg = tiny_cfg()
  for k, v in kw.items():
    section, _, name = k.rpartition("__")
    node = cfg[section] if section else cfg
    node[name] = v
  return cfg


@pytest.mark.parametrize("kw,field", [
    (dict(model__hidden_size=30), "model.hidden_size"),
    (dict(model__num_key_value_heads=3), "model.num_key_value_heads"),
    (dict(optimizer__learning_rate=-1.0), "optimizer.learning_rate"),
    (dict(optimizer__schedule="triangle"), "optimizer.schedule"),
    (dict(model__dtype="float16"), "model.dtype"),
    (dict(batch_size=6), "batch_size"),  # not divisible by 8 data shards
    (dict(optimizer__accumulation_steps=3), "optimizer.accumulation_steps"),
    (dict(seq_len=4096), "seq_len"),
    (dict(model__vocab_size=100), "model.vocab_size"),
    (dict(mesh__data=3), "mesh"),
    (dict(model__n_routed_experts=8, model__num_experts_per_tok=9,
          model__moe_intermediate_size=16), "model.num_experts_per_tok"),
    (dict(model__n_routed_experts=8, model__num_experts_per_tok=2, model__n_group=4,
          model__topk_group=5, model__moe_intermediate_size=16,
          model__topk_method="group_limited_greedy"), "model.topk_group"),
    (dict(model__n_routed_experts=6, model__num_experts_per_tok=2,
          model__moe_intermediate_size=16, mesh__data=2, mesh__expert=4), "model.n_routed_experts"),
    (dict(data__source="files", data__path="/nonexistent/*.txt"), "data.path"),
])
def test_validate_names_field(kw, field):
  with pytest.raises(ConfigError) as e:
    validate(_bad(**kw), 8)
  assert e.value.field == field, str(e.value)


def test_mesh_resolution():
  cfg = tiny_cfg()
  cfg.mesh.update(dict(data=-1, fsdp=2, expert=1, tensor=2))
  assert mesh_shape(cfg, 8) == dict(data=2, fsdp=2, expert=1, tensor=2)
  cfg.mesh.update(dict(data=-1, fsdp=3, expert=1, tensor=1))
  with pytest.raises(ConfigError):
    mesh_shape(cfg, 8)


def test_model_config_is_frozen():
  mc = model_config(tiny_cfg().model)
  with pytest.raises(Exception):
    mc.hidden_size = 3


def test_cli_bad_config_in_process(capsys, tmp_path):
  rc = cli.main(["train", "--config", "experiments/tiny_lm.py", "--config.model.hidden_sise=4",
                 "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1
  assert "model.hidden_sise" in err[0] and "hidden_size" in err[0]  # suggests the right key
  assert not (tmp_path / "w").exists()  # nothing written before validation


def test_cli_bad_config_subprocess(tmp_path):
  r = run_cli(["train", "--config", "experiments/tiny_lm.py", "--config.model.hidden_size=130",
               "--workdir", str(tmp_path / "w")])
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in r.stderr
  assert "model.hidden_size" in lines[0] and "num_attention_heads" in lines[0]
