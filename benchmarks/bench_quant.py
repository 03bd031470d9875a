"""Fake-quant evaluation throughput vs float evaluation on the same model and batches (interleaved).

Usage: python benchmarks/bench_quant.py [--model minilm-l6|random-bert] [--bits 4] [--batch 32] [--seq 128]
       [--rounds 5] [--out results.json]
Prints one JSON object: samples/s for float and W{b}A{b} RTN, and their ratio (target >= 0.5).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import transformers as tf

from s2d.quant import QuantConfig, quantize_model


def _model(name: str) -> torch.nn.Module:
    if name == "random-bert":  # MiniLM-L6 shape, random weights
        torch.manual_seed(0)
        cfg = tf.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, num_labels=2)
        return tf.BertForSequenceClassification(cfg).eval()
    from s2d.models import load

    return load(name, task="classification", num_labels=2).model.eval()


def _time(model: torch.nn.Module, batches: list[dict]) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    fp = _model(args.model)
    batches = []
    for _ in range(args.n_batches):
        mask = torch.ones(args.batch, args.seq, dtype=torch.long)
        mask[: args.batch // 2, args.seq // 2:] = 0  # half the rows padded
        batches.append({"input_ids": torch.randint(1000, 20000, (args.batch, args.seq)), "attention_mask": mask})
    spec = QuantConfig(w_bits=args.bits, a_bits=args.bits)
    qm = quantize_model(copy.deepcopy(fp), spec, "rtn", batches[:1], progress=False)
    _time(fp, batches[:1]), _time(qm, batches[:1])  # warm-up
    t_fp, t_q = [], []
    for _ in range(args.rounds):  # interleaved so both see the same machine load
        t_fp.append(_time(fp, batches))
        t_q.append(_time(qm, batches))
    n = args.batch * args.n_batches
    fp_sps, q_sps = n / statistics.median(t_fp), n / statistics.median(t_q)
    result = {"model": args.model, "spec": spec.name, "batch": args.batch, "seq": args.seq,
              "samples_per_round": n, "rounds": args.rounds, "float_samples_per_s": round(fp_sps, 2),
              "quant_samples_per_s": round(q_sps, 2), "ratio": round(q_sps / fp_sps, 3),
              "ratio_per_round": [round(f / q, 3) for f, q in zip(t_fp, t_q)],  # back-to-back pairs
              "float_attn_impl": "sdpa", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            f.write(text + "\n")
        os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
