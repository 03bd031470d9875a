"""`s2d condition`: make an already fine-tuned model quantization-friendly without labels.

S2D's relative update runs under self-distillation toward the model's own outputs
(:func:`s2d.train.condition`) on the training inputs; the conditioned model is written as a Hugging
Face directory with a before/after report: σ_max, PCDR and max |a| per layer, agreement with the
original model in float and quantized at ``--bits``, and the accuracies (the test split's labels are
read for these only).
"""
from __future__ import annotations

import argparse
import math
from itertools import islice
from pathlib import Path

from torch import nn

from s2d.data import Loaders, calibration_batches
from s2d.models import ModelBundle
from s2d.pipeline.config import scale_interval
from s2d.pipeline.evidence import selected_max_abs
from s2d.pipeline.experiment import ptq_cell
from s2d.pipeline.inspection import add_prompt_arguments, arm_task, cli_task, prompt_options
from s2d.pipeline.tables import format_condition_table
from s2d.probes import spectral_table
from s2d.quant import Bits, QuantConfig, available_methods
from s2d.quant.sensitivity import first_examples
from s2d.regularizer import S2DConfig
from s2d.train import ConditionConfig, Outcomes, condition, evaluate_outcomes
from s2d.utils import jsonable, write_json, write_text

__all__ = ["add_condition", "cmd_condition"]


def add_condition(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("condition", help="make a fine-tuned model quantization-friendly without labels",
                       description="Run S2D (relative update: each PCDR-selected σ loses --fraction per refresh) "
                                   "under self-distillation toward MODEL's own outputs on the training inputs of "
                                   "--data, guarded by the held-out KL to the original. Writes the conditioned model "
                                   "(DIR/model: safetensors + config) and a before/after report (DIR/report.md).")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory (e.g. from `s2d finetune`), or an arm "
                                 "of an `s2d run` (RUN/arms/adamw@s0: its model, dataset, split and seed)")
    p.add_argument("--data", default=None, help="dataset asset or path (inputs; the test labels serve the accuracies "
                                                "only); required unless MODEL is a run's arm")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=60, help="self-distillation steps (default 60)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--fraction", type=float, default=0.5,
                   help="share of each selected singular value removed per refresh interval (default 0.5)")
    p.add_argument("--interval", type=int, default=None, help="steps between refreshes (default: steps / 4)")
    p.add_argument("--tau", type=float, default=0.95, help="PCDR threshold of the selection (default 0.95)")
    p.add_argument("--k-max", type=int, default=3)
    p.add_argument("--guard-examples", type=int, default=128, help="held-out inputs of the guard (0: no guard)")
    p.add_argument("--guard-tolerance", type=float, default=0.02,
                   help="largest rise of the held-out KL (nats) one layer's decay may cause per interval")
    p.add_argument("--bits", default="W4A4", help="WxAy at which the quantized agreement is measured")
    p.add_argument("--method", default="rtn", help="PTQ method of that measurement (default rtn)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-eval", type=int, default=None)
    add_prompt_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_condition)


def _s2d_config(args: argparse.Namespace) -> S2DConfig:
    base = S2DConfig(update="relative", fraction=args.fraction, tau=args.tau, k_max=args.k_max,
                     interval=args.interval or 100, guard_tolerance=args.guard_tolerance)
    return base if args.interval else scale_interval(base, args.steps, 4)[0]


def cmd_condition(args: argparse.Namespace) -> int:
    bits = Bits.parse(args.bits, "--bits")
    if args.method not in available_methods():
        raise ValueError(f"--method must be one of {', '.join(available_methods())}, got {args.method!r}")
    for flag, value, low in (("--steps", args.steps, 1), ("--interval", args.interval, 1),
                             ("--guard-examples", args.guard_examples, 0), ("--calib-samples", args.calib_samples, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.fraction < 1:
        raise ValueError(f"--fraction must be in (0, 1), got {args.fraction}")
    s2d_config = _s2d_config(args)
    bundle, loaders = _load(args)          # a run's arm sets args.seed and args.data to its own
    cond = ConditionConfig(steps=args.steps, lr=args.lr, guard_examples=args.guard_examples, seed=args.seed)
    progress = not args.no_progress
    quant = QuantConfig(w_bits=bits.w, a_bits=bits.a)
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size, seed=args.seed)
    probe = list(islice(iter(loaders.test), 2))
    before = _measure(bundle.model, loaders, probe, quant, args.method, calib, s2d_config, progress)
    guard = first_examples(loaders.val, cond.guard_examples) if cond.guard_examples else None
    result = condition(bundle.model, loaders.train, cond, s2d_config, guard_batches=guard, progress=progress)
    after = _measure(bundle.model, loaders, probe, quant, args.method, calib, s2d_config, progress)
    out = Path(args.out)
    _save(bundle, out / "model")
    summary = _summary(args, before, after, result.wall_s)
    write_json(out / "condition.json", {"summary": summary, "condition": jsonable(result),
                                        "before": before["layers"], "after": after["layers"]})
    text = _report(summary, before, after)
    write_text(out / "report.md", text)
    print(text)
    print(f"written: {out}/model, {out}/condition.json, {out}/report.md")
    return 0


def _load(args: argparse.Namespace) -> tuple[ModelBundle, Loaders]:
    """MODEL and --data as every subcommand loads them, or a run's arm with its own data and seed."""
    found = arm_task(args.model, args.data, args.batch_size)
    if found is not None:
        bundle, loaders, args.seed, args.data = found
        return bundle, loaders
    if args.data is None:
        raise ValueError(f"--data is required: {args.model} is not the arm directory of an `s2d run`")
    return cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                    limit_train=args.limit_train, limit_eval=args.limit_eval, seed=args.seed, **prompt_options(args))


