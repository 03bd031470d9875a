"""Calibration time and W/A accuracy of each PTQ method (RTN, PTQ4ViT, RepQ-ViT, ERQ) on one model.

Default: minilm-l6 with a fresh 2-class head, briefly fine-tuned on rotten-tomatoes (so that accuracy
means something), 32 calibration samples, W4A4. For every method the same float model (deepcopy) and
the same calibration batches; reports wall-clock calibration seconds (``quantize_model`` call),
validation accuracy and agreement with the float model (argmax agreement, mean cosine of logits).

    .venv/bin/python benchmarks/bench_ptq.py --out bench_ptq.json [--steps 150] [--methods rtn,erq]

Output: one JSON object (written atomically) with the machine, settings and a row per method.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s2d.data import build_loaders, calibration_batches
from s2d.models import load
from s2d.quant import QuantSpec
from s2d.quant.apply import available_methods, quantize_model


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
            loss, done = float(out.loss), done + 1
            if done >= steps:
                break
    return loss


@torch.no_grad()
def logits_on(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for b in batches:
        logits.append(model(**{k: v for k, v in b.items() if k != "labels"}).logits)
        labels.append(b["labels"])
    return torch.cat(logits), torch.cat(labels)


def compare(method: str, model, spec: QuantSpec, calib, eval_batches, ref_logits) -> dict:
    t0 = time.perf_counter()
    quantize_model(model, spec, method=method, calib=calib, progress=False)
    seconds = time.perf_counter() - t0
    logits, labels = logits_on(model, eval_batches)
    return {"method": method, "calib_seconds": round(seconds, 2),
            "accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
            "logit_cosine": float(F.cosine_similarity(logits, ref_logits, dim=-1).mean())}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--methods", default="rtn,ptq4vit,repq,erq")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps before quantizing (0: none)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    bundle = load(args.model, task="classification", num_labels=2)
    loaders = build_loaders(args.dataset, bundle, batch_size=32, eval_batch_size=64, seed=args.seed,
                            limit_eval=args.eval_samples)
    t0 = time.perf_counter()
    last_loss = finetune_briefly(bundle.model, loaders.train, args.steps, args.lr, args.seed) if args.steps else None
    ft_seconds = time.perf_counter() - t0
    calib = calibration_batches(loaders, num_samples=args.calib_samples, seed=args.seed)
    eval_batches = list(loaders.val)
    ref_logits, labels = logits_on(bundle.model, eval_batches)
    spec = QuantSpec(w_bits=args.w_bits, a_bits=args.a_bits)
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
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "dataset": args.dataset, "spec": spec.name,
              "calib_samples": args.calib_samples, "finetune_steps": args.steps,
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
