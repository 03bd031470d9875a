"""What to quantize and how: :class:`QuantConfig` (weights / activations / scope) and :class:`Bits`.

``QuantConfig`` is the whole-model setting every PTQ method and QAT reads (bit widths, symmetry,
granularity, range estimation, what stays in float); ``Bits`` is just the (weight, activation) bit-width
pair with its "W4A4" spelling, for configuration files and reports.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from s2d.quant.primitives import GRANULARITIES, RANGE_METHODS, check_bits
from s2d.quant.quantizers import UniformQuantizer

__all__ = ["Bits", "GRID_BITS", "QuantConfig", "QuantSpec", "WEIGHT_GRANULARITIES"]

WEIGHT_GRANULARITIES = ("tensor", "channel")  # weights are never quantized per token
_BITS_RE = re.compile(r"[Ww](\d+)[Aa](\d+)")
# Widths a "WxAy" setting may name: 2..8 are the integer kernels' widths, 16 the near-lossless reference.
# 9..15 buy nothing over 8 in accuracy and no kernel runs them; QuantConfig still takes any 2..16.
GRID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class Bits(NamedTuple):
    """A (weight, activation) bit-width pair, spelled "W4A4"."""

    w: int  # weight bits
    a: int  # activation bits

    @property
    def name(self) -> str:
        """E.g. "W4A4"."""
        return f"W{self.w}A{self.a}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str, field: str = "bit setting") -> Bits:
        """"W4A4" / "w4a4" (surrounding spaces allowed) -> Bits(4, 4); both widths in ``GRID_BITS``.

        ``field`` names the setting in the ValueError messages (e.g. "quant.bits").
        """
        m = _BITS_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if not m:
            raise ValueError(f"{field} must look like 'W4A4', got {text!r}")
        bits = cls(int(m.group(1)), int(m.group(2)))
        if bits.w not in GRID_BITS or bits.a not in GRID_BITS:
            raise ValueError(f"{field}: bit widths must be 2..8 or 16 (the reference), got {text!r}")
        return bits


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how (validated on construction).

    Activations are the inputs of every quantized Linear and the attention matmul inputs (q, k, softmax
    probabilities, v). 16 bits is numerically ~lossless.
    """

    w_bits: int = 8                 # weight bits, 2..16
    a_bits: int = 8                 # activation bits, 2..16
    w_symmetric: bool = True        # weights: zero-centred signed codes (else unsigned with a zero point)
    w_granularity: str = "channel"  # weights: "tensor" | "channel" (one range per output channel)
    a_symmetric: bool = False       # activations: zero-centred signed codes
    a_granularity: str = "tensor"   # activations: "tensor" | "channel" (Linear input: per feature; q/k/v: per
                                    #   head) | "token" (dynamic, one range per token)
    a_range: str = "minmax"         # activation range over the calibration batches: "minmax" | "percentile" | "mse"
    quantize_attention: bool = True  # also quantize the attention matmul inputs q, k, probs, v
    quantize_head: bool = True      # also quantize the classifier-head Linears (s2d.models.head_names)
    quantize_patch_embed: bool = True  # also quantize a vision model's patch-embedding Conv2d weight (as the
    #                                    official PTQ pipelines; s2d.quant.conv); its input stays float
    skip: tuple[str, ...] = ()      # fnmatch patterns of module names left in float (Linears, attention)
    w_range: str = "minmax"         # weight range from the weight itself: "minmax" | "percentile" | "mse"
    percentile: float = 0.9999      # clipping percentile p for the "percentile" ranges, in (0.5, 1]

    def __post_init__(self) -> None:
        for f in ("w_bits", "a_bits"):
            check_bits(f"QuantConfig.{f}", getattr(self, f))
        if self.w_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"QuantConfig.w_granularity must be one of {WEIGHT_GRANULARITIES}, "
                             f"got {self.w_granularity!r}")
        if self.a_granularity not in GRANULARITIES:
            raise ValueError(f"QuantConfig.a_granularity must be one of {GRANULARITIES}, got {self.a_granularity!r}")
        for f in ("a_range", "w_range"):
            if getattr(self, f) not in RANGE_METHODS:
                raise ValueError(f"QuantConfig.{f} must be one of {RANGE_METHODS}, got {getattr(self, f)!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"QuantConfig.percentile must be in (0.5, 1], got {self.percentile!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"QuantConfig.skip must be a tuple of module-name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def bits(self) -> Bits:
        """The (w_bits, a_bits) pair."""
        return Bits(self.w_bits, self.a_bits)

    @property
    def name(self) -> str:
        """Short label, e.g. "W4A4"."""
        return self.bits.name

    def weight_quantizer(self) -> UniformQuantizer:
        """Weight quantizer: per output channel (axis 0) or per tensor, calibrated once from the weight
        (``s2d.quant.calibration.calibrate_weights``); pass ``dynamic=True`` to a UniformQuantizer to follow
        a training weight."""
        return UniformQuantizer(self.w_bits, self.w_symmetric, self.w_granularity, axis=0, range_method=self.w_range,
                                percentile=self.percentile)

    def act_quantizer(self, channel_axis: int = -1) -> UniformQuantizer:
        """Activation quantizer; ``channel_axis`` is used when ``a_granularity == "channel"``."""
        return UniformQuantizer(self.a_bits, self.a_symmetric, self.a_granularity, axis=channel_axis,
                                range_method=self.a_range, percentile=self.percentile)


QuantSpec = QuantConfig
"""Backward-compatible alias of :class:`QuantConfig` (its name before the ``s2d.quant`` split; the
README and older scripts use it)."""