def _measure(model: nn.Module, loaders: Loaders, probe: list[dict], quant: QuantConfig, method: str,
             calib: list[dict], s2d_config: S2DConfig, progress: bool) -> dict:
    """The per-layer table and the float and quantized outcomes of ``model`` on the test split."""
    layers = [jsonable(r) for r in spectral_table(model, probe, k_max=s2d_config.k_max, tau=s2d_config.tau,
                                                   progress=progress)]
    return {"layers": layers, "float": evaluate_outcomes(model, loaders.test, progress=progress),
            "quant": ptq_cell(model, quant, method, calib, loaders.test, progress)}


def _save(bundle: ModelBundle, path: Path) -> None:
    bundle.model.save_pretrained(path)
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(path)


def _agreement(a: Outcomes, b: Outcomes) -> float:
    return float((a.pred == b.pred).float().mean())


def _summary(args: argparse.Namespace, before: dict, after: dict, wall_s: float) -> dict:
    worst_before, worst_after, names = selected_max_abs(before["layers"], after["layers"])
    ref = before["float"]
    return {"model": args.model, "data": args.data, "bits": args.bits, "method": args.method, "steps": args.steps,
            "fraction": args.fraction, "selected_layers": names, "selected_max_abs_before": worst_before,
            "selected_max_abs_after": worst_after, "test_examples": int(ref.correct.numel()),
            "float_accuracy_before": float(ref.correct.float().mean()),
            "float_accuracy_after": float(after["float"].correct.float().mean()),
            "quant_accuracy_before": float(before["quant"].correct.float().mean()),
            "quant_accuracy_after": float(after["quant"].correct.float().mean()),
            "float_agreement": _agreement(after["float"], ref),
            "quant_agreement_before": _agreement(before["quant"], ref),
            "quant_agreement_after": _agreement(after["quant"], ref), "wall_s": wall_s}


def _report(s: dict, before: dict, after: dict) -> str:
    ratio = s["selected_max_abs_before"] / s["selected_max_abs_after"] if s["selected_layers"] else math.nan
    pct = "{:.2f}%".format
    lines = [f"# s2d condition: {s['model']} on {s['data']}", "",
             f"{s['steps']} steps of self-distillation, fraction {s['fraction']}, {s['test_examples']} test examples; "
             f"agreement = share of test examples whose top-1 equals the original float model's.", "",
             "| | original | conditioned |", "|---|---|---|",
             f"| float accuracy | {pct(100 * s['float_accuracy_before'])} | {pct(100 * s['float_accuracy_after'])} |",
             f"| {s['bits']} {s['method']} accuracy | {pct(100 * s['quant_accuracy_before'])} | "
             f"{pct(100 * s['quant_accuracy_after'])} |",
             f"| float agreement with the original | 100.00% | {pct(100 * s['float_agreement'])} |",
             f"| {s['bits']} agreement with the original | {pct(100 * s['quant_agreement_before'])} | "
             f"{pct(100 * s['quant_agreement_after'])} |",
             f"| max \\|a\\| of the {len(s['selected_layers'])} PCDR-selected layers | {s['selected_max_abs_before']:.1f} | "
             f"{s['selected_max_abs_after']:.1f} ({ratio:.1f}x lower) |", "",
             "## Per layer (before -> after)", "", format_condition_table(before["layers"], after["layers"]), ""]
    return "\n".join(lines)
