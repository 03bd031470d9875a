"""Whole-model fake quantization: QuantSpec, QuantLinear, calibration and the PTQ method registry.

``quantize_model(model, spec, method, calib)`` works in place (torchao style)::

    model = quantize_model(model, QuantSpec(w_bits=4, a_bits=4), method="rtn", calib=batches)

Quantized: the input and weight of every ``nn.Linear`` (the classifier head too unless
``spec.quantize_head=False``) and the attention matmul inputs q, k, softmax probabilities and v.
Not quantized: embeddings, convolutions (patch embedding), residual adds, LayerNorm, softmax / GELU.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2d.quant.attention import AttentionQuantizers, attention_modules, install_attention
from s2d.quant.quantizers import GRANULARITIES, RANGE_METHODS, Quantizer, UniformQuantizer, set_calibration_mask

logger = logging.getLogger(__name__)

HEAD_NAMES = ("classifier", "score", "lm_head", "head")
METHODS: dict[str, Callable[..., None]] = {}
_METHOD_MODULES = ("rtn", "ptq4vit", "repq", "erq")


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how.

    w_*: weights of every Linear (granularity "tensor" | "channel" = per output channel).
    a_*: Linear inputs and attention matmul inputs (granularity "tensor" | "channel" (per feature for
    Linear inputs, per head for q/k/v) | "token" (dynamic per token)); a_range: "minmax" | "percentile" |
    "mse" over the calibration batches. w_range likewise for weights. 16 bits is numerically ~lossless.
    skip: fnmatch patterns of module names left in float (Linears and attention modules).
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = True
    w_granularity: str = "channel"
    a_symmetric: bool = False
    a_granularity: str = "tensor"
    a_range: str = "minmax"
    quantize_attention: bool = True
    quantize_head: bool = True
    skip: tuple[str, ...] = ()
    w_range: str = "minmax"
    percentile: float = 0.9999

    def __post_init__(self) -> None:
        for f in ("w_bits", "a_bits"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 16:
                raise ValueError(f"QuantSpec.{f} must be an int in [2, 16], got {v!r}")
        if self.w_granularity not in ("tensor", "channel"):
            raise ValueError(f"QuantSpec.w_granularity must be one of ('tensor', 'channel'), got {self.w_granularity!r}")
        if self.a_granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.a_granularity must be one of {GRANULARITIES}, got {self.a_granularity!r}")
        for f in ("a_range", "w_range"):
            if getattr(self, f) not in RANGE_METHODS:
                raise ValueError(f"QuantSpec.{f} must be one of {RANGE_METHODS}, got {getattr(self, f)!r}")
        if not 0.5 < self.percentile <= 1.0:
            raise ValueError(f"QuantSpec.percentile must be in (0.5, 1], got {self.percentile!r}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"QuantSpec.skip must be a tuple of module-name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def name(self) -> str:
        """Short label, e.g. "W4A4"."""
        return f"W{self.w_bits}A{self.a_bits}"

    def weight_quantizer(self) -> UniformQuantizer:
        """Weight quantizer: per output channel (axis 0) or per tensor, calibrated once from the weight
        (:func:`calibrate_weights`); pass ``dynamic=True`` to a UniformQuantizer to follow a training weight."""
        return UniformQuantizer(self.w_bits, self.w_symmetric, self.w_granularity, axis=0, range_method=self.w_range,
                                percentile=self.percentile)

    def act_quantizer(self, channel_axis: int = -1) -> UniformQuantizer:
        """Activation quantizer; ``channel_axis`` is used when ``a_granularity == "channel"``."""
        return UniformQuantizer(self.a_bits, self.a_symmetric, self.a_granularity, axis=channel_axis,
                                range_method=self.a_range, percentile=self.percentile)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake quantizers. Same parameters, same name.

    Made from an existing Linear by :meth:`from_linear`, which swaps the instance's class in place, so
    parameter objects, optimizer state, hooks (e.g. SelectiveSpectralDecay's) and module names are kept.
    """

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 input_quantizer: Quantizer | None = None, weight_quantizer: Quantizer | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.input_quantizer = input_quantizer if input_quantizer is not None else QuantSpec().act_quantizer()
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else QuantSpec().weight_quantizer()

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_quantizer: Quantizer, weight_quantizer: Quantizer) -> "QuantLinear":
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
        key = (w._version, w.data_ptr(), w.dtype, _state_key(wq))
        cache = self.__dict__.get("_wq_cache")
        if cache is not None and cache[0] is w and cache[1] is wq and _same_key(cache[2], key):
            return cache[3]
        out = wq(w)
        self.__dict__["_wq_cache"] = (w, wq, key, out)  # plain attribute: not a buffer, not in state_dict
        return out


