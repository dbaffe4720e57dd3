"""Nibble packing, the safetensors export / loader, and true on-disk size."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds_jax import quant
from ds_jax.quant.matmul import unpack_int4
from ds_jax.quant.pack import pack_int4


def ref_unpack(b, n):
  """Low nibble first, two's complement."""
  lo, hi = (b & 0xF).astype(np.int8), (b >> 4).astype(np.int8)
  v = np.stack([lo, hi], -1).reshape(*b.shape[:-1], -1)[..., :n]
  return np.where(v > 7, v - 16, v).astype(np.int8)


@pytest.mark.parametrize("shape", [(16,), (3, 7), (2, 5, 1), (4, 1)])
def test_pack_unpack_round_trip_exact(shape):
  q = np.random.default_rng(0).integers(-8, 8, size=shape).astype(np.int8)
  b = pack_int4(q)
  assert b.dtype == np.uint8 and b.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
  np.testing.assert_array_equal(ref_unpack(b, shape[-1]), q)
  np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(b), shape[-1]), np.int8), q)


def test_pack_layout_low_nibble_first():
  assert pack_int4(np.array([1, 2, -8, -1], np.int8)).tolist() == [0x21, 0xF8]
  assert pack_int4(np.array([7], np.int8)).tolist() == [0x07]  # odd: zero pad nibble


def test_pack_errors():
  with pytest.raises(ValueError, match="-8, 7"):
    pack_int4(np.array([8], np.int8))
  with pytest.raises(ValueError, match="integers"):
    pack_int4(np.array([0.5]))
  with pytest.raises(ValueError, match="cannot unpack"):
    unpack_int4(jnp.zeros((3,), jnp.uint8), 8)


def kernels(rng, stack=(2,), k=256, n=(512,)):
  w = rng.normal(size=stack + (k,) + n).astype(np.float32) * 0.02
  e = rng.normal(size=(2, 4, 64, 32)).astype(np.float32) * 0.02
  return {"layers_0": {"block": {"mlp": {"up_proj": {"kernel": jnp.asarray(w)},
                                         "experts": {"down_proj": jnp.asarray(e)}},
                                 "input_layernorm": {"scale": jnp.ones((2, 256))}}}}


@pytest.mark.parametrize("bits,group,symmetric,scale_dtype", [
    (4, 32, False, "float32"), (8, 0, True, "bfloat16")])  # g16 sym bf16: test_matmul
def test_save_load_round_trip(tmp_path, bits, group, symmetric, scale_dtype):
  params = kernels(np.random.default_rng(1))
  qcfg = quant.quant_config(bits, group, symmetric=symmetric, scale_dtype=scale_dtype)
  qp = quant.quantize_params(params, qcfg, backend="dequant")
  up = qp["layers_0"]["block"]["mlp"]["up_proj"]["kernel"]
  assert up.qweight.dtype == (jnp.int4 if bits == 4 else jnp.int8) and up.shape == (2, 256, 512)
  quant.save_packed(str(tmp_path), qp, qcfg, {"model_config": "{}"})
  loaded, meta = quant.load_packed(str(tmp_path), backend="dequant")
  assert meta["format_version"] == str(quant.FORMAT_VERSION) and meta["model_config"] == "{}"
  assert json.load(open(tmp_path / "quant.json"))["tensors"]["layers_0/block/mlp/up_proj/kernel"][
      "bits"] == bits
  a, b = jax.tree.leaves(qp), jax.tree.leaves(loaded)
  assert jax.tree.structure(qp) == jax.tree.structure(loaded)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                  np.asarray(y.astype(jnp.float32)))
  # dequantized packed weights == fake-quantized weights
  fq = quant.fake_quantize(params, qcfg)
  e_fq = fq["layers_0"]["block"]["mlp"]["experts"]["down_proj"]
  e_pk = loaded["layers_0"]["block"]["mlp"]["experts"]["down_proj"].dequantize()
  np.testing.assert_allclose(np.asarray(e_pk), np.asarray(e_fq), rtol=0, atol=1e-7)


def test_on_disk_size_ratio(tmp_path):
  """True file bytes of the packed export vs a float32 safetensors file of the same tensors."""
  from safetensors.numpy import save_file
  params = kernels(np.random.default_rng(2))
  qcfg = quant.quant_config(4, 128)
  kern = {p: np.asarray(v) for p, v in
          [("up", params["layers_0"]["block"]["mlp"]["up_proj"]["kernel"]),
           ("down", params["layers_0"]["block"]["mlp"]["experts"]["down_proj"])]}
  save_file(kern, str(tmp_path / "f32.safetensors"))
  f32 = quant.file_bytes(str(tmp_path / "f32.safetensors"))
  only_kernels = {"layers_0": {"block": {"mlp": {k: v for k, v in params["layers_0"]["block"][
      "mlp"].items()}}}}
  for group, symmetric, bound in ((128, True, 0.135), (32, True, 0.16), (32, False, 0.16)):
    q = quant.quant_config(4, group, symmetric=symmetric)
    out = tmp_path / f"q{group}{symmetric}"
    quant.save_packed(str(out), quant.quantize_params(only_kernels, q, backend="dequant"), q)
    ratio = quant.file_bytes(str(out / "model.safetensors")) / f32
    assert 0.12 < ratio <= bound, (group, symmetric, ratio)
  assert os.path.getsize(out / "model.safetensors") == quant.file_bytes(str(out / "model.safetensors"))
  del qcfg


def test_loader_rejects_other_files(tmp_path):
  from safetensors.numpy import save_file
  save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"),
            metadata={"format": "pt"})
  with pytest.raises(ValueError, match="not a ds_jax.packed"):
    quant.load_packed(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    quant.load_packed(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="backend"):
    quant.load_packed(str(tmp_path), backend="int4")
