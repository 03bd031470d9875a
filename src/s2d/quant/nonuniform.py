"""Non-uniform fake quantizers for activations with a known shape: log-√2 (post-softmax probabilities,
RepQ-ViT) and twin uniform (post-softmax and post-GELU, PTQ4ViT). Both are per tensor and calibrated by
an MSE search over a bounded random sample of the observed values (:class:`SampledQuantizer`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from s2d.quant.primitives import EPS, SHRINK_FACTORS, ValueSample, round_ste
from s2d.quant.quantizers import Quantizer

__all__ = ["SampledQuantizer", "LogSqrt2Quantizer", "TwinUniformQuantizer"]


class SampledQuantizer(Quantizer):
    """A per-tensor quantizer calibrated on a bounded random sample (<= MAX_SAMPLES values) of everything
    it observed; subclasses read it with :meth:`samples` in ``finalize``."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self._sample = ValueSample()

    def observe(self, x: Tensor) -> None:
        self._sample.add(x.float().reshape(1, -1))

    def samples(self) -> Tensor:
        """The kept values, flat (N,); RuntimeError before any observe()."""
        rows = self._sample.rows()
        if rows is None:
            raise RuntimeError(f"{type(self).__name__}.finalize() called before any observe()")
        return rows.reshape(-1)

    def reset(self) -> None:
        super().reset()
        self._sample.clear()


class LogSqrt2Quantizer(SampledQuantizer):
    """Log-√2 quantizer for post-softmax probabilities (RepQ-ViT), values in [0, 1].

    code q = clamp(round(-2·log2(x/Δ)), 0, 2^b-1); value = Δ·2^(-ceil(q/2))·(1 + (√2-1)·(q mod 2)),
    i.e. Δ·2^(-q/2) on a √2 grid; inputs whose code would exceed 2^b-1 (including 0) map to 0.
    Δ: the candidate with the lowest MSE over the observed values (the first wins ties); candidates
    ``quantiles`` p give Δ = quantile(x, p) (RepQ-ViT's code: p ∈ {0.999, 0.9999, 0.99999}), None gives
    max(x)·2^(-j/8), j = 0..16 (s2d 0.1). Gradient: straight-through (identity).
    """

    kind = "log_sqrt2"

    def __init__(self, bits: int = 4, quantiles: tuple[float, ...] | None = None) -> None:
        super().__init__(bits)
        if quantiles is not None and (not quantiles or not all(0 < p <= 1 for p in quantiles)):
            raise ValueError(f"LogSqrt2Quantizer.quantiles must be None or non-empty in (0, 1], got {quantiles!r}")
        self.quantiles = None if quantiles is None else tuple(quantiles)
        self.register_buffer("delta", None)

    def _candidates(self, x: Tensor) -> list[Tensor]:
        """The Δ candidates for the observed values ``x`` (N,)."""
        if self.quantiles is None:
            top = x.max().clamp_min(EPS)
            return [top * 2.0 ** (-j / 8) for j in range(17)]
        qs = torch.quantile(x, torch.tensor(self.quantiles, dtype=x.dtype, device=x.device))
        return list(qs.clamp_min(EPS))

    def _codes_to_values(self, x: Tensor, delta: Tensor) -> Tensor:
        qmax = 2**self.bits - 1
        code = torch.round(-2.0 * torch.log2(x.clamp_min(0) / delta))  # +inf for x == 0
        overflow = code > qmax
        code = code.clamp(0, qmax)
        value = delta * torch.exp2(-torch.ceil(code / 2)) * (1 + (math.sqrt(2) - 1) * torch.remainder(code, 2))
        return torch.where(overflow, torch.zeros_like(value), value)

    def finalize(self) -> None:
        x = self.samples()
        best, best_err = None, float("inf")
        for delta in self._candidates(x):
            err = float((self._codes_to_values(x, delta) - x).pow(2).mean())
            if best is None or err < best_err:
                best, best_err = delta, err
        self.delta = best.reshape(())
        self.calibrated = True

    def quantize(self, x: Tensor) -> Tensor:
        return x + (self._codes_to_values(x.detach(), self.delta.to(x.dtype)) - x).detach()

    def describe(self) -> dict:
        rng = None if self.delta is None else [0.0, float(self.delta)]
        return {"kind": self.kind, "bits": self.bits, "granularity": "tensor", "symmetric": False,
                "range_method": "mse", "range": rng}