def _state_key(m: nn.Module) -> tuple:
    """Fingerprint of a weight quantizer's state (see :meth:`Quantizer.state_key`; recursive for others)."""
    if isinstance(m, Quantizer):
        return m.state_key()
    tensors = tuple(m.parameters()) + tuple(m.buffers())
    return (m.training, tensors, tuple((t._version, t.data_ptr()) for t in tensors),
            tuple(getattr(s, "_state_version", 0) for s in m.modules()))


def _same_key(a: tuple, b: tuple) -> bool:
    """Equality for cache keys holding tensors (compared by identity) and plain values (by ==)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not _same_key(x, y):
                return False
        elif isinstance(x, Tensor) or isinstance(y, Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def head_names(model: nn.Module) -> set[str]:
    """Names of classifier-head Linears: the output embedding and Linears named classifier/score/lm_head/head."""
    heads = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        parts = name.split(".")
        if m is out_emb or parts[-1] in HEAD_NAMES or (len(parts) > 1 and parts[-2] in ("classifier", "score")):
            heads.add(name)
    return heads


def prepare_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Insert (uncalibrated) fake quantizers in place: Linears -> QuantLinear, attention -> AttentionQuantizers.

    HF attention modules are routed through the registered ``"s2d_quant"`` attention function; MPNet and
    timm attention modules get a quantizing forward (see ``s2d.quant.attention``). Returns ``model``.
    """
    heads = set() if spec.quantize_head else head_names(model)
    n_lin = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) or type(m) is not nn.Linear or name in heads or _matches(name, spec.skip):
            continue
        QuantLinear.from_linear(m, spec.act_quantizer(-1), spec.weight_quantizer())
        n_lin += 1
    routes = {}
    if spec.quantize_attention:
        routes = {n: r for n, r in attention_modules(model).items() if not _matches(n, spec.skip)}
        modules = dict(model.named_modules())
        for name in routes:
            modules[name].s2d_attn_quant = AttentionQuantizers(
                q=spec.act_quantizer(1), k=spec.act_quantizer(1),
                probs=UniformQuantizer(spec.a_bits, False, "tensor", range_method=spec.a_range,
                                       percentile=spec.percentile),
                v=spec.act_quantizer(1))
        install_attention(model, routes)
    logger.info("prepared %s: %d QuantLinear, %d attention modules", spec.name, n_lin, len(routes))
    return model


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every Quantizer module in ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def _weight_quantizer_names(model: nn.Module) -> set[str]:
    return {f"{n}.weight_quantizer" if n else "weight_quantizer" for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items() if k != "labels"}


def run_batches(model: nn.Module, batches: Iterable[dict], progress: bool = True, desc: str = "calibrate",
                token_mask: bool = False) -> int:
    """Run ``model(**batch)`` (labels dropped) in eval mode without grad; returns the number of batches.

    ``token_mask``: publish each batch's 2-D ``attention_mask`` via :func:`set_calibration_mask` so that
    calibrating quantizers with ``token_dims`` ignore padding positions.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask")
                if token_mask and isinstance(mask, Tensor) and mask.dim() == 2:
                    set_calibration_mask(mask)
                model(**batch)
                set_calibration_mask(None)
                n += 1
    finally:
        set_calibration_mask(None)
        model.train(was_training)
    return n


def calibrate_weights(model: nn.Module) -> None:
    """Finalize every weight quantizer from its Linear's current weight (dynamic ones record it for describe)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, Quantizer):
            wq = m.weight_quantizer
            wq.reset()
            with torch.no_grad():
                wq.observe(m.weight.detach())
            wq.finalize()


