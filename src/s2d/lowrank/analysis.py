"""Per-layer low-rank analysis of a model: :func:`lowrank_table` (docs/lowrank.md).

For every Linear (classifier heads left out by default): the four error curves of
:func:`~s2d.lowrank.maths.rank_curves` on calibration batches, and the smallest rank that keeps each
construction's output error under a threshold. The input moments are captured one transformer block
at a time, so memory holds one block's d_in × d_in moments, not the whole model's.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from s2d.lowrank.maths import factor_params, rank_curves, smallest_rank
from s2d.models import blocks, head_names, linear_roles
from s2d.probes import input_moments

__all__ = ["LayerRank", "lowrank_table", "linear_groups"]


@dataclass
class LayerRank:
    """One Linear's low-rank structure at one output-error threshold."""
    name: str
    role: str                  # linear_roles: q, k, v, attn_out, fc1, fc2, other, ...
    shape: tuple[int, int]     # (d_out, d_in)
    threshold: float           # relative output error allowed
    weight_rank: int           # smallest SVD rank with weight-space output error <= threshold
    feature_rank: int          # smallest output-PCA rank with feature-space output error <= threshold
    full_rank: int             # min(d_out, d_in)
    break_even: int            # largest rank whose two factors have fewer parameters than the Linear
    bias: bool = True          # whether the Linear has a bias (counted in parameters)
    curves: dict[str, list[float]] = field(default_factory=dict)   # RankCurves fields, entry r - 1


def linear_groups(model: nn.Module, include_head: bool = False) -> list[dict[str, nn.Linear]]:
    """The model's Linears grouped by transformer block (in forward order), then one group of the rest."""
    skip = set() if include_head else head_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    groups, seen = [], set()
    for b in blocks(model):
        group = {n: m for n, m in linears.items() if n.startswith(b.name + ".")}
        groups.append(group)
        seen |= set(group)
    rest = {n: m for n, m in linears.items() if n not in seen}
    return [g for g in groups + [rest] if g]


def lowrank_table(model: nn.Module, batches: Iterable[dict], threshold: float = 0.1, include_head: bool = False,
                  progress: bool = False) -> list[LayerRank]:
    """:class:`LayerRank` of every Linear over ``batches`` (a list: it is run once per block)."""
    if not 0 < threshold < 1:
        raise ValueError(f"lowrank_table: threshold must be in (0, 1), got {threshold!r}")
    batches = list(batches)
    roles = linear_roles(model)
    out = []
    for group in linear_groups(model, include_head):
        moments = input_moments(model, batches, group, progress=progress)
        for name, m in group.items():
            if name not in moments:
                continue
            mo = moments[name]
            c = rank_curves(m.weight, m.bias, mo.mean, mo.second)
            d_out, d_in = m.weight.shape
            out.append(LayerRank(
                name, roles.get(name, "other"), (d_out, d_in), threshold,
                smallest_rank(c.weight_output, threshold), smallest_rank(c.feature_output, threshold),
                min(d_out, d_in), _break_even(d_out, d_in), m.bias is not None,
                {k: [float(v) for v in getattr(c, k)] for k in ("weight_frob", "weight_output", "feature_frob",
                                                                 "feature_output")}))
    return out


def _break_even(d_out: int, d_in: int) -> int:
    """The largest r with r·(d_in + d_out) < d_in·d_out (factorising saves parameters below it)."""
    r = (d_in * d_out - 1) // (d_in + d_out)
    return r if factor_params(d_out, d_in, r, bias=False) < d_in * d_out else r - 1
