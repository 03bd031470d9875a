"""S2D and Colinearity Decay training overhead vs plain AdamW on a small transformer, interleaved in one run.

Three identical models train side by side (AdamW, AdamW+S2D, AdamW+CD); chunks of ``interval`` steps
(each regularized chunk contains one refresh: S2D's spectra and selection, CD's held top singular
pairs) rotate between the arms, and every step is timed.  Two ratios per regularizer, as JSON:

* ``overhead_ratio`` / ``cd_overhead_ratio``: median chunk time / median AdamW chunk time (direct,
  but chunk times on a shared machine scatter by +-10-20 %, more than the effect being measured);
* ``overhead_ratio_from_steps`` / ``cd_overhead_ratio_from_steps``: 1 + [(m - m_adamw) + (r - m) /
  interval] / m_adamw, with m the median per-step time of the arm (its non-refresh steps) and r the
  median time of its refresh steps, which is robust to that noise.

CD acts on every block's (v rows of qkv -> proj) and (fc1 -> fc2) pairs at every step.

``--model minilm`` trains a randomly initialised MiniLM-L6-shaped BERT classifier (hidden 384, 6
layers, 12 heads, FFN 1536, vocabulary 30,522; 38 Linears) instead, with CD on the pairs that
``s2d.models.colinearity_pairs`` finds in its block layout (value -> attention output, intermediate ->
output: 12 pairs).

    python benchmarks/bench_overhead.py [--model small|minilm] [--chunks 10] [--interval 100]
        [--update coupled] [--selection pcdr]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from s2d import CDConfig, ColinearityDecay, Pair, S2DConfig, SelectiveSpectralDecay
from s2d.models import colinearity_pairs


class SmallTransformer(nn.Module):
    """4-layer pre-LN encoder classifier, d=128, 4 heads, MLP 512 (17 Linear targets incl. head)."""

    vocab = 1000
    description = "4-layer d=128 pre-LN transformer, 17 Linear layers"

    def __init__(self, d: int = 128, layers: int = 4, classes: int = 10):
        super().__init__()
        self.emb = nn.Embedding(self.vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h).mean(1))

    def cd_pairs(self) -> list[Pair]:
        """CD's pairs: (v rows of the fused qkv -> proj) and (fc1 -> fc2) per block."""
        d = self.norm.normalized_shape[0]
        return [p for i in range(len(self.blocks)) for p in (
            Pair(f"blocks.{i}.qkv", f"blocks.{i}.proj", "attn", rows=(2 * d, 3 * d)),
            Pair(f"blocks.{i}.fc1", f"blocks.{i}.fc2", "ffn"))]


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


class MiniLMShaped(nn.Module):
    """A MiniLM-L6-shaped BERT sequence classifier (random init) that maps token ids to logits."""

    vocab = 30522
    description = "MiniLM-L6-shaped BERT, 38 Linear layers"

    def __init__(self, classes: int = 10):
        super().__init__()
        import transformers as tf
        self.bert = tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=self.vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, num_labels=classes))

    def forward(self, ids):
        return self.bert(input_ids=ids).logits

    def cd_pairs(self) -> list[Pair]:
        """CD's pairs, from the block layout (value -> attention output, intermediate -> output)."""
        return colinearity_pairs(self)


MODELS = {"small": SmallTransformer, "minilm": MiniLMShaped}  # --model -> the benchmark model's class


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


def step_ratio(steps: list[list[float]], base_step: float, interval: int, due: int) -> tuple[float, float, float]:
    """(median non-refresh step, median refresh step, overhead ratio from step times) of one arm."""
    step = statistics.median(t for ts in steps for i, t in enumerate(ts) if i != due)
    refresh = statistics.median(ts[due] for ts in steps)
    return step, refresh, 1 + ((step - base_step) + (refresh - step) / interval) / base_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", choices=list(MODELS),
                    help="small: the 4-layer d=128 transformer; minilm: a MiniLM-L6-shaped BERT")
    ap.add_argument("--chunks", type=int, default=10, help="timed chunks per arm (each = interval steps)")
    ap.add_argument("--interval", type=int, default=100, help="refresh interval of S2D and of CD")
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
    build = MODELS[args.model]
    models = {tag: build().to(args.device) for tag in ("adamw", "s2d", "cd")}
    for m in list(models.values())[1:]:
        m.load_state_dict(models["adamw"].state_dict())
    opts = {tag: torch.optim.AdamW(m.parameters(), lr=1e-4) for tag, m in models.items()}
    g = torch.Generator().manual_seed(1)
    data = (torch.randint(0, build.vocab, (32, args.batch, args.seq), generator=g).to(args.device),
            torch.randint(0, 10, (32, args.batch), generator=g).to(args.device))
    s2d = SelectiveSpectralDecay(models["s2d"], opts["s2d"], S2DConfig(interval=args.interval, update=args.update,
                                                                       selection=args.selection))
    cd = ColinearityDecay(models["cd"], opts["cd"], CDConfig(interval=args.interval), models["cd"].cd_pairs())
    for tag in models:                    # warm-up every arm (the first refresh included)
        chunk(models[tag], opts[tag], data, 0, 5, args.device)
    steps: dict[str, list[list[float]]] = {tag: [] for tag in models}   # per chunk, per step times
    order = list(models)
    for c in range(args.chunks):
        # steps [5 + c*interval, 5 + (c+1)*interval) hold exactly one refresh (a multiple of interval)
        for tag in order[c % 3:] + order[: c % 3]:          # rotate which arm goes first
            steps[tag].append(chunk(models[tag], opts[tag], data, 5 + c * args.interval, args.interval, args.device))
    chunks = {tag: [sum(t) for t in ts] for tag, ts in steps.items()}
    med = {tag: statistics.median(v) for tag, v in chunks.items()}
    due = (args.interval - 5 % args.interval) % args.interval          # index of the refresh step in a chunk
    base_step = statistics.median(t for ts in steps["adamw"] for t in ts)
    s2d_step, s2d_refresh, s2d_ratio = step_ratio(steps["s2d"], base_step, args.interval, due)
    cd_step, cd_refresh, cd_ratio = step_ratio(steps["cd"], base_step, args.interval, due)
    print(json.dumps({
        "benchmark": "s2d_cd_training_overhead", "device": args.device, "threads": torch.get_num_threads(),
        "model": build.description, "batch": args.batch, "seq": args.seq,
        "interval": args.interval, "update": args.update, "selection": args.selection, "chunks": args.chunks,
        "steps_per_chunk": args.interval,
        "adamw_chunk_s_median": med["adamw"], "s2d_chunk_s_median": med["s2d"], "cd_chunk_s_median": med["cd"],
        "overhead_ratio": med["s2d"] / med["adamw"], "cd_overhead_ratio": med["cd"] / med["adamw"],
        "adamw_step_s_median": base_step, "s2d_step_s_median": s2d_step, "s2d_refresh_step_s_median": s2d_refresh,
        "overhead_ratio_from_steps": s2d_ratio,
        "cd_step_s_median": cd_step, "cd_refresh_step_s_median": cd_refresh, "cd_overhead_ratio_from_steps": cd_ratio,
        "adamw_chunk_s_all": chunks["adamw"], "s2d_chunk_s_all": chunks["s2d"], "cd_chunk_s_all": chunks["cd"],
        "layers_penalised_at_last_refresh": sum(1 for s in s2d.layer_stats() if s.k_target is not None),
        "targets": len(s2d.targets), "cd_pairs": len(cd.pairs),
    }, indent=2))


if __name__ == "__main__":
    main()
