"""Export a classifier to ONNX: float, W8A8 QDQ with s2d's calibrated scales, or weight-only int4.

- ``"fp32"``: the float model (quantizers disabled or absent).
- ``"qdq"``: a model s2d quantized at W8A8 with any PTQ method, lowered by
  :func:`s2d.deploy.lowering.lower_for_export` and written by torch's TorchScript ONNX exporter (the one
  that writes ``fake_quantize_*`` as QuantizeLinear / DequantizeLinear), then passed through ONNX
  Runtime's *basic* (portable, standard-ops-only) optimizer, which folds each weight's QuantizeLinear
  into a uint8 initializer: the file stores 8-bit weights and a DequantizeLinear per weight, the QDQ
  format ONNX Runtime fuses into integer kernels when it loads the model.
- ``"int4"``: the float export, then ONNX Runtime's ``MatMulNBitsQuantizer`` (block-wise 4-bit weights,
  ``MatMulNBits``; activations stay float: W4A16).

``embeddings="int8"`` then stores the embedding tables as per-row int8 (:mod:`s2d.deploy.embeddings`):
no PTQ method quantizes them, and in float they are most of the file. The default, ``"float"``, keeps
the file computing what s2d computed; int8 tables change a W8A8 model's predictions on ~2 % of
Rotten Tomatoes sentences (docs/deployment.md).

Every export writes ``<name>.s2d.json`` beside the model: what it came from and how to feed it
(:mod:`s2d.deploy.runtime` reads it back).

Batch and sequence dimensions are dynamic, except for causal-LM classifiers: transformers' decoder
masking traces with the example's shapes baked in, so they are exported at the example's (B, T), and
:class:`~s2d.deploy.runtime.OnnxClassifier` right-pads and chunks other batches to it (exact for a causal
model read at its last real token).
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from s2d.deploy.embeddings import quantize_embedding_tables
from s2d.deploy.lowering import Site, lower_for_export
from s2d.models import CausalLMClassifier
from s2d.quant.prepare import named_quantizers, set_quantization
from s2d.utils import eval_mode, write_json

__all__ = ["FORMATS", "EMBEDDINGS", "INTEGER_OPS", "FLOAT_MATMUL_OPS", "ExportResult", "export_onnx", "optimized_ops", "session_options",
           "sidecar_path", "move_export"]

FORMATS = ("fp32", "qdq", "int4")
EMBEDDINGS = ("int8", "float")  # how export_onnx stores the Gather tables (s2d.deploy.embeddings)
# ONNX Runtime CPU ops that compute on integer codes (after its QDQ fusions)
INTEGER_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm",
               "QLinearConv", "ConvInteger", "MatMulNBits", "QAttention")
FLOAT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")  # matmuls ONNX Runtime runs in float
OPSET = 17
_SEQ_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_NOT_INPUTS = ("labels", "text_mask")  # batch keys the exported logits do not depend on


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote."""

    path: str                       # the .onnx file
    format: str                     # "fp32" | "qdq" | "int4"
    bytes: int                      # file size
    inputs: list[str]               # graph input names, in order
    integer_ops: dict[str, int]     # integer kernels ONNX Runtime runs after its fusions (INTEGER_OPS)
    float_matmuls: int              # matmuls left in float after the fusions (FLOAT_MATMUL_OPS)
    sites: list[dict] = field(default_factory=list)  # qdq: every quantization site (s2d.deploy.lowering.Site)
    meta: dict = field(default_factory=dict)         # caller's metadata (source model, data, method, bits)
    static_shape: list[int] | None = None  # (B, T) every input is fixed to (causal LMs); None: dynamic
    embeddings: str = "float"       # "int8": the tables below are stored as per-row int8 codes; "float": as is
    int8_tables: list[str] = field(default_factory=list)  # names of the Gather tables stored as int8


class _Logits(nn.Module):
    """Positional inputs in ``names`` order -> ``model(**inputs).logits``, the graph the exporter traces."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.s2d.json``."""
    return Path(path).with_suffix(".s2d.json")


def move_export(src: str | Path, dst: str | Path) -> None:
    """Move an exported ``src`` .onnx and its sidecar to ``dst`` (the sidecar's ``path`` follows)."""
    src, dst = Path(src), Path(dst)
    side = json.loads(sidecar_path(src).read_text())
    src.replace(dst)
    write_json(sidecar_path(dst), {**side, "path": str(dst)})
    sidecar_path(src).unlink()


