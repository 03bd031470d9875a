"""Fake quantizers: uniform affine, log-sqrt2 and twin-uniform, with a straight-through estimator.

Every quantizer is an ``nn.Module`` that maps a float tensor to a float tensor holding only values that
a ``bits``-bit integer code can represent ("fake quantization" / quantize-dequantize). Life cycle::

    q = UniformQuantizer(bits=4, symmetric=False)
    q.calibrating = True
    for x in batches: q(x)          # observe: accumulates range statistics, returns x unchanged
    q.calibrating = False
    q.finalize()                    # scale / zero point from what was observed
    y = q(x)                        # fake-quantized x (gradients: straight-through estimator)

``enabled = False`` makes any quantizer the identity (float reference). Rounding is round-half-to-even
(``torch.round``), the same convention as ``torch.fake_quantize_per_tensor_affine``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

GRANULARITIES = ("tensor", "channel", "token")
RANGE_METHODS = ("minmax", "percentile", "mse")
_EPS = 1e-8
_MAX_SAMPLES = 1 << 21  # values kept per row for percentile / MSE range search
_CALIB_TOKEN_MASK: Tensor | None = None  # (B, T) mask of real tokens of the batch being calibrated on


def set_calibration_mask(mask: Tensor | None) -> None:
    """Set (or clear with None) the (B, T) real-token mask of the current calibration batch.

    While set, a calibrating quantizer with ``token_dims = (batch_dim, token_dim)`` observes only the
    real (unpadded) tokens of inputs whose shape matches the mask on those dims; padding positions do not
    widen its range. ``s2d.quant.apply.calibrate`` sets it per batch from ``batch["attention_mask"]``.
    """
    global _CALIB_TOKEN_MASK
    _CALIB_TOKEN_MASK = None if mask is None else mask.bool()


def _real_tokens(x: Tensor, dims: tuple[int, int] | None) -> Tensor:
    """Rows of ``x`` at real tokens: (B, T, C) -> (N, C); (B, H, T, D) with dims (0, 2) -> (N, H, D)."""
    m = _CALIB_TOKEN_MASK
    if m is None or dims is None or x.dim() < 3 or m.dim() != 2:
        return x
    b, t = dims
    if b != 0 or x.shape[0] != m.shape[0] or x.shape[t] != m.shape[1]:
        return x
    return x.movedim(t, 1)[m.to(x.device)]


def _check_bits(owner: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"{owner}.bits must be an int in [2, 16], got {bits!r}")


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) in the forward pass; identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: Tensor, factor: float) -> Tensor:
    """Value of ``x``, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return (x - x * factor).detach() + x * factor


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: symmetric = [-(2^(b-1)-1), 2^(b-1)-1] (narrow, zero-centred); asymmetric = [0, 2^b-1]."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point for the range [lo, hi] (elementwise over channels).

    Zero is always representable: the range is widened to include 0. Symmetric: scale = max(|lo|, |hi|) /
    (2^(b-1)-1), zero point 0. Asymmetric: scale = (hi - lo) / (2^b - 1), zero point = round(-lo / scale).
    """
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        return scale.clamp_min(_EPS), torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """(clamp(round(x / scale) + z, qmin, qmax) - z) * scale, with a straight-through gradient.

    The gradient w.r.t. ``x`` is 1 where ``x`` falls inside the representable range and 0 where it is
    clipped (the usual clipped STE). ``scale`` and ``zero_point`` broadcast against ``x``; a ``scale`` that
    requires grad receives the LSQ gradient.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def _broadcast_shape(ndim: int, axis: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = size
    return shape


def quantize_dequantize(x: Tensor, bits: int, symmetric: bool, axis: int | None = None) -> Tensor:
    """Fake-quantize ``x`` with min-max ranges: per tensor (``axis=None``) or one range per index of ``axis``.

    Shapes: output = ``x.shape``. Symmetric uses codes [-(2^(b-1)-1), 2^(b-1)-1]; asymmetric [0, 2^b-1].
    """
    _check_bits("quantize_dequantize", bits)
    qmin, qmax = int_range(bits, symmetric)
    if axis is None:
        lo, hi = x.min(), x.max()
        scale, zp = scale_zero_point(lo, hi, bits, symmetric)
        return fake_quant(x, scale, zp, qmin, qmax)
    axis = axis % x.ndim
    rows = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)
    scale, zp = scale_zero_point(rows.min(1).values, rows.max(1).values, bits, symmetric)
    shape = _broadcast_shape(x.ndim, axis, x.shape[axis])
    return fake_quant(x, scale.view(shape), zp.view(shape), qmin, qmax)


class Quantizer(nn.Module):
    """Base fake quantizer. Subclasses implement ``_observe_rows``-style statistics, ``finalize`` and ``quantize``."""

    kind = "base"

    def __init__(self, bits: int) -> None:
        super().__init__()
        _check_bits(type(self).__name__, bits)
        self.bits = bits
        self.enabled = True
        self.calibrating = False
        self.calibrated = False
        self.num_observed = 0  # tensors seen while calibrating
        self.token_dims: tuple[int, int] | None = None  # (batch, token) dims: skip padding when calibrating

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
        if name not in ("_state_version", "num_observed"):  # any reconfiguration invalidates caches
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
            seen = _real_tokens(x.detach(), self.token_dims)
            if seen.numel():
                with torch.no_grad():
                    self.observe(seen)
                self.num_observed += 1
            return x
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} used before calibration: run calibrate() / finalize() first")
        return self.quantize(x)

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


