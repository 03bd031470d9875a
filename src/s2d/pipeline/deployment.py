"""`s2d export`: quantize a model with a PTQ method, write it as a deployable ONNX file, and check that
the deployed model scores what s2d's fake quantization scored; `s2d evaluate model.onnx` scores it later.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from s2d.data import calibration_batches
from s2d.deploy import EMBEDDINGS, FORMATS, OnnxClassifier, export_onnx, read_sidecar
from s2d.deploy.onnx_export import sidecar_path
from s2d.pipeline.deployed import export_example, parity
from s2d.pipeline.inspection import add_prompt_arguments, cli_task, prompt_options
from s2d.quant import QuantConfig, available_methods, quantize_model
from s2d.train import Outcomes, evaluate_outcomes
from s2d.utils import write_json

__all__ = ["add_export", "cmd_export", "evaluate_onnx"]


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to ONNX (W8A8 QDQ with a PTQ method's scales, int4, fp32)",
                       description="Quantize MODEL with --method at W8A8 (calibrated on training batches of --data) "
                                   "and write it as ONNX QuantizeLinear/DequantizeLinear with that method's scales "
                                   "and zero points, which ONNX Runtime runs on integer kernels; or write the float "
                                   "model (--format fp32) or its block-wise 4-bit weight-only form (--format int4, "
                                   "ONNX Runtime's MatMulNBits). Then score the exported file on the test split and "
                                   "compare it with s2d's own model: accuracy and per-example agreement.")
    p.add_argument("model", help="s2d asset name or local Hugging Face directory (e.g. from `s2d finetune`)")
    p.add_argument("--data", required=True, help="dataset asset or path (calibration and test split)")
    p.add_argument("--out", required=True, help="the .onnx file to write (a .s2d.json sidecar goes beside it)")
    p.add_argument("--format", choices=FORMATS, default="qdq", dest="fmt",
                   help="qdq: W8A8 integer (default); int4: weight-only 4-bit; fp32: float")
    p.add_argument("--method", default="rtn", help="PTQ method for --format qdq (default rtn)")
    p.add_argument("--block-size", type=int, default=32, help="int4: weights per scale along the input (default 32)")
    p.add_argument("--embeddings", choices=EMBEDDINGS, default="float",
                   help="float (default): the embedding tables as s2d has them, so the file computes s2d's "
                        "model; int8: per-row int8 tables (a W8A8 MiniLM-L6 file goes from 56 to 22 MiB) that "
                        "change ~2%% of predictions")
    p.add_argument("--calib-samples", type=int, default=32, help="training examples the PTQ method calibrates on")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    p.add_argument("--limit-eval", type=int, default=None, help="score only the first N test examples")
    add_prompt_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.fmt == "qdq" and args.method not in available_methods():
        raise ValueError(f"--method must be one of {', '.join(available_methods())}, got {args.method!r}")
    out = Path(args.out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out must name a .onnx file, got {args.out!r}")
    progress = not args.no_progress
    prompt = prompt_options(args)
    bundle, loaders = cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                               limit_eval=args.limit_eval, **prompt)
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size)
    reference = _reference_model(bundle.model, args, calib, progress)
    source = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    meta = {"source": source, "data": args.data, "max_length": args.max_length, **prompt,
            "method": args.method if args.fmt == "qdq" else None, "bits": "W8A8" if args.fmt == "qdq" else
            ("W4A16" if args.fmt == "int4" else None)}
    example = export_example(reference, calib[0], loaders.test)
    res = export_onnx(reference, out, example, args.fmt, block_size=args.block_size,
                      embeddings=args.embeddings, meta=meta)
    ref = evaluate_outcomes(reference, loaders.test, progress=progress)
    dep = evaluate_outcomes(OnnxClassifier(out), loaders.test, progress=progress)
    score = parity(ref, dep)
    write_json(sidecar_path(out), {**read_sidecar(out), "parity": score})
    integer = sum(s["integer"] for s in res.sites if s["kind"] == "linear")
    linears = sum(s["kind"] == "linear" for s in res.sites)
    print(f"{out}: {res.bytes / 2**20:.1f} MiB, format {args.fmt}, {res.embeddings} embeddings"
          + (f", {integer}/{linears} Linears in integer QDQ form" if args.fmt == "qdq" else "")
          + f"; ONNX Runtime ops {res.integer_ops or 'none integer'}")
    what = f"s2d {args.method} W8A8 (fake quant)" if args.fmt == "qdq" else "torch float"
    print(f"accuracy: {what} {100 * score['reference_accuracy']:.2f}%, exported {100 * score['deployed_accuracy']:.2f}% "
          f"({100 * score['difference']:+.2f} pp); same prediction on {100 * score['agreement']:.2f}% of "
          f"{score['examples']} examples")
    return 0


def _reference_model(model: nn.Module, args: argparse.Namespace, calib: list[dict], progress: bool) -> nn.Module:
    """What the export is compared with: the model quantized at W8A8 by ``--method`` (qdq), else the float model."""
    if args.fmt != "qdq":
        return model
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, QuantConfig(w_bits=8, a_bits=8), method=args.method, calib=calib, progress=progress)
    return qmodel


def evaluate_onnx(path: str, data: str | None, batch_size: int, limit_eval: int | None,
                  progress: bool) -> Outcomes:
    """Outcomes of an exported file on the test split of ``data`` (default: the data it was exported with),
    tokenized / preprocessed as its sidecar says."""
    side = read_sidecar(path)
    meta = side.get("meta", {})
    _, loaders = cli_task(meta["source"], data or meta.get("data"), max_length=meta.get("max_length", 64),
                          batch_size=batch_size, limit_eval=limit_eval, prompt=meta.get("prompt"),
                          label_words=meta.get("label_words"))
    with torch.no_grad():
        return evaluate_outcomes(OnnxClassifier(path), loaders.test, progress=progress)