def export_onnx(model: nn.Module, path: str | Path, example: Mapping[str, Tensor], fmt: str = "qdq", *,
                block_size: int = 32, embeddings: str = "float", meta: Mapping | None = None) -> ExportResult:
    """Write ``model`` (a classifier returning ``.logits``) as ONNX in format ``fmt`` (see the module doc).

    ``example``: one batch of model inputs (labels are ignored), e.g. {"input_ids": (B, T) int64, ...};
    batch (and sequence) dimensions are dynamic in the graph, except for a causal-LM classifier, which
    is fixed to the example's (B, T) (pad the example to the longest sequence it will see; see the
    module doc). ``model`` is not modified (a copy is
    lowered). ``block_size``: int4 block along the input dimension (16..256, a power of two).
    ``embeddings``: "float" (default) or "int8" storage of the embedding tables (see the module doc).
    ``meta``: JSON metadata stored in the sidecar (``source``, ``data``, ``max_length``, ...).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "int4" and (block_size < 16 or block_size > 256 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    if embeddings not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [k for k in example if k not in _NOT_INPUTS]
    static = list(example["input_ids"].shape) if isinstance(model, CausalLMClassifier) else None
    model = copy.deepcopy(model).cpu().eval()
    sites: list[Site] = []
    if fmt == "qdq":
        _check_w8a8(model)
        sites = lower_for_export(model)
    else:
        set_quantization(model, False)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(_Logits(model, names), raw, [example[k].cpu() for k in names], names, dynamic=static is None)
        if fmt == "int4":
            _int4(raw, path, block_size)
        else:
            _basic_optimize(raw, path)
    tables = _int8_embeddings(path) if embeddings == "int8" else []
    ops = optimized_ops(path)
    result = ExportResult(str(path), fmt, path.stat().st_size, names,
                          {k: v for k, v in ops.items() if k in INTEGER_OPS},
                          sum(ops.get(k, 0) for k in FLOAT_MATMUL_OPS), [asdict(s) for s in sites], dict(meta or {}),
                          static, embeddings, tables)
    write_json(sidecar_path(path), asdict(result))
    return result


def _check_w8a8(model: nn.Module) -> None:
    qs = named_quantizers(model)
    if not qs:
        raise ValueError("format 'qdq' needs a model quantized by s2d (quantize_model); this one has no quantizers")
    widths = {q.bits for q in qs.values() if q.enabled}
    if widths - {8}:
        raise ValueError(f"format 'qdq' needs W8A8 (ONNX QDQ carries 8-bit codes; A4/A6 have no CPU integer "
                         f"kernel and stay fake only), got quantizers at {sorted(widths)} bits")


def _torch_export(module: nn.Module, out: Path, args: list[Tensor], names: list[str], dynamic: bool) -> None:
    dyn = None
    if dynamic:
        dyn = {n: ({0: "batch", 1: "sequence"} if n in _SEQ_INPUTS else {0: "batch"}) for n in names}
        dyn["logits"] = {0: "batch"}
    module.requires_grad_(False)
    # log-√2 dequantization uses torch.exp2, which the TorchScript exporter does not know: 2^x as Pow
    torch.onnx.register_custom_op_symbolic("aten::exp2", _exp2_symbolic, OPSET)
    with warnings.catch_warnings(), eval_mode(module), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        # dynamo=False: the TorchScript exporter writes fake_quantize_* as QuantizeLinear/DequantizeLinear
        # pairs that ONNX Runtime fuses; torch.export's exporter leaves them unfused (measured, ORT 1.32)
        torch.onnx.export(module, tuple(args), str(out), input_names=names, output_names=["logits"],
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _exp2_symbolic(g, x):  # noqa: ANN001, ANN202 (TorchScript graph objects)
    two = g.op("Constant", value_t=torch.tensor(2.0, dtype=torch.float32))
    return g.op("Pow", two, x)


def session_options(level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    save_to: Path | None = None, threads: int | None = None) -> ort.SessionOptions:
    """ONNX Runtime options s2d runs every export with. An 8-bit weight whose input stays float (a site with
    no integer QDQ form) is fused into MatMulNBits; accuracy level 1 keeps that matmul in float32, as s2d
    computed it (ONNX Runtime's default, 4, would quantize the activation to int8 on the fly)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3  # errors only (the "hardware specific optimizations" notice is expected)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads is not None:
        so.intra_op_num_threads = threads
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    return so


def _basic_optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's basic level: constant folding (Q of a constant weight -> uint8 initializer) and
    redundant-node removal, standard ONNX ops only, so ``dst`` runs on any ONNX runtime."""
    ort.InferenceSession(str(src), session_options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, dst),
                         providers=["CPUExecutionProvider"])


def _int8_embeddings(path: Path) -> list[str]:
    model = onnx.load(str(path))
    tables = quantize_embedding_tables(model)
    onnx.save(model, str(path))
    return tables


def _int4(src: Path, dst: Path, block_size: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # pulls in onnx_ir

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node

    tmp = dst.with_suffix(".fp32.tmp.onnx")
    _basic_optimize(src, tmp)  # folds the weight transposes, so every MatMul has a constant (in, out) weight
    try:
        quant = MatMulNBitsQuantizer(onnx.load(str(tmp)), bits=4, block_size=block_size, is_symmetric=True)
        quant.process()
        quant.model.save_model_to_file(str(dst), use_external_data_format=False)
    finally:
        tmp.unlink(missing_ok=True)


def optimized_ops(path: str | Path) -> Counter:
    """Op-type counts of the graph ONNX Runtime runs for ``path`` on this CPU (all optimizations)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        ort.InferenceSession(str(path), session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, out),
                             providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(str(out)).graph.node)