def _kth(rows: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile (0 <= q <= 1) by order statistics: the ceil(q*n)-th smallest value."""
    n = rows.shape[1]
    k = min(max(int(math.ceil(q * n - 1e-9)), 1), n)  # tolerance: 1 - 0.99 != 0.01 in floats
    return rows.kthvalue(k, dim=1).values


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
    """

    kind = "uniform"

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity: str = "tensor", axis: int = 0,
                 range_method: str = "minmax", percentile: float = 0.9999, learnable: bool = False,
                 dynamic: bool = False) -> None:
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
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("lo", None)  # calibrated clipping range, per row
        self.register_buffer("hi", None)
        self._samples: list[Tensor] = []
        self._n_samples = 0
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
            return p.view(_broadcast_shape(x.ndim, axis, x.shape[axis]))
        return p.view(*x.shape[:-1], 1)

    # -- range estimation ----------------------------------------------------------------------
    def _range_from_rows(self, rows: Tensor, run_lo: Tensor, run_hi: Tensor) -> tuple[Tensor, Tensor]:
        if self.range_method == "minmax":
            return run_lo, run_hi
        if self.range_method == "percentile":
            return _kth(rows, 1.0 - self.percentile), _kth(rows, self.percentile)
        return self._mse_search(rows, run_lo, run_hi)

    def _mse_search(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        cands = [(lo * a, hi * a) for a in torch.linspace(1.0, 0.3, 15).tolist()]
        cands += [(_kth(rows, 1.0 - p), _kth(rows, p)) for p in (0.99, 0.999, 0.9999, 0.99999)]
        best_lo, best_hi = lo.clone(), hi.clone()
        best_err = torch.full_like(lo, float("inf"))
        for c_lo, c_hi in cands:
            s, z = scale_zero_point(c_lo, c_hi, self.bits, self.symmetric)
            err = (fake_quant(rows, s[:, None], z[:, None], self.qmin, self.qmax) - rows).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo, best_hi

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
            budget = max(_MAX_SAMPLES - self._n_samples, 0)
            if budget and rows.shape[1] > budget:
                rows = rows[:, torch.randperm(rows.shape[1], device=rows.device)[:budget]]
            if budget:
                self._samples.append(rows)
                self._n_samples += rows.shape[1]

    def finalize(self) -> None:
        if self._run_lo is None:
            raise RuntimeError(f"{type(self).__name__}.finalize() called before any observe()")
        if self.granularity == "token":
            self.lo, self.hi = self._run_lo, self._run_hi
            self.calibrated = True
            return
        rows = torch.cat(self._samples, 1) if self._samples else None
        lo, hi = self._range_from_rows(rows, self._run_lo, self._run_hi)
        self.set_range(lo, hi)

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set the clipping range directly (per row: shape (rows,) or scalar) and derive scale / zero point."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric)
        self.lo, self.hi, self.zero_point = lo, hi, zp
        if self.learnable:
            self.scale = nn.Parameter(scale)  # replaces the buffer (nn.Module.__setattr__)
        else:
            self.scale = scale
        self.calibrated = True

    def reset(self) -> None:
        super().reset()
        self._samples, self._n_samples = [], 0
        self._run_lo = self._run_hi = None

    def quantize(self, x: Tensor) -> Tensor:
        if self.dynamic:
            rows = self._rows(x.detach())
            lo, hi = rows.min(1).values, rows.max(1).values
            if self.range_method != "minmax":
                lo, hi = self._range_from_rows(rows.float(), lo, hi)
            scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric)
        else:
            scale, zp = self.scale, self.zero_point
            if not self.learnable and x.dtype == torch.float32:
                if not (x.requires_grad and torch.is_grad_enabled()):
                    return self._fast(x)
                return self._fused(x)
            if self.learnable:
                per_scale = x.numel() / scale.numel()  # elements sharing one scale
                scale = _grad_scale(scale.abs().clamp_min(_EPS), 1.0 / math.sqrt(per_scale * self.qmax))
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
            shape = _broadcast_shape(x.ndim, layout[1], s32.numel())
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
                "symmetric": self.symmetric, "range_method": self.range_method,
                "dynamic": self.dynamic, "learnable": self.learnable, "range": rng}


