"""s2d.quant — fake quantization of whole models, PTQ methods (RTN, PTQ4ViT, RepQ-ViT, ERQ) and QAT.

Public::

    from s2d.quant import QuantConfig, quantize_model

    model = quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="rtn", calib=batches)  # in place
    model = quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method=RepQConfig(), calib=batches)
    list_quantizers(model)          # every quantizer with bits, granularity, calibrated range
    set_quantization(model, False)  # float reference through the same code path

Modules (everything not re-exported here is importable from its module):

- :mod:`~s2d.quant.primitives` — tensor maths: code ranges, scale / zero point, STE rounding, MSE clipping;
- :mod:`~s2d.quant.quantizers`, :mod:`~s2d.quant.nonuniform` — the quantizer modules;
- :mod:`~s2d.quant.config` — :class:`QuantConfig`, :class:`Bits`;
- :mod:`~s2d.quant.linear`, :mod:`~s2d.quant.attention` — quantized Linear and attention;
- :mod:`~s2d.quant.prepare`, :mod:`~s2d.quant.calibration` — insert, find and calibrate quantizers;
- :mod:`~s2d.quant.api` — the PTQ method registry and :func:`quantize_model`;
- :mod:`~s2d.quant.ptq` — the PTQ methods; :mod:`~s2d.quant.qat` — QAT; :mod:`~s2d.quant.reparam` — RepQ's
  scale reparameterisation.
"""
from s2d.quant.api import available_methods, quantize_model, register_method
from s2d.quant.calibration import calibrate
from s2d.quant.config import Bits, QuantConfig, QuantSpec
from s2d.quant.linear import QuantLinear
from s2d.quant.prepare import list_quantizers, named_quantizers, prepare_model, set_quantization
from s2d.quant.ptq import ERQConfig, PTQ4ViTConfig, RepQConfig, RTNConfig  # importing ptq registers the methods
from s2d.quant.qat import QATConfig, convert_qat, prepare_qat

__all__ = [
    "QuantConfig",
    "QuantSpec",
    "Bits",
    "quantize_model",
    "prepare_model",
    "calibrate",
    "set_quantization",
    "list_quantizers",
    "named_quantizers",
    "register_method",
    "available_methods",
    "QuantLinear",
    "RTNConfig",
    "RepQConfig",
    "PTQ4ViTConfig",
    "ERQConfig",
    "QATConfig",
    "prepare_qat",
    "convert_qat",
]
