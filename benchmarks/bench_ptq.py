"""Calibration time and W/A accuracy of each PTQ method (RTN, PTQ4ViT, RepQ-ViT, ERQ) on one model.

Default: minilm-l6 with a fresh 2-class head fitted on rotten-tomatoes (so that accuracy means
something), max_length 64, 32 calibration samples, W4A4, every method with its default config. For
every method the same float model (deepcopy) and the same calibration batches; reports wall-clock
calibration seconds (the ``quantize_model`` call), validation accuracy and agreement with the float
model (argmax agreement, mean cosine of logits).

Fitting the head: ``--finetune head`` (default) trains only the classifier on frozen features of
``--train-samples`` training examples (a linear probe: seconds on a CPU); ``--finetune full`` runs
``--steps`` AdamW steps on the whole model; ``none`` keeps the random head.

    .venv/bin/python benchmarks/bench_ptq.py --out bench_ptq.json [--finetune full --steps 150] [--methods rtn,erq]

Output: one JSON object (printed, and written atomically with --out) with the machine, settings and a
row per method.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s2d.data import build_loaders, calibration_batches
from s2d.models import load
from s2d.quant import QuantConfig, available_methods, quantize_model
from s2d.utils import write_json


def finetune_briefly(model: torch.nn.Module, loader, steps: int, lr: float, seed: int) -> float:
    """Plain AdamW for ``steps`` steps (a few dozen to a few hundred); returns the last loss."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    done, loss = 0, float("nan")
    while done < steps:
        for batch in loader:
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            loss, done = float(out.loss.detach()), done + 1
            if done >= steps:
                break
    return loss


def fit_head(model: torch.nn.Module, loader, samples: int, steps: int = 300, lr: float = 1e-2) -> float:
    """Train only ``model.classifier`` (full-batch Adam) on frozen features of ``samples`` training
    examples: the classifier's inputs are recorded once with a forward pre-hook. Returns the last loss."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise SystemExit(f"--finetune head needs a model with a .classifier module, got {type(model).__name__}")
    feats, labels = [], []
    hook = head.register_forward_pre_hook(lambda mod, args: feats.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                model(**{k: v for k, v in batch.items() if k != "labels"})
                labels.append(batch["labels"])
                if sum(len(y) for y in labels) >= samples:
                    break
    finally:
        hook.remove()
    x, y = torch.cat(feats)[:samples], torch.cat(labels)[:samples]
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = F.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


@torch.no_grad()
def logits_on(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for b in batches:
        logits.append(model(**{k: v for k, v in b.items() if k != "labels"}).logits)
        labels.append(b["labels"])
    return torch.cat(logits), torch.cat(labels)


def compare(method: str, model, spec: QuantConfig, calib, eval_batches, ref_logits) -> dict:
    t0 = time.perf_counter()
    quantize_model(model, spec, method=method, calib=calib, progress=False)
    seconds = time.perf_counter() - t0
    logits, labels = logits_on(model, eval_batches)
    return {"method": method, "calib_seconds": round(seconds, 2),
            "accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "logit_cosine": float(F.cosine_similarity(logits, ref_logits, dim=-1).mean())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--methods", default="rtn,ptq4vit,repq,erq")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--finetune", choices=("head", "full", "none"), default="head")
    ap.add_argument("--train-samples", type=int, default=512, help="examples for --finetune head")
    ap.add_argument("--steps", type=int, default=150, help="AdamW steps for --finetune full")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bundle = load(args.model, task="classification", num_labels=2)
    loaders = build_loaders(args.dataset, bundle, batch_size=32, eval_batch_size=64, seed=args.seed,
                            max_length=args.max_length, limit_eval=args.eval_samples)
    t0 = time.perf_counter()
    last_loss = None
    if args.finetune == "full":
        last_loss = finetune_briefly(bundle.model, loaders.train, args.steps, args.lr, args.seed)
    elif args.finetune == "head":
        last_loss = fit_head(bundle.model, loaders.train, args.train_samples)
    ft_seconds = time.perf_counter() - t0
    calib = calibration_batches(loaders, num_samples=args.calib_samples, seed=args.seed)
    eval_batches = list(loaders.val)
    ref_logits, labels = logits_on(bundle.model, eval_batches)
    spec = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits)
    rows = [{"method": "float", "calib_seconds": 0.0,
             "accuracy": float((ref_logits.argmax(-1) == labels).float().mean()), "agreement": 1.0,
             "logit_cosine": 1.0}]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(available_methods())
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; available: {available_methods()}")
    for method in methods:
        torch.manual_seed(args.seed)
        rows.append(compare(method, copy.deepcopy(bundle.model), spec, calib, eval_batches, ref_logits))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {"model": args.model, "dataset": args.dataset, "spec": spec.name,
              "calib_samples": args.calib_samples, "max_length": args.max_length, "finetune": args.finetune,
              "finetune_steps": args.steps if args.finetune == "full" else None,
              "train_samples": args.train_samples if args.finetune == "head" else None,
              "finetune_seconds": round(ft_seconds, 1), "finetune_last_loss": last_loss,
              "eval_samples": int(labels.numel()),
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
