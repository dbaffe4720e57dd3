"""Fake quantization over parameter pytrees, with a straight-through estimator (QAT).

`fake_quantize(params, qcfg)` returns a tree of the same structure and dtypes whose matched
kernels hold quantize-dequantized values; the gradient is 1 inside the clipping range and 0
outside (`astype(int4)` would silently zero it). `wrap_activations` swaps in `ActQuantKernel`s for
rules with `act_bits`, and `qat_params` does both: use it inside the train step,

    logits = lm.apply(cfg, qat_params(params, qcfg, qstate), tokens)

`qstate` holds the learnable scales of "lsq" rules (`init_qstate`); train it with the params.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from ds_jax.quant import calibrate as cal
from ds_jax.quant.config import QuantConfig, QuantRule, path_str, stacked_axes
from ds_jax.quant.matmul import ActQuantKernel

Array = jax.Array
sg = jax.lax.stop_gradient


def _map_rules(fn: Callable[[str, Array, QuantRule], Any], params: Any, qcfg: QuantConfig) -> Any:
  """Apply fn(path, leaf, rule) to each leaf a quantizing rule matches; others pass through."""
  def visit(path, leaf):
    p = path_str(path)
    rule = qcfg.rule_for(p)
    return leaf if rule is None else fn(p, leaf, rule)
  return jax.tree_util.tree_map_with_path(visit, params)


def quantized_paths(params: Any, qcfg: QuantConfig) -> dict[str, QuantRule]:
  """{path: rule} of the leaves `qcfg` quantizes (for reports and tests)."""
  out: dict[str, QuantRule] = {}
  _map_rules(lambda p, leaf, r: out.setdefault(p, r), params, qcfg)
  return out


def _grad_scale(x: Array, g: float) -> Array:
  """Value x, gradient scaled by g (LSQ's step-size gradient scale)."""
  return x * g + sg(x - x * g)


def _ste_round_dtype(s: Array, scale_dtype: str) -> Array:
  return s + sg(s.astype(scale_dtype).astype(jnp.float32) - s)


def fake_quant_array(w: Array, rule: QuantRule, n_stack: int, scale_dtype: str,
                     lsq_scale: Optional[Array] = None) -> Array:
  """Quantize-dequantize one kernel `[*stacked, K, *out]` per stacked index and group."""
  wg = cal.grouped(w.astype(jnp.float32), n_stack, rule.group_size)
  qmin, qmax = cal.qrange(rule.bits)
  if lsq_scale is not None:  # learnable step size; clip and round with STE
    g = 1.0 / math.sqrt(wg.shape[-2] * qmax)
    s = _ste_round_dtype(jnp.abs(_grad_scale(lsq_scale, g)) + 1e-12, scale_dtype)
    v = jnp.clip(wg / s, qmin, qmax)
    deq = (v + sg(jnp.round(v) - v)) * s
  else:
    s, z = cal.calibrate(sg(wg), rule.bits, rule.symmetric, rule.calibration, scale_dtype)
    zz = 0.0 if z is None else z
    wc = jnp.clip(wg, (qmin - zz) * s, (qmax - zz) * s)
    deq = wc - sg(wc) + sg(cal.dequantize(cal.quantize(wg, s, z, rule.bits), s, z))
  return cal.ungrouped(deq, w.shape).astype(w.dtype)


def init_qstate(params: Any, qcfg: QuantConfig) -> dict[str, Array]:
  """{path: scale [*stacked, G, 1, N]} for every "lsq" rule, initialised by the MSE search."""
  state: dict[str, Array] = {}

  def init(p, leaf, rule):
    if rule.calibration == "lsq":
      wg = cal.grouped(jnp.asarray(leaf, jnp.float32), stacked_axes(p, rule), rule.group_size)
      state[p] = cal.mse_scale(wg, rule.bits, True, qcfg.scale_dtype)[0]
    return leaf
  _map_rules(init, params, qcfg)
  return state


def fake_quantize(params: Any, qcfg: QuantConfig,
                  qstate: Optional[dict[str, Array]] = None) -> Any:
  """Same tree, matched kernels quantize-dequantized (STE gradients)."""
  qstate = qstate or {}

  def fq(p, leaf, rule):
    if rule.calibration == "lsq" and p not in qstate:
      raise ValueError(f"{p}: lsq calibration needs its scale in qstate (see init_qstate)")
    return fake_quant_array(leaf, rule, stacked_axes(p, rule), qcfg.scale_dtype,
                            qstate.get(p) if rule.calibration == "lsq" else None)
  return _map_rules(fq, params, qcfg)


def wrap_activations(params: Any, qcfg: QuantConfig, on: Optional[Array] = None) -> Any:
  """Kernels of rules with act_bits become ActQuantKernel (per-token activation fake-quant).

  on: optional traced bool; activations are quantized only where it is true."""
  def wrap(p, leaf, rule):
    if not rule.act_bits:
      return leaf
    gate = None if on is None else jnp.broadcast_to(on, leaf.shape[:stacked_axes(p, rule)])
    return ActQuantKernel(leaf, gate, bits=rule.act_bits)
  return _map_rules(wrap, params, qcfg)


def qat_params(params: Any, qcfg: QuantConfig, qstate: Optional[dict[str, Array]] = None) -> Any:
  """Fake-quantized weights and activation-quantizing kernels: the params a QAT step applies."""
  return wrap_activations(fake_quantize(params, qcfg, qstate), qcfg)


QSTATE_KEY = "quant_log_scales"  # top-level params entry: trained LSQ scales, {path: log s}


def with_qstate(params: Any, qcfg: QuantConfig) -> Any:
  """params plus `params[QSTATE_KEY]` = log of `init_qstate(params, qcfg)`: LSQ scales that the
  optimizer trains with the weights (`qat_transform` pops them before the forward).

  The scales are trained as logarithms: under Adam every parameter moves by about the learning
  rate per step, which for a raw scale of ~1e-2 would be a several-percent jump per step at the
  weights' learning rate; in log space the same step is a relative change of lr."""
  return {**params, QSTATE_KEY: {k: jnp.log(v) for k, v in init_qstate(params, qcfg).items()}}


def split_qstate(params: Any) -> tuple[Any, Optional[dict[str, Array]]]:
  """(params without QSTATE_KEY, {path: scale} or None): the inverse of `with_qstate`."""
  if not (isinstance(params, dict) and QSTATE_KEY in params):
    return params, None
  params = dict(params)
  return params, {k: jnp.exp(v) for k, v in params.pop(QSTATE_KEY).items()}


def qat_transform(qcfg: QuantConfig, qstate: Optional[dict[str, Array]] = None
                  ) -> Callable[[Any, Array], Any]:
  """(params, step) -> params for `LMTask.param_transforms`: float before `qcfg.start_step`,
  fake-quantized weights and activations from it on (step may be traced).

  LSQ scales are taken from `params[QSTATE_KEY]` when present (trained in the loop, see
  `with_qstate`), else from `qstate`; the entry is removed from the returned tree."""
  def transform(params: Any, step: Array) -> Any:
    params, qs = split_qstate(params)
    qs = qstate if qs is None else qs
    if qcfg.start_step <= 0:
      return qat_params(params, qcfg, qs)
    on = jnp.asarray(step) >= qcfg.start_step
    fq = fake_quantize(params, qcfg, qs)
    mixed = jax.tree.map(lambda q, w: jnp.where(on, q, w), fq, params)
    return wrap_activations(mixed, qcfg, on)
  return transform
