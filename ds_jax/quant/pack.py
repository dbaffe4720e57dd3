"""Packed integer export (format "ds_jax.packed", version 1), its loader, and nibble packing.

In memory a quantized kernel is a `PackedKernel` holding jnp.int4 / int8 values in the kernel's
own shape (int4 is half a byte per element on device); on disk int4 is packed two per byte.


One safetensors file, `model.safetensors`, plus its metadata (also written as `quant.json`):
  - a quantized kernel at path P (shape `[*stacked, K, *out]`, N = prod(out), G groups along K):
      `P:qweight`  uint8 `[*stacked, K, ceil(N/2)]` for 4 bits: two int4 values per byte, the
                   element with the even index in the low nibble (odd N: zero pad nibble);
                   int8 `[*stacked, K, N]` for 8 bits. Values on the signed grid
                   [-2^(b-1), 2^(b-1) - 1].
      `P:scale`    bfloat16 or float32 `[*stacked, G, N]`
      `P:zero`     same dtype and shape (asymmetric rules only); w ≈ (q - zero) * scale
  - every other leaf at path P: `P`, as saved (float32).
  - metadata (all strings): format="ds_jax.packed", format_version="1", quant_config (QuantConfig
    JSON: rules, scale dtype), tensors (JSON {P: {bits, out_dims, group_size, symmetric}}), and
    any extra entries the caller adds (e.g. model_config).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ds_jax.quant import calibrate as cal
from ds_jax.quant.config import QuantConfig, path_str, stacked_axes
from ds_jax.quant.matmul import PackedKernel, unpack_int4

FORMAT = "ds_jax.packed"
FORMAT_VERSION = 1
FILENAME = "model.safetensors"


def pack_int4(q: np.ndarray) -> np.ndarray:
  """int [..., n] in [-8, 7] -> uint8 [..., ceil(n/2)], low nibble first."""
  q = np.asarray(q)
  if not np.issubdtype(q.dtype, np.integer):
    raise ValueError(f"pack_int4 needs integers; got {q.dtype}")
  if q.size and (q.min() < -8 or q.max() > 7):
    raise ValueError(f"int4 values must lie in [-8, 7]; got [{q.min()}, {q.max()}]")
  if q.shape[-1] % 2:
    q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
  u = (q.astype(np.int16) & 0xF).astype(np.uint8)
  return u[..., 0::2] | (u[..., 1::2] << 4)


def default_backend() -> str:
  """int8 x int8 -> int32 dots on CPU (W4A8), dequantize-then-matmul on accelerators."""
  return "int8" if jax.default_backend() == "cpu" else "dequant"


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _quantize_leaf(w, lsq_scale, rule, n_stack, scale_dtype):
  """(int4/int8 values in w's shape, scale [*stacked, G, N], zero or None) of one kernel."""
  wg = cal.grouped(w, n_stack, rule.group_size)
  if lsq_scale is not None:
    s, z = cal.round_scale(jnp.abs(lsq_scale) + 1e-12, scale_dtype), None
  else:
    s, z = cal.calibrate(wg, rule.bits, rule.symmetric, rule.calibration, scale_dtype)
  q = cal.quantize(wg, s, z, rule.bits).reshape(w.shape)
  q = q.astype(jnp.int8).astype(jnp.int4 if rule.bits == 4 else jnp.int8)
  sd = jnp.dtype(scale_dtype)
  return q, jnp.squeeze(s, -2).astype(sd), None if z is None else jnp.squeeze(z, -2).astype(sd)


def quantize_params(params: Any, qcfg: QuantConfig, qstate: Optional[dict] = None,
                    backend: str = "auto", act_bits: Optional[int] = None) -> Any:
  """Round-to-nearest quantization: matched kernels become PackedKernel (in memory).

  act_bits: activation bits of the packed matmuls (default: the rule's, or 8 for the int8
  backend, which always quantizes activations).
  """
  backend = default_backend() if backend == "auto" else backend
  qstate = qstate or {}

  def visit(path, leaf):
    p = path_str(path)
    rule = qcfg.rule_for(p)
    if rule is None:
      return leaf
    w = jnp.asarray(leaf, jnp.float32)
    qweight, s, z = _quantize_leaf(w, qstate.get(p) if rule.calibration == "lsq" else None,
                                   rule, stacked_axes(p, rule), qcfg.scale_dtype)
    n_stack = stacked_axes(p, rule)
    out_dims = tuple(w.shape[n_stack + 1:])
    a = act_bits if act_bits is not None else (rule.act_bits or (8 if backend == "int8" else 0))
    return PackedKernel(qweight, s, z,
                        out_dims=out_dims, backend=backend, act_bits=a)
  return jax.tree_util.tree_map_with_path(visit, params,
                                          is_leaf=lambda x: isinstance(x, PackedKernel))


def _flatten(params: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, PackedKernel))[0]
  return {path_str(p): v for p, v in leaves}


