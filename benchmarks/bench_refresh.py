"""S2D cost benchmark: training overhead (sync vs async refresh) and refresh-pass time per model shape.

    python benchmarks/bench_refresh.py                      # CPU, writes benchmarks/results/refresh-cpu.json
    python benchmarks/bench_refresh.py --device cuda --out refresh-h100.json

Parts (JSON keys):
* ``overhead``: a MiniLM-L6-shaped BERT classifier (the cached ``minilm-l6`` asset when present, else a
  random model of the same shape: hidden 384, 6 layers, FFN 1536) trained with AdamW; for interval
  100 and 10, the extra wall time per step of S2D (sync, and async with ``async_lead=3``) over plain
  AdamW. Measured (minimum over repetitions): the plain step, the non-refresh S2D step (penalty only)
  and the extra time a refresh adds to the steps that carry it (sync: the due step; async: the
  ``lead + 1`` steps from its start to its installation); the per-interval overhead is then
  ``(refresh_extra + interval · penalty_extra) / (interval · plain_step)``.
* ``refresh_pass``: one refresh (spectra + PCDR + rank selection, ``compute_refresh``) of every
  Linear of ViT-B/16 and of a Qwen2.5-0.5B-shaped LLM, against ``torch.linalg.svd`` on the same
  weights, and the busiest rank's share when the work is partitioned over 8 ranks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from s2d.regularizer import ActivationPeak, S2DConfig, SelectiveSpectralDecay, compute_refresh
from s2d.regularizer.sharding import partition
from s2d.utils import write_json

logger = logging.getLogger("bench_refresh")

VIT_B = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(1000, 768)]
QWEN_05B = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)] * 24


@dataclass
class Overhead:
    interval: int
    mode: str                 # "sync" | "async"
    refresh_extra_s: float    # extra seconds per refresh (the steps it touches, minus plain steps)
    penalty_extra_s: float    # extra seconds of a non-refresh step
    overhead_pct: float       # per-step overhead over plain AdamW at this interval


@dataclass
class RefreshPass:
    model: str
    layers: int
    refresh_s: float          # compute_refresh over all layers, one process
    svd_s: float | None       # torch.linalg.svd(full_matrices=False) over the same weights
    busiest_of_8_s: float     # compute_refresh over the busiest rank's share (8 ranks, LPT partition)


@dataclass
class Report:
    device: str
    machine: str
    torch: str
    threads: int
    model_source: str = ""
    plain_step_s: float = 0.0
    overhead: list[Overhead] = field(default_factory=list)
    refresh_pass: list[RefreshPass] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training overhead
def _classifier(device: torch.device) -> tuple[nn.Module, str]:
    try:
        from s2d import assets, models

        if any(a["name"] == "minilm-l6" and a["cached"] for a in assets.list_assets()):
            return models.load("minilm-l6", task="classification", num_labels=2).model.to(device), "minilm-l6"
    except Exception as err:  # noqa: BLE001 - any asset problem: fall back to the same shape
        logger.warning("minilm-l6 unavailable (%s); using a random model of the same shape", err)
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, num_labels=2)
    return BertForSequenceClassification(cfg).to(device), "random BERT (hidden 384, 6 layers, FFN 1536)"


def _step_times(device: torch.device, cfg: S2DConfig | None, steps: int, batch: int, seq: int) -> list[float]:
    model, _ = _classifier(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    s2d = SelectiveSpectralDecay(model, opt, cfg) if cfg is not None else None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, 2, (batch,), generator=g).to(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if s2d is not None:
        s2d.remove()
    return times


def measure_overhead(device: torch.device, batch: int, seq: int, lead: int = 3,
                     period: int = 5, refreshes: int = 3) -> tuple[float, list[Overhead]]:
    """Plain step time and S2D overhead at intervals 100 and 10, sync and async (``async_lead=lead``).

    Measured with refreshes every ``period`` steps (the first, at step 0, is a warm-up); each quantity
    is the minimum over its repetitions, which discounts other load on a shared machine. The overhead at
    interval I is then ``(refresh_extra + I · penalty_extra) / (I · plain_step)``.
    """
    steps = period * refreshes + period
    plain = _step_times(device, None, steps, batch, seq)[2:]
    t_plain = min(plain)
    base = dict(strength=5e-4, tau=0.95, k_max=3)
    results = []
    for mode, lead_ in (("sync", 0), ("async", lead)):
        times = _step_times(device, S2DConfig(**base, interval=period, async_lead=lead_), steps, batch, seq)
        windows = [range(d - lead_, d + 1) for d in range(period, steps, period)]  # steps carrying refresh work
        touched = {i for w in windows for i in w}
        t_quiet = min(t for i, t in enumerate(times) if i >= 2 and i not in touched)
        refresh_extra = min(sum(times[i] for i in w) - len(w) * t_quiet for w in windows)
        for interval in (100, 10):
            pct = 100 * (refresh_extra + interval * (t_quiet - t_plain)) / (interval * t_plain)
            results.append(Overhead(interval, mode, refresh_extra, t_quiet - t_plain, pct))
    return t_plain, results


# ----------------------------------------------------------------------------- refresh pass
def _timed(fn, device: torch.device, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_refresh_pass(name: str, shapes: list[tuple[int, int]], device: torch.device, repeat: int,
                         svd: bool) -> RefreshPass:
    g = torch.Generator().manual_seed(0)
    weights = {f"{i}": (torch.randn(m, n, generator=g) / n**0.5).to(device) for i, (m, n) in enumerate(shapes)}
    peaks = {k: ActivationPeak(torch.tensor(3.0), torch.randn(w.shape[1], generator=g).to(device), torch.tensor(0))
             for k, w in weights.items()}
    cfg = S2DConfig()
    compute_refresh(dict(list(weights.items())[:2]), peaks, cfg, 0)  # warm-up (kernels, allocator)
    t_refresh = _timed(lambda: compute_refresh(weights, peaks, cfg, 0), device, repeat)
    owners = partition(shapes, 8)
    loads = [sum(1 for o in owners if o == r) for r in range(8)]
    costs = [0.0] * 8
    from s2d.regularizer.sharding import refresh_cost

    for s, o in zip(shapes, owners):
        costs[o] += refresh_cost(s)
    busiest = max(range(8), key=lambda r: costs[r])
    share = {k: w for (k, w), o in zip(weights.items(), owners) if o == busiest}
    t_busy = _timed(lambda: compute_refresh(share, peaks, cfg, 0), device, repeat)
    t_svd = None
    if svd:
        t_svd = _timed(lambda: [torch.linalg.svd(w, full_matrices=False) for w in weights.values()], device, 1)
    logger.info("%s: %d layers, refresh %.2fs, svd %s, busiest of 8 (%d layers) %.2fs", name, len(shapes),
                t_refresh, t_svd, loads[busiest], t_busy)
    return RefreshPass(name, len(shapes), t_refresh, t_svd, t_busy)


def main(argv: list[str] | None = None) -> Report:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/refresh-<device>.json)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="refresh-pass repetitions (best is kept)")
    p.add_argument("--no-svd", action="store_true", help="skip the torch.linalg.svd comparison")
    p.add_argument("--skip", choices=["overhead", "refresh"], action="append", default=[])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    report = Report(device=str(device), machine=machine, torch=torch.__version__, threads=torch.get_num_threads())
    if "overhead" not in args.skip:
        report.model_source = _classifier(torch.device("cpu"))[1]
        report.plain_step_s, report.overhead = measure_overhead(device, args.batch, args.seq)
        for o in report.overhead:
            logger.info("interval %d %s: refresh +%.3fs, penalty +%.4fs/step -> %.2f%% overhead",
                        o.interval, o.mode, o.refresh_extra_s, o.penalty_extra_s, o.overhead_pct)
    if "refresh" not in args.skip:
        for name, shapes in (("vit-b/16", VIT_B), ("qwen2.5-0.5b-shapes", QWEN_05B)):
            report.refresh_pass.append(measure_refresh_pass(name, shapes, device, args.repeat, not args.no_svd))
    out = args.out or Path(__file__).parent / "results" / f"refresh-{device.type}.json"
    write_json(out, asdict(report))
    print(json.dumps(asdict(report), indent=2))
    return report


if __name__ == "__main__":
    main()
