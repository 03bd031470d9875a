"""Factorised compression: each chosen Linear becomes two smaller Linears (docs/lowrank.md).

:func:`plan_ranks` turns a budget into a rank per layer from the error curves of
:func:`~s2d.lowrank.analysis.lowrank_table`: either one output-error threshold for every layer, or the
smallest common threshold whose ranks fit a global parameter ratio. A layer is factorised only below
its break-even rank, where its two factors hold fewer parameters than it does.

:func:`factorise_model` applies a plan block by block, as LLM-ROM does: the inputs of each block are
captured on the model whose earlier blocks are already factorised, so every feature-space PCA sees
the inputs it will get. No gradients; memory holds one block's input moments.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from s2d.lowrank.analysis import LayerRank, linear_groups
from s2d.lowrank.maths import factor_params, feature_factors, smallest_rank, weight_factors
from s2d.probes import input_moments

__all__ = ["SPACES", "RankPlan", "plan_ranks", "factorise_model", "linear_params"]

SPACES = ("feature", "weight")   # feature: output PCA (LLM-ROM); weight: SVD truncation


@dataclass
class RankPlan:
    """The rank of every factorised layer (others stay dense) and what the plan keeps."""
    space: str                 # "feature" or "weight"
    threshold: float           # the output-error threshold every layer meets (the common one of a ratio)
    ranks: dict[str, int]      # layer -> rank (only the layers that are factorised)
    params: int                # parameters of the analysed Linears after factorising (weights + biases)
    dense_params: int          # the same before


def linear_params(rows: list[LayerRank]) -> int:
    """Parameters (weights + biases) of the analysed Linears, dense."""
    return sum(r.shape[0] * r.shape[1] + (r.shape[0] if r.bias else 0) for r in rows)


def _plan_at(rows: list[LayerRank], space: str, threshold: float) -> RankPlan:
    ranks, params = {}, 0
    for r in rows:
        d_out, d_in = r.shape
        rank = smallest_rank(torch.tensor(r.curves[f"{space}_output"]), threshold)
        if rank <= r.break_even:
            ranks[r.name] = rank
            params += factor_params(d_out, d_in, rank, r.bias)
        else:
            params += d_out * d_in + (d_out if r.bias else 0)
    return RankPlan(space, threshold, ranks, params, linear_params(rows))


def plan_ranks(rows: list[LayerRank], space: str = "feature", *, threshold: float | None = None,
               ratio: float | None = None) -> RankPlan:
    """A :class:`RankPlan` from one of: ``threshold`` (each layer's output error <= it) or ``ratio`` (the
    smallest common threshold, bisected, whose plan keeps <= ratio of the dense parameters)."""
    if space not in SPACES:
        raise ValueError(f"plan_ranks: space must be one of {', '.join(SPACES)}, got {space!r}")
    if (threshold is None) == (ratio is None):
        raise ValueError("plan_ranks: give exactly one of threshold and ratio")
    if threshold is not None:
        return _plan_at(rows, space, threshold)
    if not 0 < ratio <= 1:
        raise ValueError(f"plan_ranks: ratio must be in (0, 1], got {ratio!r}")
    budget = ratio * linear_params(rows)
    lo, hi = 0.0, 1.0                      # at threshold 1 every layer is at rank 1: the smallest plan
    if _plan_at(rows, space, hi).params > budget:
        raise ValueError(f"plan_ranks: even rank 1 everywhere keeps more than {ratio:.0%} of the parameters")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _plan_at(rows, space, mid).params > budget else (lo, mid)
    return _plan_at(rows, space, hi)


def factorise_model(model: nn.Module, batches: Iterable[dict], plan: RankPlan, progress: bool = False) -> nn.Module:
    """Replace every Linear of ``plan.ranks`` by ``nn.Sequential(first, second)`` in place, block by block
    (feature space: the PCA of each layer's outputs on inputs from the already factorised blocks)."""
    batches = list(batches)
    names = set(plan.ranks)
    for group in linear_groups(model, include_head=True):
        chosen = {n: m for n, m in group.items() if n in names}
        if not chosen:
            continue
        moments = input_moments(model, batches, chosen, progress=progress) if plan.space == "feature" else {}
        for name, lin in chosen.items():
            _swap(model, name, _factorised(lin, plan.ranks[name], plan.space, moments.get(name)))
    return model


def _factorised(lin: nn.Linear, rank: int, space: str, moments) -> nn.Sequential:
    """Two Linears (d_in -> rank -> d_out) computing the rank-``rank`` approximation of ``lin``."""
    if space == "feature":
        if moments is None:
            raise ValueError("factorise_model: a factorised layer saw no inputs on the calibration batches")
        first_w, second_w, second_b = feature_factors(lin.weight, lin.bias, moments.mean, moments.second, rank)
    else:
        first_w, second_w = weight_factors(lin.weight, rank)
        second_b = lin.bias.detach().double() if lin.bias is not None else None
    first = nn.Linear(lin.in_features, rank, bias=False, device=lin.weight.device, dtype=lin.weight.dtype)
    second = nn.Linear(rank, lin.out_features, bias=second_b is not None, device=lin.weight.device,
                       dtype=lin.weight.dtype)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if second_b is not None:
            second.bias.copy_(second_b)
    return nn.Sequential(first, second)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