class TwinUniformQuantizer(SampledQuantizer):
    """Twin uniform quantizer (PTQ4ViT): two uniform ranges with 2^(b-1) levels each.

    mode "softmax" (inputs in [0, 1]): a fine range [0, s) with step s / (2^(b-1)-1) and a coarse range
    [s, 1] with step 1 / (2^(b-1)-1) (the official code's steps: the top code is 1.0), where the threshold s = 2^-k, k in 0..19, is chosen by MSE on the observed
    values. mode "gelu" (the official ``PostGeluPTQSLBatchingQuantLinear``): negatives on the fixed step
    |GELU's minimum| / 2^(b-1) = 0.16997 / 2^(b-1), codes −2^(b-1)..0, so the lowest code is GELU's minimum
    whatever the calibration data; positives with step Δ+ = max(x)·c / (2^(b-1)-1), codes 0..2^(b-1)-1, c
    searched over 0.3..1.0 by MSE. Gradient: straight-through inside the ranges. Other methods may overwrite ``threshold`` / ``pos_step`` / ``neg_step`` (e.g. a Hessian search).
    """

    kind = "twin_uniform"
    MODES = ("softmax", "gelu")
    GELU_MIN = 0.16997124254703522  # −min over x of x·Φ(x), the exact GELU's most negative output

    def __init__(self, bits: int = 8, mode: str = "softmax") -> None:
        super().__init__(bits)
        if mode not in self.MODES:
            raise ValueError(f"TwinUniformQuantizer.mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.levels = 2 ** (bits - 1)
        self.register_buffer("threshold", None)  # softmax mode: s
        self.register_buffer("pos_step", None)  # gelu mode
        self.register_buffer("neg_step", None)

    def _softmax_q(self, x: Tensor, s: Tensor) -> Tensor:
        top = self.levels - 1  # the official matmul.py's steps: the top codes are exactly s and 1.0
        fine_step, coarse_step = s / top, torch.tensor(1.0 / top, dtype=x.dtype, device=x.device)
        fine = torch.clamp(round_ste(x / fine_step), 0, top) * fine_step
        coarse = torch.clamp(round_ste(x / coarse_step), 0, top) * coarse_step
        return torch.where(x.detach() < s, fine, coarse)

    def _gelu_q(self, x: Tensor, neg_step: Tensor, pos_step: Tensor) -> Tensor:
        neg = torch.clamp(round_ste(x / neg_step), -self.levels, 0) * neg_step
        pos = torch.clamp(round_ste(x / pos_step), 0, self.levels - 1) * pos_step
        return torch.where(x.detach() < 0, neg, pos)

    def finalize(self) -> None:
        x = self.samples()
        if self.mode == "softmax":
            errs = [(float((self._softmax_q(x, torch.tensor(2.0**-k)) - x).pow(2).mean()), k) for k in range(20)]
            self.threshold = torch.tensor(2.0 ** -min(errs)[1])
        else:
            n = self.levels - 1
            self.neg_step = torch.tensor(self.GELU_MIN / self.levels)
            top = x.max().clamp_min(EPS)
            errs = []
            for c in SHRINK_FACTORS:
                step = top * c / n
                errs.append((float((self._gelu_q(x, self.neg_step, step) - x).pow(2).mean()), c))
            self.pos_step = top * min(errs)[1] / n
        self.calibrated = True

    def quantize(self, x: Tensor) -> Tensor:
        if self.mode == "softmax":
            return self._softmax_q(x, self.threshold.to(x.dtype))
        return self._gelu_q(x, self.neg_step.to(x.dtype), self.pos_step.to(x.dtype))

    def describe(self) -> dict:
        if self.mode == "softmax":
            rng = None if self.threshold is None else {"threshold": float(self.threshold)}
        else:
            rng = None if self.pos_step is None else {
                "neg_step": float(self.neg_step), "pos_step": float(self.pos_step),
                "range": [-float(self.neg_step) * self.levels, float(self.pos_step) * (self.levels - 1)]}
        return {"kind": self.kind, "bits": self.bits, "granularity": "tensor", "symmetric": False,
                "mode": self.mode, "range": rng}
