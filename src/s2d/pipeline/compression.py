"""`s2d lowrank --compress`: factorise a model at several parameter budgets and measure what each
keeps (accuracy with a paired CI against the dense model, agreement, parameters, CPU latency in torch
and, with ``--onnx``, exported as fp32 ONNX under ONNX Runtime) and, with ``--quant``, how it quantizes
(max |a| of the layer outputs and of the rank-r intermediates, and PTQ accuracy paired against the
dense model's at the same cell)."""
from __future__ import annotations

import copy
import tempfile
import time
from itertools import islice
from statistics import median

import numpy as np
import torch
from torch import nn

from s2d.data import Loaders
from s2d.deploy import OnnxClassifier, export_onnx
from s2d.lowrank import LayerRank, factorise_model, plan_ranks
from s2d.lowrank.factorise import linear_params
from s2d.pipeline.evidence import format_ratio
from s2d.pipeline.experiment import ptq_cell
from s2d.probes import capture_activations
from s2d.quant import Bits, QuantConfig
from s2d.stats import cell_estimate, format_comparison, format_estimate, paired_comparison
from s2d.train import evaluate_outcomes
from s2d.utils import model_device, to_device

__all__ = ["compression_grid", "format_compression_table", "format_quantized_table", "interleaved_ms", "onnx_latency",
           "parse_cells"]


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


def parse_cells(text: str, methods: list[str]) -> list[tuple[Bits, str]]:
    """``"W6A6:rtn,W4A4:repq"`` -> [(Bits(6, 6), "rtn"), (Bits(4, 4), "repq")] (methods: the registered ones)."""
    cells = []
    for item in text.split(","):
        bits, sep, method = item.strip().partition(":")
        if not sep or method not in methods:
            raise ValueError(f"--quant must be comma-separated BITS:METHOD cells with METHOD one of "
                             f"{', '.join(methods)}, e.g. W6A6:rtn,W4A4:repq; got {item.strip()!r}")
        cells.append((Bits.parse(bits, "--quant"), method))
    return cells


def output_max_abs(model: nn.Module, layers: list[str], probe: list[dict]) -> tuple[float, float | None]:
    """(max |a| over the outputs of ``layers``, max |a| over the rank-r intermediates of the factorised
    ones, None when none is factorised) on the ``probe`` batches; a factorised layer's output is its
    second factor's."""
    mods = dict(model.named_modules())
    inner = {f"{n}.0": mods[f"{n}.0"] for n in layers if isinstance(mods[n], nn.Sequential)}
    stats = capture_activations(model, probe, {**{n: mods[n] for n in layers}, **inner}, sample_size=0)
    outer = max(stats[n].max_abs for n in layers if n in stats)
    return outer, max((stats[n].max_abs for n in inner if n in stats), default=None)


def compression_grid(model: nn.Module, loaders: Loaders, calib: list[dict], rows: list[LayerRank],
                     ratios: list[float], space: str = "feature", repeats: int = 5,
                     cells: list[tuple[Bits, str]] = (), probe: list[dict] | None = None,
                     onnx: bool = False, progress: bool = False) -> list[dict]:
    """One row per budget (and the dense model first): plan, factorised model, accuracy, latency; with
    ``cells``, also max |a| on ``probe`` (default: the first 2 test batches) and one PTQ cell per
    (bits, method), calibrated on ``calib``, paired against the dense model's same cell; with ``onnx``,
    also each model's latency as fp32 ONNX under ONNX Runtime (:func:`onnx_latency`)."""
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
    if onnx:
        for row, extra in zip(out, onnx_latency(models, batch, repeats)):
            row.update(extra)
    for row, m, o, ms in zip(out, models, outcomes, interleaved_ms(models, batch, repeats)):
        row.update(model_params=sum(p.numel() for p in m.parameters()), ms_per_batch=ms,
                   accuracy=cell_estimate(_hits(o)), vs_dense=paired_comparison(_hits(o), _hits(dense)),
                   agreement=float((o.pred == dense.pred).float().mean()) if o.pred is not None else None)
        if o.nll is not None:                  # a causal LM: held-out perplexity, its NLL paired to the dense one
            row.update(perplexity=o.perplexity,
                       nll_vs_dense=paired_comparison(o.nll.double().numpy(), dense.nll.double().numpy()))
    if cells:
        _quantized(out, models, loaders, calib, rows, cells, probe, progress)
    return out


