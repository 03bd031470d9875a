"""PTQ4ViT's search maths on plain tensors: the elementwise scale search and batched fake quantization
with a leading candidate dimension (the quantizers' formulas; tests check them against the modules).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["search_scale", "chunk_size", "sym_fq", "twin_gelu_fq", "twin_softmax_fq"]


def search_scale(objective: Callable[[Tensor], Tensor], init: Tensor, current: Tensor,
                 factors: Iterable[float], chunk: int = 16) -> tuple[Tensor, Tensor]:
    """Elementwise best of ``current`` and the candidates ``init · f`` under ``objective``.

    objective(cands) maps a stack of candidate scales (K, *init.shape) to their objectives (K, *init.shape)
    (elements are searched independently, e.g. one per head or per q/k/v block); it is called on chunks
    of at most ``chunk`` candidates. ``current`` is candidate 0 and ties keep the earliest candidate, so
    the result is never worse than ``current``. Returns (best scale, best objective).
    """
    cands = torch.stack([current.reshape(init.shape).to(init)] + [init * f for f in factors])
    objs = torch.cat([objective(cands[i:i + chunk]) for i in range(0, cands.shape[0], max(chunk, 1))])
    idx = objs.argmin(0, keepdim=True)  # first minimum: current wins ties
    return cands.gather(0, idx).squeeze(0), objs.gather(0, idx).squeeze(0)


def chunk_size(numel: int, budget: int = 1 << 24) -> int:
    """Candidates per chunk so that one chunk's tensors hold about ``budget`` elements."""
    return max(1, budget // max(numel, 1))


# ----------------------------------------------------------------------------- batched fake quant
# The search evaluates many candidate steps at once: x broadcasts against a (K, ...) stack of steps.

def sym_fq(x: Tensor, step: Tensor, qmax: int, qmin: int | None = None) -> Tensor:
    """Symmetric uniform fake quant: clamp(round(x/Δ), qmin, qmax)·Δ (qmin default −qmax); step
    broadcasts against x."""
    return torch.clamp(torch.round(x / step), -qmax if qmin is None else qmin, qmax) * step


def twin_gelu_fq(x: Tensor, neg_step: Tensor, pos_step: Tensor, levels: int) -> Tensor:
    """Twin uniform, gelu mode: negatives on neg_step (codes −2^(b−1)..0), positives on pos_step (codes
    0..2^(b−1)−1), as the official post-GELU quantizer; ``levels`` = 2^(b−1)."""
    neg = torch.clamp(torch.round(x / neg_step), -levels, 0) * neg_step
    pos = torch.clamp(torch.round(x / pos_step), 0, levels - 1) * pos_step
    return torch.where(x < 0, neg, pos)


def twin_softmax_fq(x: Tensor, threshold: Tensor, levels: int) -> Tensor:
    """Twin uniform, softmax mode, as the official ``matmul.py``: [0, s] with step s/(2^(b−1)−1) and
    [s, 1] with step 1/(2^(b−1)−1), 2^(b−1) codes each, so the top code is exactly s and 1.0."""
    top = levels - 1
    fine_step = threshold / top
    fine = torch.clamp(torch.round(x / fine_step), 0, top) * fine_step
    coarse = torch.clamp(torch.round(x * top), 0, top) / top
    return torch.where(x < threshold, fine, coarse)
