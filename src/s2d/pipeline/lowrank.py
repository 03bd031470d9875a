"""`s2d lowrank`: which Linears of a model are low-rank, in weight space (SVD) and in feature space
(PCA of each layer's outputs on calibration data), and the rank each needs for an output-error
threshold (:mod:`s2d.lowrank`, docs/lowrank.md)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from s2d.data import calibration_batches
from s2d.lowrank import lowrank_table
from s2d.lowrank.factorise import SPACES, plan_ranks
from s2d.pipeline.compression import compression_grid, format_compression_table, format_quantized_table, parse_cells
from s2d.pipeline.figures import fig_lowrank
from s2d.pipeline.inspection import (
    add_prompt_arguments,
    arm_task,
    cli_task,
    prompt_options,
)
from s2d.pipeline.parse import from_dict
from s2d.pipeline.tables import format_lowrank_arms_table, format_lowrank_table
from s2d.quant import available_methods
from s2d.utils import jsonable, write_json, write_text

__all__ = ["add_lowrank", "cmd_lowrank"]


def add_lowrank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lowrank", help="rank each Linear needs: weight space (SVD) vs feature space (output PCA)",
                       description="For every Linear (classifier heads left out), the relative Frobenius and "
                                   "output errors of its rank-r SVD truncation (weight space) and of the PCA of "
                                   "its outputs on calibration data (feature space, LLM-ROM), for every r; the "
                                   "smallest rank that keeps the output error under --threshold; a table "
                                   "(lowrank.md), the curves (lowrank.json) and a figure (lowrank.png).")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory, hub id, an `s2d run` arm folder "
                                 "(RUN/arms/adamw@s0), or a whole run folder (every arm and seed, compared)")
    p.add_argument("--data", default=None,
                   help="dataset asset or path (default: an arm's own data; rotten-tomatoes for text, "
                        "fashion-mnist for images)")
    p.add_argument("--out", default=None, help="output directory (default runs/lowrank-<model>)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="relative output error ‖Ŷ − Y‖_F / ‖Y‖_F allowed per layer, in (0, 1) (default 0.1)")
    p.add_argument("--calib-samples", type=int, default=64,
                   help="training examples whose inputs give each layer's moments (default 64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--include-head", action="store_true", help="also analyse the classifier head")
    p.add_argument("--compress", default=None, metavar="R,R,...",
                   help="also factorise the model so that the analysed Linears keep these shares of their "
                        "parameters (e.g. 0.9,0.7,0.5), block by block, and score each on the test split")
    p.add_argument("--space", default="feature", choices=SPACES,
                   help="--compress: feature space (output PCA, LLM-ROM; default) or weight space (SVD)")
    p.add_argument("--test-examples", type=int, default=512,
                   help="--compress: test examples scored (default 512; an `s2d run` arm uses its run's split)")
    p.add_argument("--timing-repeats", type=int, default=5, help="--compress: timed forwards per model (default 5)")
    p.add_argument("--onnx", action="store_true",
                   help="--compress: also export the dense and every factorised model as fp32 ONNX and time them "
                        "under ONNX Runtime on the CPU (the files go to a temporary folder)")
    p.add_argument("--quant", default=None, metavar="BITS:METHOD,...",
                   help="--compress: also quantize the dense and every factorised model with these PTQ cells "
                        "(e.g. W6A6:rtn,W4A4:repq; calibrated on the --calib-samples examples) and report max |a| "
                        "of the layer outputs and of the rank-r intermediates on 2 test batches")
    add_prompt_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_lowrank)


def cmd_lowrank(args: argparse.Namespace) -> int:
    if not 0 < args.threshold < 1:
        raise ValueError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    ratios = _ratios(args.compress) if args.compress else []
    if args.quant and not ratios:
        raise ValueError("--quant needs --compress (it quantizes the factorised models)")
    if args.onnx and not ratios:
        raise ValueError("--onnx needs --compress (it times the factorised models)")
    cells = parse_cells(args.quant, available_methods()) if args.quant else []
    for flag, value in (("--test-examples", args.test_examples), ("--timing-repeats", args.timing_repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if (Path(args.model) / "fingerprint.json").is_file():
        return _lowrank_run(args, Path(args.model))
    found = arm_task(args.model, args.data, args.batch_size)     # an `s2d run` arm: its model, data, split
    bundle, loaders = found[:2] if found else cli_task(args.model, args.data, max_length=args.max_length,
                                                       batch_size=args.batch_size, limit_eval=args.test_examples,
                                                       **prompt_options(args))
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size)
    layers = lowrank_table(bundle.model, calib, threshold=args.threshold, include_head=args.include_head,
                           progress=not args.no_progress)
    rows = [jsonable(r) for r in layers]
    grid = compression_grid(bundle.model, loaders, calib, layers, ratios, args.space, args.timing_repeats,
                            cells=cells, onnx=args.onnx, progress=not args.no_progress) if ratios else []
    out = Path(args.out or f"runs/lowrank-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lowrank.json", {"model": args.model, "threshold": args.threshold,
                                      "calib_samples": args.calib_samples, "layers": rows,
                                      "compression": [jsonable(g) for g in grid]})
    text = format_lowrank_table(rows)
    if grid:
        text += ("\n\nFactorised (block by block, no gradients) to keep a share of the analysed Linears' "
                 f"parameters; {len(loaders.test.dataset)} test examples, accuracy with a 95 % CI, paired "
                 "difference to the dense model; latency: one test batch, torch on the CPU, interleaved"
                 + (", and the same batch under ONNX Runtime (fp32 export, all graph optimizations)" if args.onnx else "")
                 + "\n\n"
                 + format_compression_table(grid))
    if cells:
        text += ("\n\nQuantized after factorising: max |a| on 2 test batches; PTQ accuracy with a 95 % CI and, in "
                 "brackets, its paired difference to the dense model's same cell\n\n" + format_quantized_table(grid))
    write_text(out / "lowrank.md", text + "\n")
    fig_lowrank(rows, out / "lowrank.png")
    print(text)
    print("\nwritten: " + ", ".join(f"{out}/{w}" for w in ("lowrank.json", "lowrank.md", "lowrank.png")))
    return 0


def _ratios(text: str) -> list[float]:
    """``--compress 0.9,0.7,0.5`` -> [0.9, 0.7, 0.5] (each in (0, 1))."""
    try:
        ratios = [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--compress must be comma-separated shares in (0, 1), got {text!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise ValueError(f"--compress must be comma-separated shares in (0, 1), got {text!r}")
    return ratios


def _lowrank_run(args: argparse.Namespace, run: Path) -> int:
    """Every arm and seed of an `s2d run` folder: the rank its Linears need, summarised per arm."""
    order = [a.name for a in from_dict(json.loads((run / "fingerprint.json").read_text())["config"]).arms]

    def key(path: Path) -> tuple[int, str, int]:        # the run's arm order, then the seed
        arm, seed = path.name.rsplit("@s", 1)
        return (order.index(arm) if arm in order else len(order), arm, int(seed))

    arms = sorted((p for p in (run / "arms").iterdir() if (p / "model.safetensors").is_file()), key=key)
    if not arms:
        raise ValueError(f"{run}: no arm models under {run / 'arms'} (run `s2d run` to the end first)")
    summaries = []
    for path in arms:
        bundle, loaders, seed, _ = arm_task(str(path), args.data, args.batch_size)
        calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size)
        layers = lowrank_table(bundle.model, calib, threshold=args.threshold, include_head=args.include_head,
                               progress=not args.no_progress)
        plans = {space: plan_ranks(layers, space, threshold=args.threshold) for space in SPACES}
        summaries.append({"arm": path.name.rsplit("@s", 1)[0], "seed": seed, "layers": [jsonable(r) for r in layers],
                          **{f"{space}_params": p.params / p.dense_params for space, p in plans.items()}})
    out = Path(args.out or f"runs/lowrank-{run.name}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "lowrank-arms.json", {"run": str(run), "threshold": args.threshold,
                                           "calib_samples": args.calib_samples, "arms": summaries})
    text = format_lowrank_arms_table(summaries)
    write_text(out / "lowrank-arms.md", text + "\n")
    print(text)
    print(f"\nwritten: {out}/lowrank-arms.json, {out}/lowrank-arms.md")
    return 0
