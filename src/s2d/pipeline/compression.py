"""`s2d lowrank --compress`: factorise a model at several parameter budgets and measure what each
keeps (accuracy with a paired CI against the dense model, agreement, parameters, CPU latency)."""
from __future__ import annotations

import copy
import time
from statistics import median

import torch
from torch import nn

from s2d.data import Loaders
from s2d.lowrank import LayerRank, factorise_model, plan_ranks
from s2d.lowrank.factorise import linear_params
from s2d.stats import cell_estimate, format_comparison, format_estimate, paired_comparison
from s2d.train import evaluate_outcomes
from s2d.utils import model_device, to_device

__all__ = ["compression_grid", "format_compression_table", "interleaved_ms"]


def interleaved_ms(models: list[nn.Module], batch: dict, repeats: int) -> list[float]:
    """Median ms of one forward per model, the models timed in turn within each repeat (side by side)."""
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for m in models:                       # warm-up
            m(**batch)
        for _ in range(repeats):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(**batch)
                times[i].append(1e3 * (time.perf_counter() - t0))
    return [median(t) for t in times]


def compression_grid(model: nn.Module, loaders: Loaders, calib: list[dict], rows: list[LayerRank],
                     ratios: list[float], space: str = "feature", repeats: int = 5,
                     progress: bool = False) -> list[dict]:
    """One row per budget (and the dense model first): plan, factorised model, accuracy, latency."""
    model.eval()
    dense = evaluate_outcomes(model, loaders.test, progress=progress)
    models, out = [model], [{"ratio": 1.0, "space": "dense", "threshold": 0.0, "layers": 0,
                             "linear_params": linear_params(rows)}]
    outcomes = [dense]
    for ratio in ratios:
        plan = plan_ranks(rows, space, ratio=ratio)
        small = factorise_model(copy.deepcopy(model), calib, plan, progress=progress).eval()
        models.append(small)
        outcomes.append(evaluate_outcomes(small, loaders.test, progress=progress))
        out.append({"ratio": ratio, "space": space, "threshold": plan.threshold, "layers": len(plan.ranks),
                    "linear_params": plan.params})
    batch = to_device(next(iter(loaders.test)), model_device(model), drop_labels=True)
    for row, m, o, ms in zip(out, models, outcomes, interleaved_ms(models, batch, repeats)):
        row.update(model_params=sum(p.numel() for p in m.parameters()), ms_per_batch=ms,
                   accuracy=cell_estimate(o.correct.numpy().astype(float)),
                   vs_dense=paired_comparison(o.correct.numpy().astype(float), dense.correct.numpy().astype(float)),
                   agreement=float((o.pred == dense.pred).float().mean()) if o.pred is not None else None)
    return out


def format_compression_table(rows: list[dict]) -> str:
    """Markdown: one line per budget: what was factorised, what it keeps, and its speed."""
    base = rows[0]
    lines = ["| budget | layers factorised | common threshold | Linear params | model params | accuracy % | "
             "vs dense (pp) | same prediction | ms / batch | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = "dense" if r["space"] == "dense" else f"{r['ratio']:.0%} ({r['space']})"
        vs = "-" if r["space"] == "dense" else format_comparison(r["vs_dense"])
        same = "-" if r["agreement"] is None or r["space"] == "dense" else f"{100 * r['agreement']:.1f} %"
        lines.append(f"| {budget} | {r['layers']} | {r['threshold']:.3f} | {r['linear_params']:,} | "
                     f"{r['model_params']:,} | {format_estimate(r['accuracy'])} | {vs} | {same} | "
                     f"{r['ms_per_batch']:.1f} | {base['ms_per_batch'] / r['ms_per_batch']:.2f}x |")
    return "\n".join(lines)
