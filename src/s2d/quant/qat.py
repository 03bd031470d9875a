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
as for PTQ (``s2d.quant.apply.prepare_model``). ``QuantLinear`` is an ``nn.Linear`` subclass swapped
in place, so ``SelectiveSpectralDecay`` (created before or after) still finds and decays every layer::

    model = prepare_qat(model, QuantSpec(w_bits=4, a_bits=4), calib=batches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    s2d = SelectiveSpectralDecay(model, opt, S2DConfig())       # optional
    for batch in loader: model(**batch).loss.backward(); opt.step(); opt.zero_grad()
    model = convert_qat(model)                                  # frozen ranges, eval mode
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from s2d.quant.apply import QuantLinear, QuantSpec, calibrate, prepare_model, quantizers
from s2d.quant.quantizers import Quantizer, UniformQuantizer

logger = logging.getLogger(__name__)

__all__ = ["QATConfig", "EMAQuantizer", "prepare_qat", "convert_qat"]

ACT_RANGES = ("ema", "lsq")


@dataclass(frozen=True)
class QATConfig:
    """act_range: "ema" (running min/max) | "lsq" (learned scale); momentum: EMA weight of a new batch, (0, 1]."""

    act_range: str = "ema"
    momentum: float = 0.01

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


def _weight_quantizer(spec: QuantSpec, dynamic: bool) -> UniformQuantizer:
    return UniformQuantizer(spec.w_bits, spec.w_symmetric, spec.w_granularity, axis=0, dynamic=dynamic)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _weight_names(model: nn.Module) -> set[str]:
    return {f"{n}.weight_quantizer" for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def prepare_qat(model: nn.Module, spec: QuantSpec = QuantSpec(w_bits=4, a_bits=4),
                calib: Iterable[dict] | None = None, config: QATConfig = QATConfig(),
                progress: bool = True) -> nn.Module:
    """Insert QAT fake quantizers in place and return ``model`` (in training mode).

    spec: bit-widths and symmetry (activation granularity must be "tensor"); calib: model-input dicts
    for the initial activation ranges (required for LSQ; optional for EMA).
    """
    if spec.a_granularity != "tensor":
        raise ValueError(f"prepare_qat: QuantSpec.a_granularity must be 'tensor' for QAT, got {spec.a_granularity!r}")
    if config.act_range == "lsq" and calib is None:
        raise ValueError("prepare_qat: QATConfig.act_range='lsq' needs calib batches to initialise the scales")
    prepare_model(model, spec)
    wnames = _weight_names(model)
    for name, q in quantizers(model).items():
        if name in wnames:
            new: Quantizer = _weight_quantizer(spec, dynamic=True)
        elif config.act_range == "ema":
            new = EMAQuantizer(spec.a_bits, spec.a_symmetric, config.momentum)
        else:
            new = UniformQuantizer(spec.a_bits, spec.a_symmetric, "tensor", learnable=True)
        new.enabled = q.enabled
        _replace(model, name, new)
    if calib is not None:
        calibrate(model, calib, progress=progress)  # min-max init; LSQ scales become Parameters here
    model.train()
    n_w = len(wnames)
    logger.info("prepared QAT %s (%s ranges): %d Linears", spec.name, config.act_range, n_w)
    return model


@torch.no_grad()
def _frozen(q: Quantizer, weight: Tensor | None) -> Quantizer:
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
        scale = q.scale.detach().abs().clamp_min(1e-8).reshape(-1)
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
    wnames = _weight_names(model)
    for name, q in quantizers(model).items():
        if not isinstance(q, UniformQuantizer):
            continue
        weight = modules[name.rpartition(".")[0]].weight if name in wnames else None
        new = _frozen(q, weight)
        new.enabled = q.enabled
        _replace(model, name, new)
    return model.eval()
