"""Quantization-aware training (QAT): fake quantization in the forward pass, STE in the backward pass.

The S2D paper's QAT setting: weights symmetric per output channel (range = the live weight's
min/max, recomputed every step), activations asymmetric per tensor with ranges that either

- ``act_range="ema"``: follow an exponential moving average of each batch's min/max while the model is
  in training mode (``momentum`` = weight of the newest batch; torch.ao's default 0.01), frozen in eval
  mode; initialised from ``calib`` batches when given, otherwise from the first training batch; or
- ``act_range="lsq"``: are learned (LSQ: the scale is an ``nn.Parameter`` with the LSQ gradient scale),
  initialised by a min-max calibration pass over ``calib`` (required). Build the optimizer *after*
  :func:`prepare_qat` so it sees the scales.

Quantized: every Linear's input and weight and the attention matmul inputs (q, k, softmax probs, v),
as for PTQ (``s2d.quant.prepare.prepare_model``). ``QuantLinear`` is an ``nn.Linear`` subclass swapped
in place, so ``SelectiveSpectralDecay`` (created before or after) still finds and decays every layer::

    model = prepare_qat(model, QuantConfig(w_bits=4, a_bits=4), calib=batches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    s2d = SelectiveSpectralDecay(model, opt, S2DConfig())       # optional
    for batch in loader: model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    model = convert_qat(model)                                  # frozen ranges, eval mode
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from s2d.quant.calibration import calibrate
from s2d.quant.config import QuantConfig
from s2d.quant.prepare import named_quantizers, prepare_model, quantizer_roles
from s2d.quant.primitives import EPS
from s2d.quant.quantizers import Quantizer, UniformQuantizer

logger = logging.getLogger(__name__)

__all__ = ["QATConfig", "EMAQuantizer", "prepare_qat", "convert_qat"]

ACT_RANGES = ("ema", "lsq")


@dataclass(frozen=True)
class QATConfig:
    """How QAT tracks activation ranges (weights always follow the live weight's min / max)."""

    act_range: str = "ema"  # "ema" (running min / max in training mode) | "lsq" (learned scale)
    momentum: float = 0.01  # EMA weight of the newest batch, in (0, 1] (torch.ao's default 0.01)

    def __post_init__(self) -> None:
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"QATConfig.act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"QATConfig.momentum must be in (0, 1], got {self.momentum!r}")


class EMAQuantizer(UniformQuantizer):
    """Per-tensor uniform fake quantizer whose range tracks an EMA of batch min/max in training mode.

    lo ← lo + momentum·(min(x) − lo), hi likewise, before quantizing each training batch; in eval mode
    (or with ``track = False``) the range is frozen. Gradients: clipped straight-through estimator.
    """

    kind = "uniform_ema"

    def __init__(self, bits: int = 8, symmetric: bool = False, momentum: float = 0.01) -> None:
        super().__init__(bits, symmetric, "tensor")
        self.momentum = momentum
        self.track = True

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        lo, hi = x.detach().min().float().reshape(1), x.detach().max().float().reshape(1)
        if self.calibrated and self.lo is not None:
            lo = self.lo + self.momentum * (lo - self.lo)
            hi = self.hi + self.momentum * (hi - self.hi)
        self.set_range(lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and self.training and self.track and not self.calibrating:
            self._update(x)
        return super().forward(x)

    def describe(self) -> dict:
        return {**super().describe(), "momentum": self.momentum}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def prepare_qat(model: nn.Module, spec: QuantConfig = QuantConfig(w_bits=4, a_bits=4),
                calib: Iterable[dict] | None = None, config: QATConfig = QATConfig(),
                progress: bool = True) -> nn.Module:
    """Insert QAT fake quantizers in place and return ``model`` (in training mode).

    spec: bit-widths and symmetry (activation granularity must be "tensor"); calib: model-input dicts
    for the initial activation ranges (required for LSQ; optional for EMA).
    """
    if spec.a_granularity != "tensor":
        raise ValueError(f"prepare_qat: QuantConfig.a_granularity must be 'tensor' for QAT, got {spec.a_granularity!r}")
    if config.act_range == "lsq" and calib is None:
        raise ValueError("prepare_qat: QATConfig.act_range='lsq' needs calib batches to initialise the scales")
    prepare_model(model, spec)
    roles = quantizer_roles(model)
    for name, q in named_quantizers(model).items():
        if roles[name] == "weight":  # min-max of the live weight at every step
            new: Quantizer = UniformQuantizer(spec.w_bits, spec.w_symmetric, spec.w_granularity, axis=0, dynamic=True)
        elif config.act_range == "ema":
            new = EMAQuantizer(spec.a_bits, spec.a_symmetric, config.momentum)
        else:
            new = UniformQuantizer(spec.a_bits, spec.a_symmetric, "tensor", learnable=True)
        new.enabled = q.enabled
        _replace(model, name, new)
    if calib is not None:
        calibrate(model, calib, progress=progress)  # min-max init; LSQ scales become Parameters here
    model.train()
    n_w = sum(r == "weight" for r in roles.values())
    logger.info("prepared QAT %s (%s ranges): %d Linears", spec.name, config.act_range, n_w)
    return model


@torch.no_grad()
def _frozen(q: UniformQuantizer, weight: Tensor | None) -> UniformQuantizer:
    """A static UniformQuantizer with ``q``'s current parameters (weights: from ``weight``)."""
    if weight is not None:
        new = UniformQuantizer(q.bits, q.symmetric, q.granularity, axis=q.axis)
        new.observe(weight.detach())
        new.finalize()
        return new
    new = UniformQuantizer(q.bits, q.symmetric, "tensor")
    if not q.calibrated:
        raise RuntimeError("convert_qat: an activation quantizer never saw data; run a training or calib pass")
    if getattr(q, "learnable", False):
        scale = q.scale.detach().abs().clamp_min(EPS).reshape(-1)
        zp = q.zero_point.reshape(-1)
        new.set_range((q.qmin - zp) * scale, (q.qmax - zp) * scale)
        new.scale, new.zero_point = scale.clone(), zp.clone()  # keep the learned step exactly
    else:
        new.set_range(q.lo.clone(), q.hi.clone())
    return new


def convert_qat(model: nn.Module) -> nn.Module:
    """Freeze every QAT quantizer (static per-tensor activation ranges, per-channel weight scales from the
    trained weights, learned LSQ scales as buffers) and return ``model`` in eval mode."""
    modules = dict(model.named_modules())
    roles = quantizer_roles(model)
    for name, q in named_quantizers(model).items():
        if not isinstance(q, UniformQuantizer):
            continue
        weight = modules[name.rpartition(".")[0]].weight if roles[name] == "weight" else None
        new = _frozen(q, weight)
        new.enabled = q.enabled
        _replace(model, name, new)
    return model.eval()
