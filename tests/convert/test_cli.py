"""`ds-jax convert` both ways, and `load_params` of a converted workdir."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ds_jax.config import from_json_dict, model_config  # noqa: E402
from ds_jax.convert import hf  # noqa: E402
from ds_jax.convert.cli import cli, load_params  # noqa: E402
from tests.convert.hf_models import save_case  # noqa: E402
from tests.convert.test_hf import _tiny_tokenizer  # noqa: E402


def _equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_from_hf_then_to_hf(tmp_path):
  src, work, out = str(tmp_path / "src"), str(tmp_path / "work"), str(tmp_path / "out")
  save_case("v2_group_limited_qlora", src)
  _tiny_tokenizer(src)
  assert cli(["--from-hf", src, "--workdir", work]) == 0
  with open(os.path.join(work, "config.json")) as f:
    cfg = from_json_dict(json.load(f))
  assert set(cfg) >= {"model", "optimizer", "data", "mesh", "checkpoint"}
  assert cfg.data.tokenizer == "hf" and os.path.exists(os.path.join(work, "tokenizer.json"))
  mc, want = hf.load_pretrained(src)
  assert model_config(cfg.model) == mc
  params = load_params(work)
  _equal(want, params)
  assert cli(["--to-hf", "--workdir", work, "--out", out, "--max-shard-gb", "0.00005"]) == 0
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  mc2, back = hf.load_pretrained(out)
  assert mc2 == mc
  _equal(want, back)


def test_errors_are_one_line_exit_2(tmp_path, capsys):
  src = str(tmp_path / "src")
  save_case("llama", src)
  with open(os.path.join(src, "config.json")) as f:
    c = json.load(f)
  c["model_type"] = "falcon"
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(c, f)
  capsys.readouterr()  # drop transformers' progress bars
  assert cli(["--from-hf", src, "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and "model_type: 'falcon'" in err and "\n" not in err
