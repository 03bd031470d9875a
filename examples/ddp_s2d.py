"""S2D in a plain PyTorch loop: one process, DDP, or FSDP2 — the same script.

    python examples/ddp_s2d.py                                   # 1 process (CPU, or --device cuda)
    torchrun --nproc_per_node 8 examples/ddp_s2d.py               # 8 GPUs, DDP
    torchrun --nproc_per_node 8 examples/ddp_s2d.py --fsdp2       # 8 GPUs, FSDP2 (fully_shard)
    torchrun --nproc_per_node 2 examples/ddp_s2d.py --device cpu  # try it on a laptop (gloo)

A BERT-shaped classifier (hidden 384, 6 layers, FFN 1536 — MiniLM-L6's shape, random weights) is
fine-tuned on random tokens; pass ``--model minilm-l6`` to load the s2d asset instead. S2D needs no
change for distributed runs: every rank decomposes its share of the layers and the factors are
broadcast (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay


def build_model(name: str | None) -> nn.Module:
    if name:
        from s2d import models

        return models.load(name, task="classification", num_labels=2).model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                    intermediate_size=1536, num_labels=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="s2d model asset, e.g. minilm-l6 (default: random BERT)")
    p.add_argument("--fsdp2", action="store_true", help="shard with torch.distributed.fsdp.fully_shard")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch size")
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--async-lead", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = torch.device(args.device)
    if distributed:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0

    model = build_model(args.model).to(device)
    forward: nn.Module = model
    if distributed and args.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer if hasattr(model, "bert") else []:
            fully_shard(layer)
        forward = fully_shard(model)
    elif distributed:
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)   # after sharding: FSDP2 params are DTensors
    s2d = SelectiveSpectralDecay(model, opt, S2DConfig(interval=args.interval, async_lead=args.async_lead))

    g = torch.Generator().manual_seed(1000 + rank)   # each rank its own micro-batch
    for step in range(args.steps):
        ids = torch.randint(1000, 2000, (args.batch, 64), generator=g).to(device)
        labels = (ids[:, 0] > 1500).long()
        loss = forward(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and step % 5 == 0:
            logging.info("step %d loss %.4f", step, loss.item())
    if rank == 0:
        stats = s2d.layer_stats()
        picked = [s for s in stats if s.k_target is not None]
        logging.info("S2D: %d/%d layers penalised at the last refresh", len(picked), len(stats))
        for s in sorted(stats, key=lambda s: -s.max_activation)[:5]:
            logging.info("  %-45s sigma_max %.3f  max|a| %.1f  k_target %s", s.name, s.sigma_max,
                         s.max_activation, s.k_target)
    s2d.remove()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
