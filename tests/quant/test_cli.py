"""`ds-jax quantize` on a workdir written by ds_jax.checkpoint."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax import checkpoint as ckpt
from ds_jax import quant
from ds_jax.cli import UsageError, main
from ds_jax.quant.cli import cli


@flax.struct.dataclass
class State:  # the fields of ds_jax.train.TrainState that matter here
  step: jax.Array
  params: dict
  frozen: dict


def params():
  rng = np.random.default_rng(0)
  return {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)},
          "layers_0": {"block": {"mlp": {"up_proj": {"kernel": jnp.asarray(
              rng.normal(size=(2, 256, 128)) * 0.02, jnp.float32)}},
              "input_layernorm": {"scale": jnp.ones((2, 256))}}}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp("wd")
  ckpt.write_config(str(w), {"model": {"hidden_size": 256}, "seed": 0})
  m = ckpt.manager(str(w))
  ckpt.save(m, 7, State(jnp.int32(7), params(), {}), force=True)
  m.wait_until_finished()
  return str(w)


def test_quantize_workdir(workdir, tmp_path, capsys):
  out = str(tmp_path / "q")
  assert cli(["--workdir", workdir, "--bits", "4", "--group-size", "128", "--out", out]) == 0
  line = capsys.readouterr().out
  assert "step 7: 1 tensors (65,536 parameters) -> int4 g128" in line
  loaded, meta = quant.load_packed(out, backend="dequant")
  assert meta["model_config"] == '{"hidden_size": 256}'
  k = loaded["layers_0"]["block"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(k, quant.PackedKernel) and k.bits == 4
  want = quant.fake_quantize(params(), quant.quant_config(4, 128))
  np.testing.assert_array_equal(np.asarray(k.dequantize()),
                                np.asarray(want["layers_0"]["block"]["mlp"]["up_proj"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(loaded["embed_tokens"]["embedding"]),
                                np.asarray(params()["embed_tokens"]["embedding"]))


@pytest.mark.parametrize("args,match", [
    (["--workdir", "/nonexistent/wd"], "no workdir"),
    (["--workdir", "{empty}"], "no config.json"),
    (["--workdir", "{wd}", "--group-size", "96"], "not divisible by group_size 96"),
    (["--workdir", "{wd}", "--bits", "3"], "invalid choice"),
])
def test_errors_are_one_line(args, match, workdir, tmp_path):
  args = [a.format(wd=workdir, empty=str(tmp_path)) for a in args]
  with pytest.raises(UsageError, match=match):
    cli(args + ["--out", str(tmp_path / "q")])


def test_dispatch_exit_code(tmp_path, capsys):
  assert main(["quantize", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: no workdir") and "\n" not in err
