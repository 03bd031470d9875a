"""QuantLinear: an ``nn.Linear`` whose input and weight pass through fake quantizers.

The weight's fake quantization is cached in eval mode without grad, keyed on the weight's identity,
version and storage and on the weight quantizer's state (:func:`state_key` / :func:`same_key`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2d.quant.config import QuantConfig
from s2d.quant.quantizers import Quantizer, UniformQuantizer

__all__ = ["QuantLinear", "state_key", "same_key"]


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake quantizers. Same parameters, same name.

    Made from an existing Linear by :meth:`from_linear`, which swaps the instance's class in place, so
    parameter objects, optimizer state, hooks (e.g. SelectiveSpectralDecay's) and module names are kept.
    """

    input_quantizer: nn.Module   # a Quantizer, or a wrapper around one (e.g. RepQ's ChannelAffineInput)
    weight_quantizer: nn.Module  # a Quantizer

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 input_quantizer: Quantizer | None = None, weight_quantizer: Quantizer | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_quantizer = input_quantizer if input_quantizer is not None else QuantConfig().act_quantizer()
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else QuantConfig().weight_quantizer()

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_quantizer: nn.Module, weight_quantizer: nn.Module) -> QuantLinear:
        """Turn ``linear`` into a QuantLinear in place and return it."""
        if type(linear) is not nn.Linear and not isinstance(linear, QuantLinear):
            raise TypeError(f"QuantLinear.from_linear expects a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.input_quantizer = input_quantizer
        linear.weight_quantizer = weight_quantizer
        return linear

    def forward(self, x: Tensor) -> Tensor:
        w, iq = self.quantized_weight(), self.input_quantizer
        codes = iq.fast_codes(x) if isinstance(iq, UniformQuantizer) and self.bias is not None else None
        if codes is None:
            return F.linear(iq(x), w, self.bias)
        # x_q = c·s, so x_q @ W_qᵀ + b = s·(c @ W_qᵀ) + b: the step rides on GEMM's alpha (no extra pass)
        c, s = codes
        out = torch.addmm(self.bias, c.reshape(-1, c.shape[-1]), w.t(), alpha=s)
        return out.view(*x.shape[:-1], out.shape[-1])

    def quantized_weight(self) -> Tensor:
        """``weight_quantizer(weight)``, (out, in). In eval mode without grad the result is cached and
        reused until the weight (identity, ``_version``, storage) or the quantizer's state changes, so a
        frozen model quantizes each weight once. Training / grad-enabled calls always recompute.
        In-place edits through ``weight.data`` are invisible to the cache: use ``torch.no_grad()`` edits.
        """
        w, wq = self.weight, self.weight_quantizer
        if self.training or torch.is_grad_enabled():
            self.__dict__.pop("_wq_cache", None)
            return wq(w)
        key = (w._version, w.data_ptr(), w.dtype, state_key(wq))
        cache = self.__dict__.get("_wq_cache")
        if cache is not None and cache[0] is w and cache[1] is wq and same_key(cache[2], key):
            return cache[3]
        out = wq(w)
        self.__dict__["_wq_cache"] = (w, wq, key, out)  # plain attribute: not a buffer, not in state_dict
        return out


def state_key(m: nn.Module) -> tuple:
    """Fingerprint of a weight quantizer's state (see :meth:`Quantizer.state_key`; recursive for others)."""
    if isinstance(m, Quantizer):
        return m.state_key()
    tensors = tuple(m.parameters()) + tuple(m.buffers())
    return (m.training, tensors, tuple((t._version, t.data_ptr()) for t in tensors),
            tuple(getattr(s, "_state_version", 0) for s in m.modules()))


def same_key(a: tuple, b: tuple) -> bool:
    """Equality for cache keys holding tensors (compared by identity) and plain values (by ==)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not same_key(x, y):
                return False
        elif isinstance(x, Tensor) or isinstance(y, Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True
