"""Optimizers and the learning-rate schedule of a fine-tuning run."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from s2d.models import head_names
from s2d.train.config import OPTIMIZERS, TrainConfig

__all__ = ["build_optimizers", "lr_lambda", "muon_weights"]


def muon_weights(model: nn.Module) -> set[int]:
    """ids of the weights Muon owns: every trainable hidden ``nn.Linear`` weight, i.e. all Linears but the
    classifier head (:func:`s2d.models.head_names`; the last Linear when no head is recognised)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    heads = head_names(model) or set(list(linears)[-1:])
    return {id(m.weight) for n, m in linears.items() if n not in heads and m.weight.requires_grad}


def build_optimizers(model: nn.Module, name: str, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on everything, or Muon on the hidden Linear weights (:func:`muon_weights`) + AdamW on the rest.

    Returns the optimizers; under "muon" the first one (Muon) owns the hidden Linear weights.
    Biases and LayerNorm parameters get no weight decay in AdamW.
    Muon uses ``adjust_lr_fn="match_rms_adamw"`` so the same lr is sensible for both.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    muon_ids = muon_weights(model) if name == "muon" else set()
    decay = [p for p in params if id(p) not in muon_ids and p.ndim >= 2]
    no_decay = [p for p in params if id(p) not in muon_ids and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if muon_ids:
        muon_params = [p for p in params if id(p) in muon_ids]
        optimizers.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr or cfg.lr,
                                           weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr))
    return optimizers


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warmup, then cosine/linear decay to 0, or constant."""
    warm = int(round(cfg.warmup * total))

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return fn
