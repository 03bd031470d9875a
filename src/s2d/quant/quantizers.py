"""Quantizer modules: the base life cycle and the uniform affine fake quantizer.

Every quantizer is an ``nn.Module`` that maps a float tensor to a float tensor holding only values that
a ``bits``-bit integer code can represent ("fake quantization" / quantize-dequantize). Life cycle::

    q = UniformQuantizer(bits=4, symmetric=False)
    q.calibrating = True
    for x in batches: q(x)          # observe: accumulates range statistics, returns x unchanged
    q.calibrating = False
    q.finalize()                    # scale / zero point from what was observed
    y = q(x)                        # fake-quantized x (gradients: straight-through estimator)

``enabled = False`` makes any quantizer the identity (float reference). Rounding is round-half-to-even
(``torch.round``), the same convention as ``torch.fake_quantize_per_tensor_affine``. The non-uniform
quantizers (log-√2, twin uniform) live in :mod:`s2d.quant.nonuniform`, the tensor maths in
:mod:`s2d.quant.primitives`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from s2d.quant.primitives import (
    EPS, GRANULARITIES, RANGE_METHODS, SHRINK_FACTORS, ValueSample, best_clipping, broadcast_shape, check_bits,
    fake_quant, grad_scale, int_range, kth, scale_zero_point,
)

__all__ = ["Quantizer", "UniformQuantizer", "MSE_PERCENTILES"]

MSE_PERCENTILES = (0.99, 0.999, 0.9999, 0.99999)  # percentile candidates of UniformQuantizer's "mse" search
# attributes whose assignment does not change what a quantizer computes (no cache invalidation)
_UNVERSIONED = ("_state_version", "num_observed", "token_mask")


class Quantizer(nn.Module):
    """Base fake quantizer: the calibrate -> finalize -> quantize life cycle and the enable switch.

    Subclasses implement ``observe`` (accumulate statistics), ``finalize``, ``quantize`` and ``describe``.
    While calibrating, a quantizer with ``token_mask`` (B, T) and ``token_dims`` set observes only the
    real tokens of its input (see :meth:`_real_tokens`; ``s2d.quant.calibration`` sets both).
    """

    kind = "base"

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_bits(f"{type(self).__name__}.bits", bits)
        self.bits = bits
        self.enabled = True
        self.calibrating = False
        self.calibrated = False
        self.num_observed = 0  # tensors seen while calibrating
        self.token_dims: tuple[int, int] | None = None  # (batch, token) dims of the inputs, for token_mask
        self.token_mask: Tensor | None = None  # (B, T) bool, real tokens of the batch being calibrated on

    def observe(self, x: Tensor) -> None:
        """Accumulate range statistics from ``x`` (no gradient)."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Compute the quantization parameters from everything observed since the last ``reset``."""
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the finalized parameters."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget observed statistics (keeps the finalized parameters until the next ``finalize``)."""
        self.num_observed = 0

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name not in _UNVERSIONED:  # any reconfiguration invalidates caches
            object.__setattr__(self, "_state_version", self.__dict__.get("_state_version", 0) + 1)

    def state_key(self) -> tuple:
        """Cheap fingerprint of everything the quantizer's output depends on besides its input.

        Changes whenever an attribute is (re)assigned, a parameter / buffer is modified in place (its
        ``_version``) or moved (``data_ptr``). In-place edits through ``.data`` are not tracked.
        """
        tensors = tuple(t for t in (*self._parameters.values(), *self._buffers.values()) if t is not None)
        return (self.__dict__.get("_state_version", 0), self.enabled, self.calibrating, self.training,
                tensors, tuple((t._version, t.data_ptr()) for t in tensors))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            seen = self._real_tokens(x.detach())
            if seen.numel():
                with torch.no_grad():
                    self.observe(seen)
                self.num_observed += 1
            return x
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} used before calibration: run calibrate() / finalize() first")
        return self.quantize(x)

    def _real_tokens(self, x: Tensor) -> Tensor:
        """What a calibrating quantizer observes of ``x``: with a ``token_mask`` (B, T) and ``token_dims``
        (0, t) matching ``x``'s shape, only the real tokens, (B, T, C) -> (N, C) or (B, H, T, D) with
        dims (0, 2) -> (N, H, D); otherwise ``x`` unchanged."""
        m, dims = self.token_mask, self.token_dims
        if m is None or dims is None or x.dim() < 3 or m.dim() != 2:
            return x
        b, t = dims
        if b != 0 or x.shape[0] != m.shape[0] or x.shape[t] != m.shape[1]:
            return x
        return x.movedim(t, 1)[m.to(x.device)]

    def describe(self) -> dict:
        """JSON-serialisable summary: kind, bits, granularity, symmetric, range."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Parameters finalized after construction are None buffers until then: allocate them from the
        # checkpoint so a calibrated quantizer round-trips through state_dict / load_state_dict.
        loaded = False
        for name, buf in list(self._buffers.items()):
            if buf is None and prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
                loaded = True
        if getattr(self, "learnable", False) and prefix + "scale" in state_dict and "scale" in self._buffers:
            self.scale = nn.Parameter(torch.empty_like(state_dict[prefix + "scale"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if loaded:
            self.calibrated = True

    def extra_repr(self) -> str:
        d = self.describe()
        return ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("kind", "range"))


class UniformQuantizer(Quantizer):
    """Uniform affine fake quantizer.

    Args:
        bits: 2..16.
        symmetric: zero-centred signed codes (zero point 0) vs unsigned codes with a zero point.
        granularity: "tensor" (one range), "channel" (one range per index of ``axis``; weights: axis 0 =
            output channel, activations: axis -1 = feature channel) or "token" (one range per row of the
            last dimension, computed on the fly from each input: dynamic per-token quantization).
        axis: channel axis for granularity "channel" (any axis, negative allowed).
        range_method: "minmax" (running min / max), "percentile" (``percentile`` / ``1 - percentile``
            order statistics over the observed values), "mse" (the clipping candidate with the lowest
            quantization MSE on the observed values; candidates: min-max shrunk by 1.0 ... 0.3 and the
            {0.99, 0.999, 0.9999, 0.99999} percentiles).
        learnable: after ``finalize`` the scale becomes an ``nn.Parameter`` trained with the LSQ gradient
            (build the optimizer after calibration).
        dynamic: recompute the range from every input instead of using calibrated statistics (weights
            during QAT, per-token activations). Always True for granularity "token".
        include_zero: widen every range to include 0 (asymmetric only; False: RepQ-ViT's and ERQ's
            unconstrained ranges, see :func:`s2d.quant.primitives.scale_zero_point`).
        narrow: symmetric codes [-(2^(b-1)-1), 2^(b-1)-1] (False: the full [-2^(b-1), 2^(b-1)-1], PTQ4ViT's).
    """

    kind = "uniform"

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity: str = "tensor", axis: int = 0,
                 range_method: str = "minmax", percentile: float = 0.9999, learnable: bool = False,
                 dynamic: bool = False, include_zero: bool = True, narrow: bool = True) -> None:
        super().__init__(bits)
        name = type(self).__name__
        if granularity not in GRANULARITIES:
            raise ValueError(f"{name}.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if range_method not in RANGE_METHODS:
            raise ValueError(f"{name}.range_method must be one of {RANGE_METHODS}, got {range_method!r}")
        if not 0.5 < percentile <= 1.0:
            raise ValueError(f"{name}.percentile must be in (0.5, 1], got {percentile!r}")
        if learnable and granularity == "token":
            raise ValueError(f"{name}.learnable requires granularity 'tensor' or 'channel', got 'token'")
        self.symmetric = symmetric
        self.granularity = granularity
        self.axis = axis
        self.range_method = range_method
        self.percentile = percentile
        self.learnable = learnable
        self.dynamic = dynamic or granularity == "token"
        self.include_zero = include_zero
        self.narrow = narrow
        self.qmin, self.qmax = int_range(bits, symmetric, narrow)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("lo", None)  # calibrated clipping range, per row
        self.register_buffer("hi", None)
        self._sample = ValueSample()  # observed values per row, for percentile / MSE
        self._run_lo: Tensor | None = None
        self._run_hi: Tensor | None = None

    # -- layout helpers -------------------------------------------------------------------------
    def _rows(self, x: Tensor) -> Tensor:
        """View ``x`` as (rows, values): one row per independent range."""
        if self.granularity == "tensor":
            return x.reshape(1, -1)
        if self.granularity == "channel":
            axis = self.axis % x.ndim
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return x.reshape(-1, x.shape[-1])  # token

    def _shaped(self, p: Tensor, x: Tensor) -> Tensor:
        """Reshape per-row parameters ``p`` (rows,) to broadcast against ``x``."""
        if self.granularity == "tensor":
            return p.reshape(())
        if self.granularity == "channel":
            axis = self.axis % x.ndim
            return p.view(broadcast_shape(x.ndim, axis, x.shape[axis]))
        return p.view(*x.shape[:-1], 1)

    # -- range estimation ----------------------------------------------------------------------
    def _range_from_rows(self, rows: Tensor | None, run_lo: Tensor, run_hi: Tensor) -> tuple[Tensor, Tensor]:
        """Clipping range (rows,) by ``range_method`` from the observed ``rows`` (rows, M) and their running
        min / max: "mse" tries min-max shrunk by each SHRINK_FACTORS entry, then the MSE_PERCENTILES."""
        if self.range_method == "minmax":
            return run_lo, run_hi
        if self.range_method == "percentile":
            return kth(rows, 1.0 - self.percentile), kth(rows, self.percentile)
        cands = [(run_lo * a, run_hi * a) for a in SHRINK_FACTORS]
        cands += [(kth(rows, 1.0 - p), kth(rows, p)) for p in MSE_PERCENTILES]
        return best_clipping(rows, cands, self.bits, self.symmetric, self.include_zero, self.narrow)

    def observe(self, x: Tensor) -> None:
        rows = self._rows(x.float())
        if self.granularity == "token":  # dynamic: keep only the extremes for describe()
            lo, hi = rows.min().reshape(1), rows.max().reshape(1)
        else:
            lo, hi = rows.min(1).values, rows.max(1).values
        if self._run_lo is None or self._run_lo.shape != lo.shape:
            self._run_lo, self._run_hi = lo, hi
        else:
            self._run_lo, self._run_hi = torch.minimum(self._run_lo, lo), torch.maximum(self._run_hi, hi)
        if self.range_method != "minmax" and self.granularity != "token":
            self._sample.add(rows)

    def finalize(self) -> None:
        if self._run_lo is None:
            raise RuntimeError(f"{type(self).__name__}.finalize() called before any observe()")
        if self.granularity == "token":
            self.lo, self.hi = self._run_lo, self._run_hi
            self.calibrated = True
            return
        lo, hi = self._range_from_rows(self._sample.rows(), self._run_lo, self._run_hi)
        self.set_range(lo, hi)

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set the clipping range directly (per row: shape (rows,) or scalar) and derive scale / zero point."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric, self.include_zero)
        self.lo, self.hi, self.zero_point = lo, hi, zp
        if self.learnable:
            self.scale = nn.Parameter(scale)  # replaces the buffer (nn.Module.__setattr__)
        else:
            self.scale = scale
        self.calibrated = True

    def reset(self) -> None:
        super().reset()
        self._sample.clear()
        self._run_lo = self._run_hi = None

    def quantize(self, x: Tensor) -> Tensor:
        if self.dynamic:
            rows = self._rows(x.detach())
            lo, hi = rows.min(1).values, rows.max(1).values
            if self.range_method != "minmax":
                lo, hi = self._range_from_rows(rows.float(), lo, hi)
            scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric, self.include_zero)
        else:
            scale, zp = self.scale, self.zero_point
            if not self.learnable and x.dtype == torch.float32:
                if not (x.requires_grad and torch.is_grad_enabled()):
                    return self._fast(x)
                if self.include_zero:  # torch's fused kernels need the zero point inside the codes
                    return self._fused(x)
            if self.learnable:
                per_scale = x.numel() / scale.numel()  # elements sharing one scale
                scale = grad_scale(scale.abs().clamp_min(EPS), 1.0 / math.sqrt(per_scale * self.qmax))
        return fake_quant(x, self._shaped(scale.to(x.dtype), x), self._shaped(zp.to(x.dtype), x),
                          self.qmin, self.qmax)

    def _static_params(self, x: Tensor) -> tuple:
        """Finalized (scale, 1/scale, lowest code − z, highest code − z, int32 z), computed once per
        (scale, zero point) state and layout: Python floats per tensor, broadcastable tensors per channel."""
        s, z = self.scale, self.zero_point
        layout = (x.ndim, self.axis % x.ndim if self.granularity == "channel" else None, x.device)
        key = (s, s._version, s.data_ptr(), z, z._version, z.data_ptr(), self.qmin, self.qmax, layout)
        cache = self.__dict__.get("_param_cache")
        if cache is not None and len(cache[0]) == len(key) and all(a is b or (type(a) is not Tensor and a == b)
                                                                   for a, b in zip(cache[0], key)):
            return cache[1]
        s32 = s.detach().float().reshape(-1).to(x.device)
        inv = 1.0 / s32  # float32 reciprocal, exactly as torch's fake-quant kernels compute it
        z32 = z.detach().float().reshape(-1).to(x.device)
        lo, hi = self.qmin - z32, self.qmax - z32
        if self.granularity == "tensor":
            params = (float(s32), float(inv), float(lo), float(hi), z32.to(torch.int32).reshape(()))
        else:
            shape = broadcast_shape(x.ndim, layout[1], s32.numel())
            params = (s32.view(shape), inv.view(shape), lo.view(shape), hi.view(shape), z32.to(torch.int32))
        self.__dict__["_param_cache"] = (key, params)  # plain attribute: not a buffer, not in state_dict
        return params

    def _fast(self, x: Tensor) -> Tensor:
        """No-grad fake quantization with cached parameters: ``clamp(round(x·(1/s)), qmin−z, qmax−z)·s``.

        Bit-identical to ``torch.fake_quantize_per_{tensor,channel}_affine`` (same float32 reciprocal,
        round half to even; integer-valued floats are exact) but one allocation, four vectorised passes
        and no gradient mask.
        """
        scale, inv, lo, hi, _ = self._static_params(x)
        return x.mul(inv).round_().clamp_(lo, hi).mul_(scale)

    def fast_codes(self, x: Tensor) -> tuple[Tensor, float] | None:
        """``(c, s)`` with ``c * s`` bit-identical to ``self(x)``: c = clamp(round(x/s), qmin−z, qmax−z), a
        new tensor of zero-shifted integer codes, s the step (a float). Lets a consumer apply the step to
        a smaller tensor (e.g. a matmul output). Only for a finalized, static, non-learnable per-tensor
        quantizer on float32 input needing no gradient, with no forward hooks (which must still see the
        call) and no overridden forward; ``None`` otherwise: then call the module.
        """
        if (not self.enabled or self.calibrating or not self.calibrated or self.dynamic or self.learnable
                or self.granularity != "tensor" or x.dtype != torch.float32
                or (x.requires_grad and torch.is_grad_enabled()) or type(self).forward is not UniformQuantizer.forward
                or self._forward_hooks or self._forward_pre_hooks or _global_forward_hooks
                or _global_forward_pre_hooks):
            return None
        scale, inv, lo, hi, _ = self._static_params(x)
        return x.mul(inv).round_().clamp_(lo, hi), scale

    def _fused(self, x: Tensor) -> Tensor:
        """torch's fused fake-quant kernels with the clipped-STE gradient (they multiply by 1/scale, so a
        value exactly half-way between two levels may round the other way than :func:`fake_quant`)."""
        _, _, _, _, zp = self._static_params(x)
        scale = self.scale.detach().float().reshape(-1).to(x.device)
        if self.granularity == "tensor":
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp, self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, scale, zp, self.axis % x.ndim, self.qmin, self.qmax)

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and self.dynamic and not self.calibrating:
            return self.quantize(x)
        return super().forward(x)

    def describe(self) -> dict:
        rng = None
        if self.lo is not None:
            rng = [float(self.lo.min()), float(self.hi.max())]
        elif self._run_lo is not None:
            rng = [float(self._run_lo.min()), float(self._run_hi.max())]
        return {"kind": self.kind, "bits": self.bits, "granularity": self.granularity,
                "symmetric": self.symmetric, "codes": [self.qmin, self.qmax], "range_method": self.range_method,
                "dynamic": self.dynamic, "learnable": self.learnable, "range": rng}
