"""`s2d inspect`: the per-layer diagnostics of a model, where its FFN outputs peak, and (with
``--sensitivity``) which quantization sites cost the accuracy. Also the model + data loading that
every subcommand shares (:func:`cli_task`)."""
from __future__ import annotations

import argparse
import dataclasses
import json
from itertools import islice
from pathlib import Path

from safetensors.torch import load_model

from s2d import assets
from s2d.data import Loaders, calibration_batches
from s2d.models import ModelBundle, ffn_modules
from s2d.pipeline.config import DataConfig, ModelConfig
from s2d.pipeline.experiment import load_task
from s2d.pipeline.figures import fig_max_abs_per_layer, fig_sensitivity, fig_violins
from s2d.pipeline.parse import from_dict
from s2d.pipeline.tables import format_inspect_table, format_peak_table, format_sensitivity_table
from s2d.probes import capture_activations, peak_locations, spectral_table
from s2d.quant import Bits, QuantConfig, available_methods
from s2d.quant.sensitivity import first_examples, site_sensitivity
from s2d.utils import jsonable, write_json, write_text

__all__ = ["add_inspect", "cmd_inspect", "cli_task", "arm_task", "add_prompt_arguments", "prompt_options"]


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="diagnostics of a model: per-layer σ_max, PCDR, max |a|, violins",
                       description="Per-layer table (σ_max, PCDR_1..k, k_target, max |a|, kurtosis) of every "
                                   "Linear on a few real batches; where each FFN down-projection peaks (token "
                                   "position, token, channel, PCDR_1..k: the massive activations of LLMs); FFN "
                                   "activation violins and a plot of max |a| per layer. Causal LMs read the "
                                   "texts through --prompt (default 'Text: {text}\\nLabel:').")
    p.add_argument("model", help="s2d asset name, local Hugging Face directory, or hub id")
    p.add_argument("--data", default=None,
                   help="dataset asset or path (default: rotten-tomatoes for text, fashion-mnist for images)")
    p.add_argument("--out", default=None, help="output directory (default runs/inspect-<model>)")
    p.add_argument("--batches", type=int, default=2, help="number of batches to run (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    add_prompt_arguments(p)
    p.add_argument("--k-max", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.95)
    p.add_argument("--sensitivity", default=None, metavar="WxAy",
                   help="also rank every quantization site (Linear input / weight, attention matmul input) by "
                        "the damage it does quantized alone at these bits, and what keeping it in float recovers")
    p.add_argument("--method", default="rtn", help="PTQ method that calibrates the sites (default rtn)")
    p.add_argument("--sensitivity-examples", type=int, default=256,
                   help="held-out test examples scored per site (default 256)")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="training examples that calibrate the sites, also scored per site (default 32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_inspect)


def _default_data(model: str) -> str:
    if (model in assets.REGISTRY and "dinov2" in model) or model.startswith("timm:"):
        return "fashion-mnist"
    return "rotten-tomatoes"


def cli_task(model: str, data: str | None, *, max_length: int = 64, batch_size: int = 32,
             limit_train: int | None = None, limit_eval: int | None = None, seed: int = 0,
             prompt: str | None = None, label_words: list[str] | None = None) -> tuple[ModelBundle, Loaders]:
    """The model with a head for the data and its loaders, as every subcommand loads them (causal LMs:
    ``prompt`` and ``label_words`` as in an `s2d run` config)."""
    data = data or _default_data(model)
    return load_task(ModelConfig(model), DataConfig(data, max_length=max_length, limit_train=limit_train,
                                                    limit_eval=limit_eval, prompt=prompt,
                                                    label_words=tuple(label_words) if label_words else None),
                     batch_size=batch_size, eval_batch_size=batch_size, seed=seed)


def arm_task(path: str, data: str | None, batch_size: int = 32) -> tuple[ModelBundle, Loaders, int, str] | None:
    """An `s2d run` arm directory (RUN/arms/<arm>@s<seed>) as (its trained model, its run's data (or
    ``data``) with its split, its seed, the dataset's name); None when ``path`` is not such a directory."""
    arm = Path(path)
    fingerprint = arm.parent.parent / "fingerprint.json"
    if not ((arm / "model.safetensors").is_file() and (arm / "result.json").is_file() and fingerprint.is_file()):
        return None
    cfg = from_dict(json.loads(fingerprint.read_text())["config"])
    data_cfg = cfg.data if data is None else dataclasses.replace(cfg.data, dataset=data)
    seed = int(json.loads((arm / "result.json").read_text())["seed"])
    bundle, loaders = load_task(cfg.model, data_cfg, batch_size=batch_size, eval_batch_size=batch_size, seed=seed)
    load_model(bundle.model, str(arm / "model.safetensors"))
    return bundle, loaders, seed, data_cfg.dataset


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """``--prompt`` and ``--label-words`` (causal LMs), read back by :func:`prompt_options`."""
    p.add_argument("--prompt", default=None, help="causal LMs: the prompt around each text, with one {text} "
                                                 "(default 'Text: {text}\\nLabel:')")
    p.add_argument("--label-words", default=None, metavar="W,W,...",
                   help="causal LMs: one single-token answer word per class (default: the label names)")


def prompt_options(args: argparse.Namespace) -> dict:
    """``--prompt`` (a literal ``\\n`` becomes a newline) and ``--label-words W,W`` as :func:`cli_task` keywords."""
    return {"prompt": args.prompt.replace("\\n", "\n") if args.prompt else None,
            "label_words": [w.strip() for w in args.label_words.split(",")] if args.label_words else None}


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    bits = Bits.parse(args.sensitivity, "--sensitivity") if args.sensitivity else None
    if bits is not None and args.method not in available_methods():
        raise ValueError(f"--method must be one of {', '.join(available_methods())}, got {args.method!r}")
    for flag, value in (("--sensitivity-examples", args.sensitivity_examples), ("--calib-samples", args.calib_samples)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    n_eval = args.batches * args.batch_size
    bundle, loaders = cli_task(args.model, args.data, max_length=args.max_length, batch_size=args.batch_size,
                               limit_eval=max(n_eval, args.sensitivity_examples) if bits else n_eval,
                               **prompt_options(args))
    batches = list(islice(iter(loaders.test), args.batches))
    progress = not args.no_progress
    table = [jsonable(r) for r in spectral_table(bundle.model, batches, k_max=args.k_max, tau=args.tau,
                                                  progress=progress)]
    ffn = ffn_modules(bundle.model)
    acts = {k: jsonable(v) for k, v in capture_activations(bundle.model, batches, modules=ffn,
                                                            sample_size=2048, progress=progress).items()}
    peaks = {k: jsonable(v) for k, v in peak_locations(bundle.model, batches, modules=ffn, progress=progress).items()}
    tokens = {k: bundle.tokenizer.decode([p["token_id"]]) for k, p in peaks.items()
              if bundle.tokenizer is not None and p["token_id"] is not None}
    out = Path(args.out or f"runs/inspect-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "layers.json", {"model": args.model, "layers": table, "activations": acts, "peaks": peaks})
    fig_violins({args.model: acts}, out / "violins.png")
    fig_max_abs_per_layer(table, out / "max_abs_per_layer.png")
    text = format_inspect_table(table)
    peak_text = format_peak_table(table, peaks, tokens)
    write_text(out / "layers.md", text + "\n\n" + peak_text + "\n")
    print(text)
    print("\nFFN down-projections: the largest |a|, where it sits, and the PCDR of that entry\n" + peak_text)
    worst = max(peaks.values(), key=lambda p: p["max_abs"], default=None)
    if worst is not None:
        print(f"\nlargest FFN activation: |a| = {worst['max_abs']:.1f} in {worst['name']}, token position "
              f"{worst['token']} ({tokens.get(worst['name'], '-')!r}), channel {worst['channel']}")
    written = ["layers.json", "layers.md", "violins.png", "max_abs_per_layer.png"]
    if bits is not None:
        written += _inspect_sensitivity(args, bundle, loaders, bits, table, out)
    print("\nwritten: " + ", ".join(f"{out}/{w}" for w in written))
    return 0


def _inspect_sensitivity(args: argparse.Namespace, bundle: ModelBundle, loaders: Loaders, bits: Bits,
                         table: list[dict], out: Path) -> list[str]:
    """``s2d inspect --sensitivity``: rank the sites, print the top 15, write the table and figure."""
    calib = calibration_batches(loaders, num_samples=args.calib_samples, batch_size=args.batch_size)
    test = first_examples(loaders.test, args.sensitivity_examples)
    rep = jsonable(site_sensitivity(bundle.model, QuantConfig(w_bits=bits.w, a_bits=bits.a), calib, test, method=args.method,
                                    batch_size=args.batch_size, recover_top=15, progress=not args.no_progress))
    write_json(out / "sensitivity.json", rep)
    text = format_sensitivity_table(rep, table)
    write_text(out / "sensitivity.md", text + "\n")
    fig_sensitivity({args.model: rep}, out / "sensitivity.png")
    acc = "" if rep["quant_accuracy"] is None else (f": accuracy {100 * rep['float_accuracy']:.1f}% float, "
                                                     f"{100 * rep['quant_accuracy']:.1f}% quantized")
    print(f"\nquantization sites at {rep['bits']} ({rep['method']}, {rep['examples']} held-out examples{acc}); "
          f"the 15 most damaging, quantized alone:\n" + format_sensitivity_table(rep, table, top=15))
    return ["sensitivity.json", "sensitivity.md", "sensitivity.png"]
