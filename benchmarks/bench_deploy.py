"""Speed, size and memory of the deployed model: torch fp32 and s2d fake quant against ONNX Runtime
fp32, W8A8 QDQ (integer kernels) and weight-only int4, side by side in one run.

For each model (default: minilm-l6; add smollm2-135m with ``--models minilm-l6,smollm2-135m``) the
float model gets a head for ``--data`` (random: speed does not depend on it), is quantized at W8A8
with ``--method`` on real calibration batches, and is exported five ways with :func:`s2d.deploy.export_onnx` (fp32; W8A8 and int4, each with float
and with int8 embedding tables), plus the W8A8 file with int8 weight codes (``signed_weights``).
Every backend then runs in a fresh subprocess of this script (so that peak memory is its own):

- throughput: sequences / s on a (``--batch``, ``--seq``) batch of random token ids, from the median of
  ``--iters`` timed calls after 2 warm-up calls;
- latency: median ms of ``--iters`` calls on one sequence of ``--seq`` tokens (not for a causal LM's
  ONNX files: they are exported at the fixed (``--batch``, ``--seq``), see :mod:`s2d.deploy.onnx_export`);
- peak memory: the subprocess's peak RSS minus its RSS after imports (MiB), i.e. the model and its
  activations, not the Python / torch / ONNX Runtime libraries;
- file size: the artifact the backend loads (torch: ``torch.save`` of the module; torchao quantizes the
  fp32 file after loading, so it has none of its own: null).

    .venv/bin/python benchmarks/bench_deploy.py --out bench_deploy.json [--models minilm-l6,smollm2-135m]

Output: one JSON object (printed, and written atomically with --out): machine, settings, a row per
(model, backend) and the ratios against ONNX Runtime fp32 and torch fp32.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from s2d.deploy.runtime import median_ms

BACKENDS = ("torch-fp32", "torch-fakequant-w8a8", "torchao-int8-dynamic", "ort-fp32", "ort-qdq-w8a8",
            "ort-qdq-w8a8-s8w", "ort-qdq-w8a8-int8emb", "ort-int4", "ort-int4-int8emb")
# *-int8emb: the same export with embeddings="int8" (per-row int8 embedding tables, s2d.deploy.embeddings)
# ort-qdq-w8a8-s8w: the W8A8 file with its uint8 weight codes rewritten as int8 (u8 x s8 kernels): the
# faster form that is exact only on CPUs with VNNI (s2d.deploy.lowering), timed for the cost of u8 x u8
# torchao-int8-dynamic: the float model through torchao's Int8DynamicActivationInt8WeightConfig (its own
# per-token dynamic activation scales, not s2d's calibrated ones), eager; skipped when torchao is missing


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def machine() -> dict:
    """CPU model, integer-dot-product ISA flags (VNNI / AMX, which ONNX Runtime's int8 kernels use), versions."""
    import onnxruntime
    import torch
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return {"cpu": name, "cpus": os.cpu_count(), "isa": sorted(flags & {"avx2", "avx512f", "avx512_vnni",
                                                                      "avx_vnni", "amx_int8"}),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def time_calls(call, feeds_batch: dict, feeds_one: dict | None, iters: int) -> dict:
    """Throughput (sequences / s, from the median batch call) and median one-sequence latency (ms; None
    without ``feeds_one``)."""
    batch = next(iter(feeds_batch.values())).shape[0]
    batch_ms = median_ms(lambda: call(feeds_batch), iters, warmup=2)
    one_ms = median_ms(lambda: call(feeds_one), iters, warmup=2) if feeds_one is not None else None
    return {"throughput_seq_s": 1e3 * batch / batch_ms, "latency_ms": one_ms}


def worker(args: argparse.Namespace) -> dict:
    """One backend in this (fresh) process: load ``args.path``, time it, report memory."""
    inputs = dict(np.load(args.inputs))
    one = {k: v[:1] for k, v in inputs.items()}
    if args.worker.startswith("torch"):
        import torch

        from s2d.quant.attention import register_hf_attention
        register_hf_attention()  # the "s2d_quant" attention function a fake-quant model dispatches to
        torch.set_num_threads(args.threads)
        if args.worker.startswith("torchao"):
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        base = rss_mib("VmRSS")
        model = torch.load(args.path, weights_only=False).eval()
        if args.worker.startswith("torchao"):
            quantize_(model, Int8DynamicActivationInt8WeightConfig())

        def call(feeds):
            with torch.no_grad():
                return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
    else:
        import onnxruntime as ort

        from s2d.deploy import read_sidecar
        from s2d.deploy.onnx_export import session_options
        base = rss_mib("VmRSS")
        session = ort.InferenceSession(args.path, session_options(threads=args.threads),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if read_sidecar(args.path).get("static_shape"):
            one = None       # exported at the benchmark's (batch, seq): a one-sequence call would be padded to it

        def call(feeds):
            return session.run(["logits"], {n: feeds[n] for n in names})
    row = time_calls(call, inputs, one, args.iters)
    return {**row, "peak_mib": rss_mib("VmHWM") - base}


def prepare(name: str, args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Path], Path, dict]:
    """Export ``name``'s float / W8A8 / int4 forms into ``tmp``; returns backend -> artifact, the inputs
    file and the export summaries."""
    import torch

    from s2d.data import calibration_batches
    from s2d.deploy import export_onnx
    from s2d.pipeline.inspection import cli_task
    from s2d.quant import QuantConfig, quantize_model

    llm = "smollm2" in name
    bundle, loaders = cli_task(name, args.data, max_length=args.seq, batch_size=args.batch,
                               prompt="Review: {text}\nSentiment:" if llm else None,
                               label_words=["negative", "positive"] if llm else None)
    model = bundle.model.eval()
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, int(calib[0]["input_ids"].max()) + 1, (args.batch, args.seq), generator=gen)
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in calib[0]:
        feeds["token_type_ids"] = torch.zeros_like(ids)
    example = feeds          # the traced shape (causal LMs are exported at exactly this (batch, seq))
    np.savez(tmp / "inputs.npz", **{k: v.numpy() for k, v in feeds.items()})
    paths = {"torch-fp32": tmp / "fp32.pt", "torchao-int8-dynamic": tmp / "fp32.pt"}
    torch.save(model, paths["torch-fp32"])
    exports = {"ort-fp32": export_onnx(model, tmp / "fp32.onnx", example, "fp32"),
               "ort-int4": export_onnx(model, tmp / "int4.onnx", example, "int4", block_size=args.block_size),
               "ort-int4-int8emb": export_onnx(model, tmp / "int4e.onnx", example, "int4", block_size=args.block_size,
                                               embeddings="int8")}
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8), method=args.method, calib=calib, progress=False)
    paths["torch-fakequant-w8a8"] = tmp / "fq.pt"
    torch.save(model, paths["torch-fakequant-w8a8"])
    exports["ort-qdq-w8a8"] = export_onnx(model, tmp / "qdq.onnx", example, "qdq")
    exports["ort-qdq-w8a8-int8emb"] = export_onnx(model, tmp / "qdqe.onnx", example, "qdq", embeddings="int8")
    paths.update({k: Path(r.path) for k, r in exports.items()})
    paths["ort-qdq-w8a8-s8w"] = tmp / "qdq-s8w.onnx"
    signed_weights(paths["ort-qdq-w8a8"], paths["ort-qdq-w8a8-s8w"])
    linear_bytes = sum(4 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    summary = {k: {"integer_ops": r.integer_ops, "float_matmuls": r.float_matmuls} for k, r in exports.items()}
    summary["params"] = sum(p.numel() for p in bundle.model.parameters())
    summary["fp32_linear_weight_mib"] = linear_bytes / 2**20
    return paths, tmp / "inputs.npz", summary


def signed_weights(src: Path, dst: Path) -> None:
    """Rewrite each uint8 weight table of ``src`` (zero point 128) as int8 codes with zero point 0, into
    ``dst`` with a copy of the sidecar (which the runner reads)."""
    import onnx
    from onnx import numpy_helper

    from s2d.deploy.onnx_export import sidecar_path

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or len(inits[node.input[0]].dims) != 2:
            continue
        codes, zero = (numpy_helper.to_array(inits[n]) for n in node.input[:3:2])
        if codes.dtype != np.uint8:
            continue
        for name, arr in ((node.input[0], codes), (node.input[2], zero)):
            inits[name].CopyFrom(numpy_helper.from_array((arr.astype(np.int16) - 128).astype(np.int8), name))
    onnx.save(model, str(dst))
    sidecar_path(dst).write_bytes(sidecar_path(src).read_bytes())


def run_backend(backend: str, path: Path, inputs: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--path", str(path), "--inputs", str(inputs),
           "--threads", str(args.threads), "--iters", str(args.iters)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{backend} on {path.name} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["file_mib"] = None if backend.startswith("torchao") else path.stat().st_size / 2**20  # no file of its own
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm-l6", help="comma-separated asset names")
    p.add_argument("--data", default="rotten-tomatoes")
    p.add_argument("--method", default="rtn", help="PTQ method whose scales the W8A8 export carries")
    p.add_argument("--batch", type=int, default=32, help="sequences per throughput call")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    t0 = time.time()
    rows, exports = [], {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            paths, inputs, exports[name] = prepare(name, args, Path(tmp))
            for backend in BACKENDS:
                if backend.startswith("torchao") and importlib.util.find_spec("torchao") is None:
                    print(f"{backend}: skipped (pip install torchao to measure it)", file=sys.stderr)
                    continue
                rows.append({"model": name, "backend": backend, **run_backend(backend, paths[backend], inputs, args)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    for r in rows:
        ref = {b["backend"]: b for b in rows if b["model"] == r["model"]}
        for base in ("ort-fp32", "torch-fp32"):
            r[f"speedup_vs_{base}"] = r["throughput_seq_s"] / ref[base]["throughput_seq_s"]
            r[f"file_ratio_vs_{base}"] = ref[base]["file_mib"] / r["file_mib"] if r["file_mib"] else None
    report = {"machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "path", "inputs", "out")},
              "exports": exports, "rows": rows, "seconds": time.time() - t0}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        from s2d.utils import write_json
        write_json(args.out, report)


if __name__ == "__main__":
    main()
