"""The S2D spectral pass with and without a competing process on the same cores.

Policies (the spectra of MiniLM-L6's 37 Linear shapes, or ``--shapes vit-b``):

* ``team``   — ``spectra(threads=T)``: the pass with an OpenMP team of ``T`` threads (what s2d 0.1 did);
* ``single`` — ``spectra(threads=1)``: the pass on s2d's own worker thread with one intra-op thread
  (the default now).

Competitors, each a separate process with ``threads`` intra-op threads: ``none``; ``matmul`` (large
matmuls: few, long parallel regions); ``train`` (forward/backward of a small MLP: many short parallel
regions, whose OpenMP threads spin between them); ``spectral`` (another process running the old pass).
Also ``async``: the pass on a fresh Python thread while the main thread trains (the asynchronous
refresh), which is where an OpenMP team per thread oversubscribes the cores inside one process.

Prints JSON: per (competitor, policy) the median seconds of ``--repeats`` passes and the slowdown
against the same policy without a competitor.

    python benchmarks/bench_contention.py [--threads 2] [--repeats 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

from s2d.spectral import spectra
from s2d.utils import write_json

MINILM = [(384, 384)] * 24 + [(1536, 384)] * 6 + [(384, 1536)] * 6 + [(384, 384)]
VIT_B = [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12

COMPETITORS = {
    "matmul": "a = torch.randn(1500, 1500)\nwhile True:\n    a = (a @ a).tanh_()",
    "train": ("m = torch.nn.Sequential(*[torch.nn.Linear(384, 384) for _ in range(6)])\n"
              "x = torch.randn(64, 384)\nwhile True:\n    m(x).sum().backward()"),
    "spectral": ("from s2d.spectral import spectra\nws = [torch.randn(384, 384) for _ in range(24)]\n"
                 "while True:\n    spectra(ws, threads=torch.get_num_threads())"),
}


def _competitor(kind: str, threads: int) -> subprocess.Popen:
    code = f"import torch\ntorch.set_num_threads({threads})\n" + COMPETITORS[kind]
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(3.0)                                   # imports done, the loop running
    return proc


def _threads(policy: str, threads: int) -> int:
    return threads if policy == "team" else 1


def _pass(policy: str, weights: list[torch.Tensor], threads: int) -> float:
    t0 = time.perf_counter()
    spectra(weights, threads=_threads(policy, threads))
    return time.perf_counter() - t0


def _medians(policies: tuple[str, ...], weights: list[torch.Tensor], threads: int, repeats: int) -> dict:
    """Median seconds per policy, the policies interleaved pass by pass so that each sees the same load."""
    times: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(repeats + 1):                      # the first round is a warm-up
        for p in policies:
            dt = _pass(p, weights, threads)
            if r:
                times[p].append(dt)
    return {p: statistics.median(t) for p, t in times.items()}


def _async(policy: str, weights: list[torch.Tensor], threads: int, repeats: int) -> float:
    """Median seconds of the pass on a fresh thread while this thread runs training steps."""
    m = torch.nn.Sequential(*[torch.nn.Linear(384, 384) for _ in range(6)])
    x = torch.randn(64, 384)
    times = []
    for _ in range(repeats + 1):
        box: list[float] = []
        worker = threading.Thread(target=lambda: box.append(_pass_in_thread(policy, weights, threads)))
        worker.start()
        while worker.is_alive():
            m(x).sum().backward()
        worker.join()
        times.append(box[0])
    return statistics.median(times[1:])


def _pass_in_thread(policy: str, weights: list[torch.Tensor], threads: int) -> float:
    # a fresh thread starts with the process default thread count, i.e. a team of its own
    t0 = time.perf_counter()
    spectra(weights, threads=None if policy == "team" else 1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of s2d and of the competitor")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--shapes", choices=("minilm", "vit-b"), default="minilm")
    ap.add_argument("--out", default="benchmarks/results/contention.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(*s) / s[1] ** 0.5 for s in (MINILM if args.shapes == "minilm" else VIT_B)]
    policies = ("team", "single")
    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, float]] = {}
    for kind in ("none", *COMPETITORS):
        proc = _competitor(kind, args.threads) if kind != "none" else None
        try:
            rows[kind] = _medians(policies, weights, args.threads, args.repeats)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        print(kind, {p: round(v, 3) for p, v in rows[kind].items()}, file=sys.stderr, flush=True)
    rows["async"] = {p: _async(p, weights, args.threads, args.repeats) for p in policies}
    slowdown = {k: {p: v / rows["none"][p] for p, v in r.items()} for k, r in rows.items() if k != "none"}
    report = {"benchmark": "contention", "shapes": args.shapes, "layers": len(weights), "threads": args.threads,
              "repeats": args.repeats, "seconds": rows, "slowdown_vs_alone": slowdown,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__}}
    print(json.dumps(report, indent=1))
    write_json(args.out, report)


if __name__ == "__main__":
    main()