def calibrate(model: nn.Module, calib: Iterable[dict], progress: bool = True,
              only: Iterable[str] | None = None) -> None:
    """Calibrate all quantizers: weights from the weights, activations by observe -> finalize over ``calib``.

    ``calib``: iterable of model-input dicts (a "labels" key is dropped). ``only``: restrict the activation
    pass to these quantizer names (e.g. one block at a time). Quantizers that never saw data are left
    uncalibrated with a warning (they raise if used).
    """
    calibrate_weights(model)
    wnames = _weight_quantizer_names(model)
    qs = {n: q for n, q in quantizers(model).items() if n not in wnames and q.enabled}
    if only is not None:
        only = set(only)
        qs = {n: q for n, q in qs.items() if n in only}
    for name, q in qs.items():
        q.reset()
        q.calibrating = True
        q.token_dims = _token_dims(name)
    try:
        n = run_batches(model, calib, progress, token_mask=True)
    finally:
        for q in qs.values():
            q.calibrating = False
    if n == 0:
        raise ValueError("calibrate: calib yielded no batches")
    for name, q in qs.items():
        if q.num_observed:
            q.finalize()
        else:
            logger.warning("quantizer %s saw no data during calibration", name)


def _token_dims(name: str) -> tuple[int, int] | None:
    """(batch, token) dims of a quantizer's input by role: Linear inputs (B, T, C), attention (B, H, T, ·)."""
    role = _role(name)
    if role == "input":
        return (0, 1)
    return (0, 2) if role.startswith("attn_") else None


def register_method(name: str) -> Callable:
    """Decorator registering a PTQ method ``fn(model, spec, calib, config, progress) -> None``.

    The method receives a model already passed through :func:`prepare_model` and must leave every
    quantizer it uses calibrated.
    """
    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn
    return deco


def available_methods() -> list[str]:
    """Names of registered PTQ methods (importing the method modules that exist)."""
    import importlib

    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(f"s2d.quant.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"s2d.quant.{mod}":
                raise
    return sorted(METHODS)


def quantize_model(model: nn.Module, spec: QuantSpec, method: str = "rtn", calib: Iterable[dict] | None = None,
                   config: Any = None, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with PTQ ``method`` and return it in eval mode (keep a deepcopy for float)."""
    methods = available_methods()
    if method not in METHODS:
        raise ValueError(f"quantize_model.method must be one of {methods}, got {method!r}")
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = list(calib)  # methods may make several passes
    prepare_model(model, spec)
    METHODS[method](model, spec, calib, config, progress)
    return model.eval()


def _role(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    if last in ("input_quantizer", "weight_quantizer"):
        return last.removesuffix("_quantizer")
    return f"attn_{last}" if ".s2d_attn_quant." in f".{name}" else "other"


def list_quantizers(model: nn.Module) -> list[dict]:
    """One row per quantizer: name, module (its owner), role (input|weight|attn_q|attn_k|attn_probs|attn_v),
    kind, bits, granularity, symmetric, enabled and calibrated range (None when not calibrated)."""
    rows = []
    for name, q in quantizers(model).items():
        d = q.describe()
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        owner = owner.removesuffix(".s2d_attn_quant").removesuffix("s2d_attn_quant")
        rows.append({"name": name, "module": owner, "role": _role(name), "enabled": q.enabled,
                     "calibrated": q.calibrated, **d})
    return rows


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn every quantizer on or off (off = the float model, through the same code path)."""
    for q in quantizers(model).values():
        q.enabled = enabled