def save_packed(out_dir: str, qparams: Any, qcfg: QuantConfig,
                metadata: Optional[dict[str, str]] = None) -> str:
  """Write `out_dir/model.safetensors` (+ `quant.json`); returns the file path."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  info: dict[str, dict] = {}
  for p, v in _flatten(qparams).items():
    if isinstance(v, PackedKernel):
      q = np.asarray(v.qweight.astype(jnp.int8))
      q = q.reshape(*q.shape[:q.ndim - len(v.out_dims)], -1)  # [*stacked, K, N]
      tensors[p + ":qweight"] = pack_int4(q) if v.bits == 4 else q
      tensors[p + ":scale"] = np.asarray(v.scale)
      if v.zero is not None:
        tensors[p + ":zero"] = np.asarray(v.zero)
      k, groups = v.shape[-len(v.out_dims) - 1], v.scale.shape[-2]
      info[p] = dict(bits=v.bits, out_dims=list(v.out_dims), group_size=k // groups,
                     symmetric=v.zero is None)
    else:
      tensors[p] = np.asarray(v)
  meta = dict(format=FORMAT, format_version=str(FORMAT_VERSION), quant_config=qcfg.to_json(),
              tensors=json.dumps(info, sort_keys=True), **(metadata or {}))
  path = os.path.join(out_dir, FILENAME)
  save_file(tensors, path, metadata=meta)
  with open(os.path.join(out_dir, "quant.json"), "w") as f:
    json.dump({k: (json.loads(v) if k in ("quant_config", "tensors") else v)
               for k, v in meta.items()}, f, indent=1, sort_keys=True)
  return path


def load_packed(path: str, backend: str = "auto",
                act_bits: Optional[int] = None) -> tuple[Any, dict[str, str]]:
  """(params with PackedKernel leaves, metadata) from a directory or a .safetensors file.

  backend: "auto" (int8 on CPU, dequant elsewhere), "int8" or "dequant" — fixed here, at load.
  """
  from safetensors import safe_open
  if os.path.isdir(path):
    path = os.path.join(path, FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no packed checkpoint at {path}")
  backend = default_backend() if backend == "auto" else backend
  if backend not in ("int8", "dequant"):
    raise ValueError(f"backend must be auto, int8 or dequant; got {backend!r}")
  with safe_open(path, "np") as f:
    meta = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if meta.get("format") != FORMAT or int(meta.get("format_version", -1)) > FORMAT_VERSION:
    raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file (metadata {meta.get('format')}"
                     f" v{meta.get('format_version')})")
  qcfg = QuantConfig.from_json(meta["quant_config"])
  info = json.loads(meta["tensors"])
  tree: dict[str, Any] = {}
  for p in sorted({k.split(":")[0] for k in tensors}):
    if p in info:
      i = info[p]
      rule = qcfg.rule_for(p)
      a = act_bits if act_bits is not None else (
          (rule.act_bits if rule else 0) or (8 if backend == "int8" else 0))
      zero = tensors.get(p + ":zero")
      q = jnp.asarray(tensors[p + ":qweight"])
      n = math.prod(i["out_dims"])
      q = unpack_int4(q, n) if i["bits"] == 4 else q.astype(jnp.int8)
      q = q.reshape(*q.shape[:-1], *i["out_dims"])
      leaf: Any = PackedKernel(q, jnp.asarray(tensors[p + ":scale"]),
                               None if zero is None else jnp.asarray(zero),
                               out_dims=tuple(i["out_dims"]), backend=backend, act_bits=a)
    else:
      leaf = jnp.asarray(tensors[p])
    node = tree
    *parents, name = p.split("/")
    for q in parents:
      node = node.setdefault(q, {})
    node[name] = leaf
  return tree, meta


def file_bytes(path: str) -> int:
  """True bytes on disk of a file or of every file under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
