"""Lowering an s2d fake-quantized model to the ops ONNX writes as QuantizeLinear / DequantizeLinear.

:func:`lower_for_export` rewrites a (copied) model, after any PTQ method calibrated it, so that every
8-bit site ONNX can express exactly becomes ``torch.fake_quantize_per_{tensor,channel}_affine``, which
``torch.onnx.export`` writes as a QuantizeLinear -> DequantizeLinear pair with s2d's own scale and zero
point. ONNX Runtime then fuses QDQ around a MatMul into an integer kernel (MatMulIntegerToFloat on CPU).

- A :class:`~s2d.quant.linear.QuantLinear` becomes a :class:`QDQLinear`: its weight is stored on s2d's
  grid and re-expressed as 8-bit codes per output row (exactly: the grid value k·s is the uint8 code
  k + 128 with zero point 128, after a per-row shift that keeps the 256 codes inside [-128, 127]);
  ERQ's two-part weight becomes two matmuls on the two column sets, each with its own per-row grid.
- Every code is uint8, weights and activations alike, because ONNX Runtime's u8 × s8 kernels on x86
  CPUs with AVX2 but no VNNI add pairs of products in saturating int16 (``vpmaddubsw``: 2·255·127 >
  32767) and so do not compute what s2d computed; its u8 × u8 kernels accumulate exactly in int32 on
  every CPU. The dequantized values, and so the products, are the same as with int8 codes.
- A static 8-bit uniform activation quantizer whose zero point fits the 8-bit codes becomes an
  :class:`ActivationQDQ`.
- Everything else (log-√2, twin-uniform, dynamic per-token quantizers, zero points outside the codes,
  widths below 8) keeps s2d's float fake quantization, which ONNX traces as float ops: the exported
  model still computes what s2d computed, and the :class:`Site` list says which sites run integer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from s2d.quant.linear import QuantLinear
from s2d.quant.prepare import quantizer_roles
from s2d.quant.quantizers import UniformQuantizer
from s2d.quant.reparam import ChannelAffineInput
from s2d.quant.twopart import TwoPartQuantizer

__all__ = ["QDQ_BITS", "Site", "ActivationQDQ", "WeightQDQ", "QDQLinear", "lower_for_export", "activation_qdq",
           "weight_parts"]

QDQ_BITS = 8                 # the only code width ONNX's QuantizeLinear / DequantizeLinear carry
_U8 = (0, 255)  # (qmin, qmax) of the uint8 codes every QDQ site is written with (see the module doc)
_U8_ZERO = 128  # the uint8 code of a signed code 0: a signed code c is stored as c + 128


@dataclass
class Site:
    """One quantization site of the exported model and how it runs."""

    name: str      # module name in the model
    kind: str      # "linear" (a quantized matmul) or "activation" (a quantizer outside Linears)
    integer: bool  # written as QDQ that ONNX Runtime can run on integer kernels
    why: str       # what it became, or why it stays float


class ActivationQDQ(nn.Module):
    """Static affine quantize-dequantize of an activation, ``(clamp(round(x/s) + z, qmin, qmax) − z)·s``.

    Per tensor (``axis`` None; scale and zero point Python numbers) or per channel along ``axis``
    (scale (C,) float32, zero point (C,) int32). Exported as QuantizeLinear -> DequantizeLinear.
    """

    def __init__(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None) -> None:
        super().__init__()
        self.qmin, self.qmax, self.axis = qmin, qmax, axis
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().round().to(torch.int32).reshape(-1).clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin,
                                                         self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis % x.ndim,
                                                      self.qmin, self.qmax)


class WeightQDQ(nn.Module):
    """A weight on an 8-bit grid per output row, exported as 8-bit codes with a per-row scale.

    ``grid`` (out, in) float32 holds values k·s_r with integer k (s2d's quantized weight). A row whose
    codes span [-128, 127] or less but lie elsewhere (ERQ's ranges need not contain 0) is stored shifted,
    (k − m_r)·s_r, with ``offset`` m_r·s_r (out,) added back by the consumer as Σ_c x_c · offset_r: the
    same product, and the codes stay in [-128, 127], written as uint8 k + 128 with zero point 128.
    Forward returns the shifted grid through ``fake_quantize_per_channel_affine`` (exact on grid values),
    which exports as QuantizeLinear on a constant (ONNX Runtime folds it into a uint8 initializer) ->
    DequantizeLinear (axis 0).
    """

    def __init__(self, grid: Tensor, scale: Tensor) -> None:
        super().__init__()
        scale = scale.detach().float().reshape(-1)
        k = torch.round(grid.detach().float() / scale[:, None])
        lo, hi = k.amin(1), k.amax(1)
        if bool((hi - lo > 255).any()):
            raise ValueError("a row spans more than 256 codes: not an 8-bit grid")
        shift = torch.where((lo < -128) | (hi > 127), lo + 128, torch.zeros_like(lo))
        self.register_buffer("grid", ((k - shift[:, None]) * scale[:, None]).contiguous())
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", torch.full_like(scale, _U8_ZERO, dtype=torch.int32))
        self.register_buffer("offset", (shift * scale) if bool(shift.any()) else None)

    def forward(self) -> Tensor:
        return torch.fake_quantize_per_channel_affine(self.grid, self.scale, self.zero_point, 0, *_U8)


class QDQLinear(nn.Module):
    """The export form of a QuantLinear: ``input_quantizer(x)`` times a weight in one or two parts, plus bias.

    ``parts`` are (column index (k,) or None for all columns, :class:`WeightQDQ` or a float weight
    buffer). With two parts the input columns are gathered before quantizing where the quantizer is
    elementwise (:meth:`_part_input`). x: (..., in) -> (..., out).
    """

    def __init__(self, input_quantizer: nn.Module, parts: list[tuple[Tensor | None, nn.Module]],
                 bias: Tensor | None) -> None:
        super().__init__()
        self.input_quantizer = input_quantizer
        self.weights = nn.ModuleList(w for _, w in parts)
        for i, (cols, _) in enumerate(parts):
            self.register_buffer(f"columns{i}", cols)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        whole = None if len(self.weights) > 1 else self.input_quantizer(x)
        out = None
        for i, w in enumerate(self.weights):
            xq = whole if whole is not None else self._part_input(x, getattr(self, f"columns{i}"))
            y = F.linear(xq, w())
            if getattr(w, "offset", None) is not None:
                y = y + xq.sum(-1, keepdim=True) * w.offset
            out = y if out is None else out + y
        return out if self.bias is None else out + self.bias

    def _part_input(self, x: Tensor, cols: Tensor) -> Tensor:
        """The quantized input at ``cols``. Elementwise quantizers (per tensor, or RepQ's per-channel
        affine then per tensor) see the gathered columns, so the part is a plain Q -> DQ -> MatMul."""
        iq = self.input_quantizer
        if _per_tensor_qdq(iq):
            return iq(x.index_select(-1, cols))
        if isinstance(iq, ChannelAffineInput) and _per_tensor_qdq(iq.quantizer):
            xs = x.index_select(-1, cols)
            return iq.quantizer(xs * iq.inv_r[cols].to(x.dtype) + iq.shift[cols].to(x.dtype))
        return iq(x).index_select(-1, cols)


def _per_tensor_qdq(q: nn.Module) -> bool:
    return isinstance(q, ActivationQDQ) and q.axis is None


class _FloatWeight(nn.Module):
    """A weight that stays float (s2d's fake-quantized values as a constant)."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w.detach().float().clone())

    def forward(self) -> Tensor:
        return self.w


def activation_qdq(q: nn.Module) -> tuple[nn.Module | None, str]:
    """(the QDQ replacement of activation quantizer ``q``, or None to keep it; what it is / why not)."""
    if not isinstance(q, UniformQuantizer):
        return None, f"{type(q).__name__}: no integer QDQ form, float fake quantization"
    if not q.enabled:
        return None, "float (quantizer disabled)"
    if q.bits != QDQ_BITS:
        return None, f"{q.bits}-bit: no CPU integer kernel below 8 bits (fake only)"
    if q.dynamic or q.learnable or q.granularity == "token" or not q.calibrated:
        return None, "dynamic or learnable range: float fake quantization"
    qmin, qmax = _U8
    z = q.zero_point.detach().reshape(-1) + (_U8_ZERO if q.symmetric else 0)  # signed codes c -> c + 128
    if bool(((z < qmin) | (z > qmax)).any()):
        return None, "zero point outside the 8-bit codes (range excludes 0): float fake quantization"
    axis = None if q.granularity == "tensor" else q.axis
    note = "per-tensor QDQ" if axis is None else "per-channel QDQ (no fused integer matmul)"
    return ActivationQDQ(q.scale, z, qmin, qmax, axis), note


def weight_parts(lin: QuantLinear) -> tuple[list[tuple[Tensor | None, nn.Module]], bool, str]:
    """(parts for :class:`QDQLinear`, whether the weight is on an 8-bit integer grid, description)."""
    wq, grid = lin.weight_quantizer, lin.quantized_weight().detach().float()
    try:
        if isinstance(wq, UniformQuantizer) and wq.enabled and wq.bits == QDQ_BITS and not wq.dynamic:
            scale = wq.scale.detach().float().reshape(-1)
            scale = scale.expand(grid.shape[0]) if scale.numel() == 1 else scale
            return [(None, WeightQDQ(grid, scale))], True, "8-bit weight per row"
        if isinstance(wq, TwoPartQuantizer) and wq.enabled and wq.bits == QDQ_BITS:
            mask = wq.column_mask(grid.shape[1])
            parts = [(cols, WeightQDQ(grid[:, cols], wq.scale[:, j]))
                     for cols, j in ((torch.nonzero(~mask).reshape(-1), 0), (torch.nonzero(mask).reshape(-1), 1))
                     if cols.numel()]
            return parts, True, f"two-part 8-bit weight ({int(mask.sum())} outlier columns: two matmuls)"
    except ValueError as err:
        return [(None, _FloatWeight(grid))], False, f"float weight on s2d's grid: {err}"
    why = "float weight (quantizer disabled)" if not getattr(wq, "enabled", True) else \
        f"{type(wq).__name__} at {getattr(wq, 'bits', '?')} bits: float weight on s2d's grid"
    return [(None, _FloatWeight(grid))], False, why


def lower_for_export(model: nn.Module) -> list[Site]:
    """Rewrite ``model`` in place (pass a copy) into its QDQ export form; returns every site and how it runs.

    A Linear counts as integer when its weight is on an 8-bit grid and its input quantizer became a
    per-tensor :class:`ActivationQDQ` (directly, or inside RepQ's per-channel affine wrapper). Other
    weight quantizers (a patch embedding's) keep s2d's fake-quantized float weight.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        parts = {n: weight_parts(lin) for n, lin in linears.items()}
    sites: list[Site] = []
    for name, role in quantizer_roles(model).items():
        if role == "weight":
            if _owner(name) not in linears:
                sites.append(Site(_owner(name), "weight", False, "float weight on s2d's grid (no integer conv)"))
            continue
        repl, why = activation_qdq(model.get_submodule(name))
        if repl is not None:
            model.set_submodule(name, repl)
        if not any(name.startswith(f"{ln}.") for ln in linears):
            sites.append(Site(name, "activation", repl is not None, why))
    for name, lin in linears.items():
        (wparts, int_weight, wdesc), iq = parts[name], lin.input_quantizer
        inner = getattr(iq, "quantizer", iq)  # RepQ's ChannelAffineInput wraps a per-tensor quantizer
        int_input = isinstance(inner, ActivationQDQ) and inner.axis is None
        model.set_submodule(name, QDQLinear(iq, wparts, lin.bias))
        why = wdesc if int_input else f"{wdesc}; input: {_input_note(inner)}"
        sites.append(Site(name, "linear", int_weight and int_input, why))
    return sites


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _input_note(q: nn.Module) -> str:
    if isinstance(q, ActivationQDQ):
        return "per-channel QDQ (no fused integer matmul)"
    return activation_qdq(q)[1]
