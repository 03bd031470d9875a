"""Fake-quantization primitives on plain tensors: code ranges, scale / zero point, rounding with a
straight-through estimator, order-statistic quantiles, the MSE clipping search and a bounded sample.

Everything here is pure torch (no modules, no model plumbing); the quantizer modules, the PTQ methods
and QAT all build on it. Rounding is round-half-to-even (``torch.round``), the convention of
``torch.fake_quantize_per_tensor_affine``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GRANULARITIES", "RANGE_METHODS", "EPS", "MAX_SAMPLES", "MIN_BITS", "MAX_BITS", "SHRINK_FACTORS",
    "bits_ok", "check_bits",
    "round_ste", "grad_scale", "int_range", "scale_zero_point", "fake_quant", "broadcast_shape",
    "quantize_dequantize", "kth", "best_clipping", "ValueSample",
]

GRANULARITIES = ("tensor", "channel", "token")  # one range | one per index of an axis | one per token row
RANGE_METHODS = ("minmax", "percentile", "mse")  # how a calibrated clipping range is chosen
EPS = 1e-8  # smallest scale (keeps an all-zero range from dividing by zero)
MAX_SAMPLES = 1 << 21  # values kept per row for percentile / MSE range search
MIN_BITS, MAX_BITS = 2, 16  # supported integer code widths
SHRINK_FACTORS = tuple(torch.linspace(1.0, 0.3, 15).tolist())  # min-max range shrinks tried by MSE searches


def bits_ok(bits: object) -> bool:
    """Whether ``bits`` is a valid code width: an int (not a bool) in [MIN_BITS, MAX_BITS]."""
    return isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS


def check_bits(owner: str, bits: object) -> None:
    """Raise ``ValueError("<owner> must be an int in [2, 16], got <bits!r>")`` unless :func:`bits_ok`.

    ``owner`` names the field, e.g. ``"UniformQuantizer.bits"`` or ``"QuantConfig.w_bits"``.
    """
    if not bits_ok(bits):
        raise ValueError(f"{owner} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Value of ``x``, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return (x - x * factor).detach() + x * factor


def int_range(bits: int, symmetric: bool, narrow: bool = True) -> tuple[int, int]:
    """Integer code range: symmetric = [-(2^(b-1)-1), 2^(b-1)-1] (``narrow``, zero-centred) or the full
    signed [-2^(b-1), 2^(b-1)-1] (``narrow=False``: [-8, 7] at 4 bits, PTQ4ViT's codes); asymmetric = [0, 2^b-1]."""
    if symmetric:
        return -(2 ** (bits - 1) - (1 if narrow else 0)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(lo: Tensor, hi: Tensor, bits: int, symmetric: bool,
                     include_zero: bool = True) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for the range [lo, hi] (elementwise over channels).

    Symmetric: scale = max(|lo|, |hi|) / (2^(b-1)-1), zero point 0. Asymmetric: scale = (hi - lo) / (2^b - 1),
    zero point = round(-lo / scale). With ``include_zero`` (the default) the range is first widened to
    include 0, so 0 is a code; without it (RepQ-ViT's and ERQ's code) an all-positive channel [3, 8] keeps
    its own range and its zero point falls outside [0, 2^b-1] (it is not clamped).
    """
    qmin, qmax = int_range(bits, symmetric)
    if include_zero or symmetric:
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale.clamp_min(EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.round(-lo / scale)
    return scale, (torch.clamp(zero_point, qmin, qmax) if include_zero else zero_point)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """(clamp(round(x / scale) + z, qmin, qmax) - z) * scale, with a straight-through gradient.

    The gradient w.r.t. ``x`` is 1 where ``x`` falls inside the representable range and 0 where it is
    clipped (the usual clipped STE). ``scale`` and ``zero_point`` broadcast against ``x``; a ``scale`` that
    requires grad receives the LSQ gradient.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def broadcast_shape(ndim: int, axis: int, size: int) -> list[int]:
    """Shape [1, .., size, .., 1] (``size`` at ``axis``) for broadcasting per-channel parameters."""
    shape = [1] * ndim
    shape[axis] = size
    return shape


def quantize_dequantize(x: Tensor, bits: int, symmetric: bool, axis: int | None = None) -> Tensor:
    """Fake-quantize ``x`` with min-max ranges: per tensor (``axis=None``) or one range per index of ``axis``.

    Shapes: output = ``x.shape``. Symmetric uses codes [-(2^(b-1)-1), 2^(b-1)-1]; asymmetric [0, 2^b-1].
    """
    check_bits("quantize_dequantize.bits", bits)
    qmin, qmax = int_range(bits, symmetric)
    if axis is None:
        lo, hi = x.min(), x.max()
        scale, zp = scale_zero_point(lo, hi, bits, symmetric)
        return fake_quant(x, scale, zp, qmin, qmax)
    axis = axis % x.ndim
    rows = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    scale, zp = scale_zero_point(rows.min(1).values, rows.max(1).values, bits, symmetric)
    shape = broadcast_shape(x.ndim, axis, x.shape[axis])
    return fake_quant(x, scale.view(shape), zp.view(shape), qmin, qmax)


def kth(rows: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile (0 <= q <= 1) of ``rows`` (R, M) by order statistics: the ceil(q·M)-th
    smallest value of each row, (R,)."""
    n = rows.shape[1]
    k = min(max(int(math.ceil(q * n - 1e-9)), 1), n)  # tolerance: 1 - 0.99 != 0.01 in floats
    return rows.kthvalue(k, dim=1).values


def best_clipping(rows: Tensor, candidates: list[tuple[Tensor, Tensor]], bits: int,
                  symmetric: bool, include_zero: bool = True, narrow: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row MSE clipping search: of the candidate ranges, the one whose fake quantization of each row
    has the lowest mean squared error.

    rows: (R, M) values (one independent range per row); candidates: non-empty list of (lo (R,), hi (R,))
    in priority order. Per row, the first candidate wins ties: a later one replaces the best only with a
    strictly smaller error (so a NaN error never wins). ``include_zero``: as :func:`scale_zero_point`;
    ``narrow``: the codes, as :func:`int_range`. Returns the chosen (lo, hi), each (R,).
    """
    qmin, qmax = int_range(bits, symmetric, narrow)
    best: tuple[Tensor, Tensor, Tensor] | None = None
    for c_lo, c_hi in candidates:
        s, z = scale_zero_point(c_lo, c_hi, bits, symmetric, include_zero)
        err = (fake_quant(rows, s[:, None], z[:, None], qmin, qmax) - rows).pow(2).mean(1)
        if best is None:
            best = (c_lo, c_hi, err)
            continue
        better = err < best[2]
        best = (torch.where(better, c_lo, best[0]), torch.where(better, c_hi, best[1]),
                torch.where(better, err, best[2]))
    if best is None:
        raise ValueError("best_clipping: candidates must not be empty")
    return best[0], best[1]


class ValueSample:
    """A bounded random sample of observed values, kept as columns of (R, M) row blocks.

    :meth:`add` keeps every column until ``limit`` columns were kept in total, then a uniformly random
    subset of a block that would overflow it (``torch.randperm``, global RNG), then nothing.
    """

    def __init__(self, limit: int = MAX_SAMPLES) -> None:
        self.limit = limit
        self.blocks: list[Tensor] = []
        self.count = 0  # columns kept so far

    def add(self, rows: Tensor) -> None:
        """Keep (a random subset of) the columns of ``rows`` (R, M)."""
        budget = max(self.limit - self.count, 0)
        if budget and rows.shape[1] > budget:
            rows = rows[:, torch.randperm(rows.shape[1], device=rows.device)[:budget]]
        if budget:
            self.blocks.append(rows)
            self.count += rows.shape[1]

    def rows(self) -> Tensor | None:
        """Everything kept, (R, count), or None when nothing was."""
        return torch.cat(self.blocks, 1) if self.blocks else None

    def clear(self) -> None:
        self.blocks, self.count = [], 0
