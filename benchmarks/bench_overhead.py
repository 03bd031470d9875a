"""S2D training overhead at interval=100 vs plain AdamW on a small transformer, interleaved in one run.

Two identical models train side by side; chunks of ``interval`` steps (each S2D chunk contains one
refresh) alternate between the arms, and every step is timed.  Two ratios are reported as JSON:

* ``overhead_ratio``: median S2D chunk time / median AdamW chunk time (direct, but chunk times on a
  shared machine scatter by +-10-20 %, more than the effect being measured);
* ``overhead_ratio_from_steps``: 1 + [(m_s2d - m_adamw) + (r - m_s2d) / interval] / m_adamw, with m the
  median per-step time of each arm (S2D's non-refresh steps) and r the median time of its refresh
  steps, which is robust to that noise.

    python benchmarks/bench_overhead.py [--chunks 10] [--interval 100] [--update coupled] [--selection pcdr]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay


class SmallTransformer(nn.Module):
    """4-layer pre-LN encoder classifier, d=128, 4 heads, MLP 512 (17 Linear targets incl. head)."""

    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 4, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(1))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def chunk(model, opt, data, start: int, steps: int, device: str) -> list[float]:
    """Train ``steps`` steps; returns each step's wall time (s)."""
    ids, y = data
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for s in range(start, start + steps):
        sync()
        t = time.perf_counter()
        j = s % ids.shape[0]
        loss = nn.functional.cross_entropy(model(ids[j]), y[j])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10, help="timed chunks per arm (each = interval steps)")
    ap.add_argument("--interval", type=int, default=100)
    ap.add_argument("--update", default="coupled", choices=["coupled", "decoupled", "relative"])
    ap.add_argument("--selection", default="pcdr", choices=["pcdr", "all"],
                    help="'all' penalises every layer at every step (the worst case for the per-step cost)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = SmallTransformer().to(args.device)
    reg = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    data = (torch.randint(0, 1000, (32, args.batch, args.seq), generator=g).to(args.device),
            torch.randint(0, 10, (32, args.batch), generator=g).to(args.device))
    opt_b = torch.optim.AdamW(base.parameters(), lr=1e-4)
    opt_r = torch.optim.AdamW(reg.parameters(), lr=1e-4)
    s2d = SelectiveSpectralDecay(reg, opt_r, S2DConfig(interval=args.interval, update=args.update,
                                                           selection=args.selection))
    chunk(base, opt_b, data, 0, 5, args.device)           # warm-up both arms (S2D's first refresh included)
    chunk(reg, opt_r, data, 0, 5, args.device)
    steps_b, steps_r = [], []            # per chunk, per step times
    step_b = step_r = 5
    for c in range(args.chunks):
        arms = [("b", base, opt_b), ("r", reg, opt_r)]
        for tag, model, opt in (arms if c % 2 == 0 else arms[::-1]):   # alternate which arm goes first
            if tag == "b":
                steps_b.append(chunk(model, opt, data, step_b, args.interval, args.device))
                step_b += args.interval
            else:
                # steps [5 + c*interval, 5 + (c+1)*interval) hold exactly one refresh (a multiple of interval)
                steps_r.append(chunk(model, opt, data, step_r, args.interval, args.device))
                step_r += args.interval
    times_b, times_r = [sum(t) for t in steps_b], [sum(t) for t in steps_r]
    mb, mr = statistics.median(times_b), statistics.median(times_r)
    due = (args.interval - 5 % args.interval) % args.interval          # index of the refresh step in a chunk
    step_b_med = statistics.median(t for ts in steps_b for t in ts)
    step_r_med = statistics.median(t for ts in steps_r for i, t in enumerate(ts) if i != due)
    refresh_med = statistics.median(ts[due] for ts in steps_r)
    from_steps = 1 + ((step_r_med - step_b_med) + (refresh_med - step_r_med) / args.interval) / step_b_med
    selected = sum(1 for s in s2d.layer_stats() if s.k_target is not None)
    print(json.dumps({
        "benchmark": "s2d_training_overhead", "device": args.device, "threads": torch.get_num_threads(),
        "model": "4-layer d=128 pre-LN transformer, 17 Linear layers", "batch": args.batch, "seq": args.seq,
        "interval": args.interval, "update": args.update, "selection": args.selection, "chunks": args.chunks,
        "steps_per_chunk": args.interval,
        "adamw_chunk_s_median": mb, "s2d_chunk_s_median": mr, "overhead_ratio": mr / mb,
        "adamw_step_s_median": step_b_med, "s2d_step_s_median": step_r_med,
        "s2d_refresh_step_s_median": refresh_med, "overhead_ratio_from_steps": from_steps,
        "adamw_chunk_s_all": times_b, "s2d_chunk_s_all": times_r,
        "layers_penalised_at_last_refresh": selected, "targets": len(s2d.targets),
    }, indent=2))


if __name__ == "__main__":
    main()
