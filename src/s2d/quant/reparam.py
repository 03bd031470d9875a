"""RepQ-ViT scale reparameterisation: per-channel activation quantization -> one per-tensor quantizer.

A post-LayerNorm activation x (channels c = 1..C) calibrated *per channel* with asymmetric uniform
parameters (Δ_c, z_c) (code = round(x_c/Δ_c) + z_c) is mapped to x'_c = x_c / r_c + s_c with

    r_c = Δ_c / mean(Δ)          s_c = (z_c − mean(z)) · mean(Δ)

so that round(x'_c / Δ̄) + z̄ = round(x_c / Δ_c) + z_c for Δ̄ = mean(Δ), z̄ = mean(z): the per-tensor
quantizer (Δ̄, z̄) on x' reproduces the per-channel grid on x exactly (zero points unrounded here; the
deployed per-tensor quantizer rounds z̄ once). The affine x -> x' is absorbed by the producer and the
consumers:

- producer LayerNorm (pre-LN ViTs, where the norm feeds only Linears): γ ← γ / r, β ← β / r + s
  (RepQ-ViT eq. 9; its "− b" with b_c = (z̄ − z_c)·Δ̄ is our "+ s").
- each consuming Linear: W[:, c] ← W[:, c] · r_c, bias ← bias − W_new @ s, so W_new x' + b_new = W x + b.

Post-LN encoders (BERT, MPNet) are different: the LayerNorm that feeds q/k/v (or fc1) also feeds the
residual stream, and the next LayerNorm is not invariant to a per-channel affine of its input, so the
affine cannot be folded into the norm without changing the model. There we keep the affine as an
explicit per-channel input transform in front of the Linear's per-tensor input quantizer
(:class:`ChannelAffineInput`: x' = x ⊙ (1/r) + s, quantized per tensor) and fold r and s into that
Linear's weight and bias exactly as above. The float function is unchanged; the deployed kernel pays
one per-channel multiply-add on the Linear input (which an integer kernel can fuse into the preceding
LayerNorm's output rescale, since LayerNorm output is produced in float anyway).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from s2d.quant.primitives import check_bits

__all__ = [
    "ChannelAffine",
    "channel_affine_from_ranges",
    "fold_into_norm",
    "fold_into_linear",
    "ChannelAffineInput",
]


@dataclass(frozen=True)
class ChannelAffine:
    """x'_c = x_c / r_c + s_c and the per-tensor range [lo, hi] that reproduces the per-channel grid.

    r, shift: (C,) float tensors. lo, hi: floats, the per-tensor asymmetric range of x' (units of x').
    """

    r: Tensor      # (C,) per-channel divisor r_c
    shift: Tensor  # (C,) per-channel shift s_c
    lo: float      # per-tensor range of x', low end
    hi: float      # per-tensor range of x', high end


def channel_affine_from_ranges(lo: Tensor, hi: Tensor, bits: int, eps: float = 1e-8,
                               include_zero: bool = True) -> ChannelAffine:
    """Reparameterisation of per-channel asymmetric ranges [lo_c, hi_c] (C,) at ``bits`` bits.

    Δ_c = (hi_c − lo_c) / (2^bits − 1), z_c = −lo_c / Δ_c (unrounded); returns r, s and the per-tensor
    range [−z̄Δ̄, (2^bits − 1 − z̄)Δ̄] every transformed channel x'_c then shares exactly.
    ``include_zero``: first widen each [lo_c, hi_c] to include 0 (False: RepQ-ViT's code, where a
    channel in [3, 8] keeps Δ_c = 5 / (2^bits − 1); the per-tensor range must then not be widened either).
    """
    if lo.shape != hi.shape or lo.dim() != 1:
        raise ValueError(f"lo/hi must be 1-D tensors of the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
    check_bits("channel_affine_from_ranges.bits", bits)
    lo, hi = lo.double(), hi.double()
    if include_zero:
        lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    levels = 2**bits - 1
    delta = ((hi - lo) / levels).clamp_min(eps)
    zero = -lo / delta
    d_bar, z_bar = delta.mean(), zero.mean()
    r = delta / d_bar
    shift = (zero - z_bar) * d_bar
    t_lo = float(-z_bar * d_bar)
    return ChannelAffine(r=r.float(), shift=shift.float(), lo=t_lo, hi=t_lo + levels * float(d_bar))


@torch.no_grad()
def fold_into_norm(norm: nn.Module, aff: ChannelAffine) -> None:
    """γ ← γ / r, β ← β / r + s in place, so the norm outputs x' = x / r + s. Needs an affine LayerNorm."""
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(weight, Tensor) or not isinstance(bias, Tensor):
        raise ValueError(
            f"{type(norm).__name__} has no affine weight and bias; RepQ reparameterisation needs a LayerNorm "
            "with elementwise_affine=True and bias=True"
        )
    if weight.shape != aff.r.shape:
        raise ValueError(f"norm has {weight.numel()} channels, reparameterisation has {aff.r.numel()}")
    r, s = aff.r.to(weight), aff.shift.to(weight)
    weight.div_(r)
    bias.div_(r).add_(s)


@torch.no_grad()
def fold_into_linear(linear: nn.Linear, aff: ChannelAffine) -> None:
    """W ← W · r (per input column), b ← b − W_new @ s in place; creates a bias if the Linear has none."""
    w = linear.weight
    if w.shape[1] != aff.r.numel():
        raise ValueError(f"Linear has {w.shape[1]} input features, reparameterisation has {aff.r.numel()}")
    r, s = aff.r.to(w), aff.shift.to(w)
    w.mul_(r[None, :])
    corr = (w.double() @ s.double()).to(w)
    if linear.bias is None:
        linear.bias = nn.Parameter(-corr)
    else:
        linear.bias.sub_(corr)


class ChannelAffineInput(nn.Module):
    """Per-channel input transform x' = x ⊙ inv_r + shift followed by a per-tensor ``quantizer``.

    Used for post-LN encoders (see the module docstring). Always applies the transform (also when the
    quantizer is disabled), because the owning Linear's weights were folded to expect x'.
    x: (..., C) -> (..., C).
    """

    def __init__(self, aff: ChannelAffine, quantizer: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_r", 1.0 / aff.r.clone())
        self.register_buffer("shift", aff.shift.clone())
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x * self.inv_r.to(x.dtype) + self.shift.to(x.dtype))

    def describe(self) -> dict:
        inner = self.quantizer.describe() if hasattr(self.quantizer, "describe") else {}
        return {**inner, "reparam": "per-channel affine (post-LN RepQ)"}
