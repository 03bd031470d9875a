"""ERQ's two-part weight quantizer (TPAMI code, ``zysxmu/ERQ`` ``quant/quantizer.py``, ``two_part=True``).

A weight W (m, n) of a qkv or fc1 Linear has a few input columns whose entries are large in many rows.
One per-row grid stretched over them rounds every other entry coarsely. The two-part quantizer gives
each row two asymmetric grids: one for the outlier columns, one for the rest.

Outlier columns (:func:`outlier_columns`): in every row, the entries above the 99th percentile of the
row's positive entries or below the 1st percentile of its negative entries are marked; the ``m // 20``
columns marked in the most rows are the outlier columns (ties: lower index first).
"""
from __future__ import annotations

import torch
from torch import Tensor

from s2d.quant.primitives import fake_quant, int_range, scale_zero_point
from s2d.quant.quantizers import Quantizer

__all__ = ["OUTLIER_PERCENTILE", "outlier_columns", "TwoPartQuantizer"]

OUTLIER_PERCENTILE = 0.99  # a row's entry is an outlier beyond this quantile of its positives (negatives: 1 − it)


def outlier_columns(weight: Tensor, count: int | None = None, percentile: float = OUTLIER_PERCENTILE) -> Tensor:
    """Indices (sorted, int64) of the ``count`` (default ``m // 20``) input columns of ``weight`` (m, n)
    marked as outliers in the most rows; only columns marked at least once are returned, so fewer when
    fewer are marked."""
    w = weight.detach().float()
    count = w.shape[0] // 20 if count is None else count
    nan = torch.full_like(w, float("nan"))
    # per-row quantiles of one sign's entries, linear interpolation as numpy's percentile; NaN for a row
    # without entries of that sign, and a comparison with NaN marks nothing
    hi = torch.nanquantile(torch.where(w > 0, w, nan), percentile, dim=1, keepdim=True)
    lo = torch.nanquantile(torch.where(w < 0, w, nan), 1.0 - percentile, dim=1, keepdim=True)
    marks = ((w > hi) | (w < lo)).sum(0)
    order = torch.sort(-marks, stable=True).indices  # most marks first, lower index first among equals
    top = order[:count]
    return top[marks[top] > 0].sort().values


class TwoPartQuantizer(Quantizer):
    """Per-row asymmetric weight quantizer with a second grid for the outlier input columns.

    Parameters after calibration: ``columns`` (k,) int64, the outlier columns; ``scale`` and
    ``zero_point`` (m, 2): column 0 the grid of the other columns, column 1 the outlier columns' grid.
    Codes [0, 2^b − 1]. Life cycle: ``observe(weight)`` + ``finalize()`` picks the columns by
    :func:`outlier_columns` and min-max ranges per part; ERQ sets them itself (:meth:`set_columns`,
    :meth:`set_ranges`) with its clipping search.

    Args:
        bits: 2..16.
        include_zero: widen each range to include 0 (False: ERQ's unconstrained ranges, the default).
    """

    kind = "two_part"

    def __init__(self, bits: int = 8, include_zero: bool = False) -> None:
        super().__init__(bits)
        self.symmetric = False
        self.granularity = "channel"  # per output row (two grids per row)
        self.include_zero = include_zero
        self.qmin, self.qmax = int_range(bits, False)
        self.register_buffer("columns", None)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("lo", None)  # (m, 2) calibrated ranges, as scale
        self.register_buffer("hi", None)
        self._weight: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"TwoPartQuantizer quantizes a 2-D weight (out, in), got shape {tuple(x.shape)}")
        self._weight = x.detach().float()

    def finalize(self) -> None:
        if self._weight is None:
            raise RuntimeError("TwoPartQuantizer.finalize() called before observe()")
        w = self._weight
        self.set_columns(outlier_columns(w))
        rest, out = self.parts(w)
        out = out if out.shape[1] else rest  # no outlier columns: the second grid is never used
        self.set_ranges(torch.stack([rest.amin(1), out.amin(1)], 1), torch.stack([rest.amax(1), out.amax(1)], 1))

    def reset(self) -> None:
        super().reset()
        self._weight = None

    def set_columns(self, columns: Tensor) -> None:
        """Make ``columns`` (k,) the outlier columns (the ranges must be set again)."""
        self.columns = torch.as_tensor(columns, dtype=torch.long).reshape(-1).sort().values

    def column_mask(self, n: int) -> Tensor:
        """(n,) bool, True at the outlier columns."""
        mask = torch.zeros(n, dtype=torch.bool, device=self.columns.device)
        mask[self.columns] = True
        return mask

    def parts(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(the other columns (m, n − k), the outlier columns (m, k)) of ``w`` (m, n)."""
        mask = self.column_mask(w.shape[1]).to(w.device)
        return w[:, ~mask], w[:, mask]

    def set_ranges(self, lo: Tensor, hi: Tensor) -> None:
        """Ranges (m, 2) per row: [:, 0] of the other columns, [:, 1] of the outlier columns."""
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        self.scale, self.zero_point = scale_zero_point(lo, hi, self.bits, False, self.include_zero)
        self.lo, self.hi = lo, hi
        self.calibrated = True

    def element_params(self, shape: torch.Size | tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Per-entry (scale, zero point), each (m, n), for a weight of ``shape``."""
        mask = self.column_mask(shape[1])[None, :]
        return (torch.where(mask, self.scale[:, 1:], self.scale[:, :1]),
                torch.where(mask, self.zero_point[:, 1:], self.zero_point[:, :1]))

    def quantize(self, x: Tensor) -> Tensor:
        scale, zp = self.element_params(x.shape)
        return fake_quant(x, scale.to(x.dtype), zp.to(x.dtype), self.qmin, self.qmax)

    def describe(self) -> dict:
        rng = None if self.lo is None else [float(self.lo.min()), float(self.hi.max())]
        return {"kind": self.kind, "bits": self.bits, "granularity": self.granularity, "symmetric": False,
                "codes": [self.qmin, self.qmax], "outlier_columns": None if self.columns is None else
                int(self.columns.numel()), "range": rng}
