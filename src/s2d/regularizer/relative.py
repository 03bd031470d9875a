"""The relative update (``S2DConfig.update="relative"``): every step, each selected direction u_r v_rᵀ of a
layer loses the same share of its current weight, so that one refresh interval removes ``fraction`` of
each selected σ_r. The rate depends on neither the optimizer, the learning rate nor the scale of σ
(derivation in docs/s2d-modes.md). Depends on torch only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from s2d.regularizer.sharding import add_low_rank_, low_rank_projections

__all__ = ["per_step_rate", "relative_decay_"]


def per_step_rate(fraction: float, interval: int) -> float:
    """The per-step shrink c of a selected direction, with (1 - c)^interval = 1 - fraction.

    fraction in [0, 1): share of σ_r removed over ``interval`` (>= 1) steps; returns c in [0, 1).
    """
    if not 0 <= fraction < 1 or interval < 1:
        raise ValueError(f"per_step_rate: fraction must be in [0, 1) and interval >= 1, got {fraction}, {interval}")
    return -math.expm1(math.log1p(-fraction) / interval)


@torch.no_grad()
def relative_decay_(weight: Tensor, u: Tensor, v: Tensor, rate: float) -> Tensor:
    """W <- W - rate · U diag(s) Vᵀ in place, with s_r = u_rᵀ W v_r measured on W before the update.

    weight: (m, n) tensor or FSDP2 DTensor; u: (m, k) and v: (n, k) orthonormal columns. Each
    s_r becomes (1 - rate)·s_r and every direction orthogonal to them is untouched. Returns s (k,).
    """
    s = low_rank_projections(weight, u, v)
    add_low_rank_(weight, u * s.to(u.dtype), v, alpha=-rate)
    return s
