"""Quantization: rules over parameter pytrees, fake quant (QAT), packed int4/int8 export.

See docs/quant.md. Typical use:

    qcfg = quant.quant_config(bits=4, group_size=128, act_bits=8)
    logits = lm.apply(cfg, quant.qat_params(params, qcfg), tokens)        # QAT / fake quant
    quant.save_packed(out, quant.quantize_params(params, qcfg), qcfg)     # PTQ export
    packed, meta = quant.load_packed(out)                                 # int8 dots on CPU
"""

from ds_jax.quant.config import (QuantConfig, QuantRule, default_quant_config, from_config,
                                 quant_config)
from ds_jax.quant.fake import (QSTATE_KEY, fake_quantize, init_qstate, qat_params,
                               qat_transform, quantized_paths, split_qstate, with_qstate,
                               wrap_activations)
from ds_jax.quant.matmul import ActQuantKernel, PackedKernel
from ds_jax.quant.pack import (FORMAT_VERSION, file_bytes, load_packed, pack_int4,
                               quantize_params, save_packed)

PackedInt4Kernel = PackedKernel  # the name the design uses; one class serves 4 and 8 bits

__all__ = [
    "ActQuantKernel", "FORMAT_VERSION", "QSTATE_KEY", "PackedInt4Kernel", "PackedKernel", "QuantConfig",
    "QuantRule", "default_quant_config", "fake_quantize", "file_bytes", "from_config",
    "init_qstate", "load_packed", "pack_int4", "qat_params", "qat_transform", "quant_config", "quantize_params",
    "quantized_paths", "save_packed", "split_qstate", "with_qstate", "wrap_activations",
]
