"""s2d.deploy — from fake quantization to real integer kernels: export, load back, run.

Public::

    from s2d.deploy import export_onnx, OnnxClassifier

    quantize_model(model, QuantConfig(w_bits=8, a_bits=8), method="repq", calib=batches)
    res = export_onnx(model, "model.onnx", example=batch, fmt="qdq")   # W8A8 QDQ with s2d's scales
    res.integer_ops                     # {"MatMulIntegerToFloat": 36, ...} after ONNX Runtime's fusions
    logits = OnnxClassifier("model.onnx")(**batch).logits

Modules: :mod:`~s2d.deploy.lowering` (s2d quantizers -> QDQ-exportable ops), :mod:`~s2d.deploy.onnx_export`
(the exporter, formats fp32 / qdq / int4), :mod:`~s2d.deploy.embeddings` (int8 embedding tables),
:mod:`~s2d.deploy.runtime` (ONNX Runtime behind the classifier API).
"""
from s2d.deploy.lowering import Site, lower_for_export
from s2d.deploy.onnx_export import EMBEDDINGS, FORMATS, ExportResult, export_onnx, optimized_ops
from s2d.deploy.runtime import OPTIMIZATION_LEVELS, OnnxClassifier, median_ms, read_sidecar

__all__ = ["export_onnx", "ExportResult", "FORMATS", "EMBEDDINGS", "optimized_ops", "OnnxClassifier", "read_sidecar",
           "OPTIMIZATION_LEVELS", "median_ms", "lower_for_export", "Site"]
