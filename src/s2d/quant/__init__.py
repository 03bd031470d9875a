"""s2d.quant — fake quantization of whole models, PTQ methods (RTN, PTQ4ViT, RepQ-ViT, ERQ) and QAT.

Public::

    from s2d.quant import QuantSpec, quantize_model, quantize_dequantize

    model = quantize_model(model, QuantSpec(w_bits=4, a_bits=4), method="rtn", calib=batches)  # in place
    list_quantizers(model)          # every quantizer with bits, granularity, calibrated range
    set_quantization(model, False)  # float reference through the same code path
"""
from s2d.quant.apply import (
    METHODS,
    QuantLinear,
    QuantSpec,
    available_methods,
    calibrate,
    calibrate_weights,
    head_names,
    list_quantizers,
    prepare_model,
    quantize_model,
    quantizers,
    register_method,
    run_batches,
    set_quantization,
)
from s2d.quant import rtn  # noqa: F401  (registers "rtn")
from s2d.quant.attention import AttentionQuantizers, attention_modules, quant_attention_forward
from s2d.quant.quantizers import (
    LogSqrt2Quantizer,
    Quantizer,
    TwinUniformQuantizer,
    UniformQuantizer,
    fake_quant,
    int_range,
    quantize_dequantize,
    round_ste,
    scale_zero_point,
)

__all__ = [
    "QuantSpec",
    "quantize_model",
    "quantize_dequantize",
    "prepare_model",
    "calibrate",
    "calibrate_weights",
    "run_batches",
    "list_quantizers",
    "set_quantization",
    "register_method",
    "available_methods",
    "METHODS",
    "quantizers",
    "head_names",
    "QuantLinear",
    "AttentionQuantizers",
    "attention_modules",
    "quant_attention_forward",
    "Quantizer",
    "UniformQuantizer",
    "LogSqrt2Quantizer",
    "TwinUniformQuantizer",
    "round_ste",
    "fake_quant",
    "int_range",
    "scale_zero_point",
]