class _SampledQuantizer(Quantizer):
    """A quantizer calibrated on a bounded random sample (<= _MAX_SAMPLES values) of what it observed."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self._samples: list[Tensor] = []
        self._n_samples = 0

    def observe(self, x: Tensor) -> None:
        flat = x.float().reshape(-1)
        budget = max(_MAX_SAMPLES - self._n_samples, 0)
        if budget and flat.numel() > budget:
            flat = flat[torch.randperm(flat.numel(), device=flat.device)[:budget]]
        if budget:
            self._samples.append(flat)
            self._n_samples += flat.numel()

    def reset(self) -> None:
        super().reset()
        self._samples, self._n_samples = [], 0


class LogSqrt2Quantizer(_SampledQuantizer):
    """Log-√2 quantizer for post-softmax probabilities (RepQ-ViT), values in [0, 1].

    code q = clamp(round(-2·log2(x/Δ)), 0, 2^b-1); value = Δ·2^(-ceil(q/2))·(1 + (√2-1)·(q mod 2)),
    i.e. Δ·2^(-q/2) on a √2 grid; inputs whose code would exceed 2^b-1 (including 0) map to 0.
    Δ: the candidate max(x)·2^(-j/8), j = 0..16, with the lowest MSE over the observed values.
    Gradient: straight-through (identity).
    """

    kind = "log_sqrt2"

    def __init__(self, bits: int = 4) -> None:
        super().__init__(bits)
        self.register_buffer("delta", None)

    def _codes_to_values(self, x: Tensor, delta: Tensor) -> Tensor:
        qmax = 2**self.bits - 1
        code = torch.round(-2.0 * torch.log2(x.clamp_min(0) / delta))  # +inf for x == 0
        overflow = code > qmax
        code = code.clamp(0, qmax)
        value = delta * torch.exp2(-torch.ceil(code / 2)) * (1 + (math.sqrt(2) - 1) * torch.remainder(code, 2))
        return torch.where(overflow, torch.zeros_like(value), value)

    def finalize(self) -> None:
        if not self._samples:
            raise RuntimeError("LogSqrt2Quantizer.finalize() called before any observe()")
        x = torch.cat(self._samples)
        top = x.max().clamp_min(_EPS)
        best, best_err = top, float("inf")
        for j in range(17):
            delta = top * 2.0 ** (-j / 8)
            err = float((self._codes_to_values(x, delta) - x).pow(2).mean())
            if err < best_err:
                best, best_err = delta, err
        self.delta = best.reshape(())
        self.calibrated = True

    def quantize(self, x: Tensor) -> Tensor:
        return x + (self._codes_to_values(x.detach(), self.delta.to(x.dtype)) - x).detach()

    def describe(self) -> dict:
        rng = None if self.delta is None else [0.0, float(self.delta)]
        return {"kind": self.kind, "bits": self.bits, "granularity": "tensor", "symmetric": False,
                "range_method": "mse", "range": rng}


class TwinUniformQuantizer(_SampledQuantizer):
    """Twin uniform quantizer (PTQ4ViT): two uniform ranges with 2^(b-1) levels each.

    mode "softmax" (inputs in [0, 1]): a fine range [0, s) with step s / 2^(b-1) and a coarse range
    [s, 1] with step 2^-(b-1), where the threshold s = 2^-k, k in 0..19, is chosen by MSE on the observed
    values. mode "gelu": negatives with step |min(x)| / (2^(b-1)-1) (the observed minimum; PTQ4ViT uses
    GELU's fixed minimum, -0.17) and positives with step Δ+ = max(x)·c / (2^(b-1)-1), c searched over
    0.3..1.0 by MSE. Each range keeps 2^(b-1) codes (one sign bit). Gradient: straight-through inside the
    ranges. Other methods may overwrite ``threshold`` / ``pos_step`` / ``neg_step`` (e.g. a Hessian search).
    """

    kind = "twin_uniform"
    MODES = ("softmax", "gelu")

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
        fine_step, coarse_step = s / self.levels, torch.tensor(1.0 / self.levels, dtype=x.dtype, device=x.device)
        fine = torch.clamp(round_ste(x / fine_step), 0, self.levels - 1) * fine_step
        coarse = torch.clamp(round_ste(x / coarse_step), 0, self.levels - 1) * coarse_step
        return torch.where(x.detach() < s, fine, coarse)

    def _gelu_q(self, x: Tensor, neg_step: Tensor, pos_step: Tensor) -> Tensor:
        neg = torch.clamp(round_ste(x / neg_step), -(self.levels - 1), 0) * neg_step
        pos = torch.clamp(round_ste(x / pos_step), 0, self.levels - 1) * pos_step
        return torch.where(x.detach() < 0, neg, pos)

    def finalize(self) -> None:
        if not self._samples:
            raise RuntimeError("TwinUniformQuantizer.finalize() called before any observe()")
        x = torch.cat(self._samples)
        if self.mode == "softmax":
            errs = [(float((self._softmax_q(x, torch.tensor(2.0**-k)) - x).pow(2).mean()), k) for k in range(20)]
            self.threshold = torch.tensor(2.0 ** -min(errs)[1])
        else:
            n = self.levels - 1
            self.neg_step = (-x.min()).clamp_min(_EPS) / n
            top = x.max().clamp_min(_EPS)
            errs = []
            for c in torch.linspace(1.0, 0.3, 15).tolist():
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
                "range": [-float(self.neg_step) * (self.levels - 1), float(self.pos_step) * (self.levels - 1)]}
        return {"kind": self.kind, "bits": self.bits, "granularity": "tensor", "symmetric": False,
                "mode": self.mode, "range": rng}