def onnx_latency(models: list[nn.Module], batch: dict, repeats: int) -> list[dict]:
    """Per model: ``onnx_ms_per_batch`` (median ms of one ONNX Runtime forward of ``batch``, fp32, all
    graph optimizations, the sessions timed in turn as in :func:`interleaved_ms`), ``onnx_bytes`` (the
    file) and ``onnx_max_logit_diff`` (max |ONNX logits − torch logits| on ``batch``). The files are
    written to a temporary folder and removed."""
    cpu = {k: v.cpu() for k, v in batch.items()}
    with tempfile.TemporaryDirectory() as tmp:
        files = [export_onnx(m, f"{tmp}/{i}.onnx", cpu, "fp32") for i, m in enumerate(models)]
        sessions = [OnnxClassifier(f.path) for f in files]
        ms = interleaved_ms(sessions, cpu, repeats)
        with torch.no_grad():
            diffs = [float((s(**cpu).logits - m(**batch).logits.cpu()).abs().max()) for s, m in zip(sessions, models)]
    return [{"onnx_ms_per_batch": t, "onnx_bytes": f.bytes, "onnx_max_logit_diff": d}
            for t, f, d in zip(ms, files, diffs)]


def _hits(o) -> np.ndarray:
    return o.correct.numpy().astype(float)


def _quantized(out: list[dict], models: list[nn.Module], loaders: Loaders, calib: list[dict],
               rows: list[LayerRank], cells: list[tuple[Bits, str]], probe: list[dict] | None,
               progress: bool) -> None:
    """Add ``max_abs``, ``inner_max_abs`` and ``quant`` (cell name -> accuracy, vs the dense cell) to each row."""
    probe = probe if probe is not None else list(islice(iter(loaders.test), 2))
    dense_hits: dict[str, np.ndarray] = {}
    for row, m in zip(out, models):
        row["max_abs"], row["inner_max_abs"] = output_max_abs(m, [r.name for r in rows], probe)
        row["quant"] = {}
        for bits, method in cells:
            name = f"{bits.name} {method}"
            hits = _hits(ptq_cell(m, QuantConfig(w_bits=bits.w, a_bits=bits.a), method, calib, loaders.test,
                                  progress))
            dense_hits.setdefault(name, hits)
            row["quant"][name] = {"accuracy": cell_estimate(hits),
                                  "vs_dense": paired_comparison(hits, dense_hits[name])}


def format_compression_table(rows: list[dict]) -> str:
    """Markdown: one line per budget: what was factorised, what it keeps, and its speed; for a causal LM
    also its perplexity and the perplexity ratio to the dense model (exp of the paired NLL difference);
    with ONNX timings (:func:`onnx_latency`), the file size, its logits' distance to torch's, and its speed."""
    base, lm, onnx = rows[0], "perplexity" in rows[0], "onnx_ms_per_batch" in rows[0]
    lines = ["| budget | layers factorised | common threshold | Linear params | model params | accuracy % | "
             "vs dense (pp) | same prediction | " + ("perplexity | vs dense (%) | " if lm else "")
             + "ms / batch | speed-up |" + (" ONNX MB | ONNX max abs(Δ logit) | ONNX ms / batch | ONNX speed-up |" if onnx else ""),
             "|---|---|---|---|---|---|---|---|" + "---|---|" * lm + "---|---|" + "---|---|---|---|" * onnx]
    for r in rows:
        dense = r["space"] == "dense"
        budget = "dense" if dense else f"{r['ratio']:.0%} ({r['space']})"
        vs = "-" if dense else format_comparison(r["vs_dense"])
        same = "-" if r["agreement"] is None or dense else f"{100 * r['agreement']:.1f} %"
        ppl = f"{r['perplexity']:.2f} | {'-' if dense else format_ratio(r['nll_vs_dense'])} | " if lm else ""
        lines.append(f"| {budget} | {r['layers']} | {r['threshold']:.3f} | {r['linear_params']:,} | "
                     f"{r['model_params']:,} | {format_estimate(r['accuracy'])} | {vs} | {same} | {ppl}"
                     f"{r['ms_per_batch']:.1f} | {base['ms_per_batch'] / r['ms_per_batch']:.2f}x |"
                     + (f" {r['onnx_bytes'] / 1e6:.1f} | {r['onnx_max_logit_diff']:.1e} | {r['onnx_ms_per_batch']:.1f} | "
                        f"{base['onnx_ms_per_batch'] / r['onnx_ms_per_batch']:.2f}x |" if onnx else ""))
    return "\n".join(lines)



def format_quantized_table(rows: list[dict]) -> str:
    """Markdown: per budget, max |a| and every PTQ cell's accuracy (and its paired difference to the dense
    model's same cell)."""
    names = list(rows[0]["quant"])
    lines = ["| budget | max abs(a), layer outputs | max abs(a), rank-r intermediates | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        dense = r["space"] == "dense"
        budget = "dense" if dense else f"{r['ratio']:.0%} ({r['space']})"
        inner = "-" if r["inner_max_abs"] is None else f"{r['inner_max_abs']:.1f}"
        cells = [format_estimate(c["accuracy"]) + ("" if dense else f" ({format_comparison(c['vs_dense'])})")
                 for c in r["quant"].values()]
        lines.append(f"| {budget} | {r['max_abs']:.1f} | {inner} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
