"""SmolLM2-135M as a prompt classifier: training-step time, and evaluation time in float vs W8A8 RTN.

Usage: python benchmarks/bench_llm.py [--batch 8] [--eval-batch 32] [--max-length 48] [--steps 4]
       [--eval-examples 64] [--rounds 2] [--out results.json]
Prints one JSON object: seconds per AdamW step (median over ``--steps`` after one warm-up step),
seconds per ``--eval-examples`` prompts in float and with W8A8 fake quantization (interleaved,
median over ``--rounds``), their ratio, and the peak RSS of the process.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import time

import torch

from s2d.data import calibration_batches
from s2d.pipeline.config import DataConfig, ModelConfig
from s2d.pipeline.experiment import load_task
from s2d.quant import QuantConfig, quantize_model
from s2d.train import evaluate_outcomes


def _step_times(model: torch.nn.Module, loader, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    times = []
    for i, batch in zip(range(steps + 1), loader):
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i:                                   # the first step allocates AdamW's state
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    data = DataConfig("rotten-tomatoes", max_length=args.max_length, limit_train=args.batch * (args.steps + 1),
                      limit_eval=args.eval_examples, prompt="Review: {text}\nSentiment:",
                      label_words=("negative", "positive"))
    bundle, loaders = load_task(ModelConfig("smollm2-135m"), data, batch_size=args.batch,
                                eval_batch_size=args.eval_batch)
    model = bundle.model
    quant = quantize_model(copy.deepcopy(model), QuantConfig(8, 8),
                           calib=calibration_batches(loaders, 16, args.eval_batch), progress=False)
    float_s, quant_s = [], []
    for _ in range(args.rounds):
        for store, m in ((float_s, model), (quant_s, quant)):
            t = time.perf_counter()
            evaluate_outcomes(m, loaders.test, progress=False)
            store.append(time.perf_counter() - t)
    steps = _step_times(model, loaders.train, args.steps)
    row = {"bench": "llm", "model": "smollm2-135m", "batch": args.batch, "max_length": args.max_length,
           "train_step_s": statistics.median(steps), "eval_examples": args.eval_examples,
           "eval_float_s": statistics.median(float_s), "eval_w8a8_s": statistics.median(quant_s),
           "w8a8_over_float": statistics.median(quant_s) / statistics.median(float_s),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
