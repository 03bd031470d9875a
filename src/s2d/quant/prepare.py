"""Insert fake quantizers into a model and find them again: prepare_model, named_quantizers,
quantizer_roles, list_quantizers, set_quantization.

Quantized by :func:`prepare_model`: the input and weight of every ``nn.Linear`` (the classifier head
too unless ``config.quantize_head=False``), the attention matmul inputs q, k, softmax probabilities
and v, and the weight of a vision model's patch-embedding convolution (``quantize_patch_embed``; its
input stays float unless a method quantizes it). Not quantized: token / position embeddings, other
convolutions, residual adds, LayerNorm, softmax / GELU.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

from torch import nn

from s2d.models import head_names
from s2d.quant.attention import AttentionQuantizers, attention_modules, install_attention
from s2d.quant.config import QuantConfig
from s2d.quant.conv import QuantPatchConv, is_patch_conv
from s2d.quant.linear import QuantLinear
from s2d.quant.quantizers import Quantizer, UniformQuantizer

__all__ = ["ROLES", "TOKEN_DIMS", "prepare_model", "named_quantizers", "quantizer_roles", "list_quantizers",
           "set_quantization"]

logger = logging.getLogger(__name__)

# role of a quantizer by where it sits: QuantLinear / QuantPatchConv input / weight, AttentionQuantizers
# part, else "other"
_LINEAR_ROLES = (("input_quantizer", "input"), ("weight_quantizer", "weight"))
_ATTN_ROLES = (("q", "attn_q"), ("k", "attn_k"), ("probs", "attn_probs"), ("v", "attn_v"))
ROLES = tuple(r for _, r in _LINEAR_ROLES + _ATTN_ROLES) + ("other",)
# (batch, token) dims of a quantizer's input by role: Linear inputs (B, T, C), attention (B, H, T, ·)
TOKEN_DIMS: dict[str, tuple[int, int]] = {"input": (0, 1), "attn_q": (0, 2), "attn_k": (0, 2),
                                          "attn_probs": (0, 2), "attn_v": (0, 2)}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prepare_model(model: nn.Module, spec: QuantConfig) -> nn.Module:
    """Insert (uncalibrated) fake quantizers in place: Linears -> QuantLinear, attention -> AttentionQuantizers,
    patch-embedding convolutions -> QuantPatchConv (weight only).

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
    n_conv = 0
    if spec.quantize_patch_embed:
        for name, m in list(model.named_modules()):
            if is_patch_conv(m) and not _matches(name, spec.skip):
                QuantPatchConv.from_conv(m, spec.weight_quantizer())
                n_conv += 1
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
    logger.info("prepared %s: %d QuantLinear, %d attention modules, %d patch convolutions", spec.name, n_lin,
                len(routes), n_conv)
    return model


def named_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every Quantizer module in ``model`` by name (``named_modules`` order)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}


def quantizer_roles(model: nn.Module) -> dict[str, str]:
    """Every quantizer's name -> role, from where it is attached: a QuantLinear's (or QuantPatchConv's)
    ``input_quantizer`` / ``weight_quantizer`` -> "input" / "weight"; an AttentionQuantizers' q / k / probs / v -> "attn_q" /
    "attn_k" / "attn_probs" / "attn_v"; any other Quantizer (e.g. one wrapped inside RepQ's
    ``ChannelAffineInput``) -> "other". Same keys and order as :func:`named_quantizers`."""
    role_of: dict[int, str] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantPatchConv)):
            attrs = _LINEAR_ROLES
        elif isinstance(m, AttentionQuantizers):
            attrs = _ATTN_ROLES
        else:
            continue
        for attr, role in attrs:
            q = getattr(m, attr, None)
            if isinstance(q, Quantizer):
                role_of.setdefault(id(q), role)
    return {n: role_of.get(id(q), "other") for n, q in named_quantizers(model).items()}


def _owner(name: str) -> str:
    """The module a quantizer belongs to: its parent, with the AttentionQuantizers level dropped."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    return owner.removesuffix(".s2d_attn_quant").removesuffix("s2d_attn_quant")


def list_quantizers(model: nn.Module) -> list[dict]:
    """One row per quantizer: name, module (its owner), role (input|weight|attn_q|attn_k|attn_probs|attn_v|
    other), enabled, calibrated, then its ``describe()``: kind, bits, granularity, symmetric, ... and the
    calibrated range (None when not calibrated)."""
    roles = quantizer_roles(model)
    return [{"name": name, "module": _owner(name), "role": roles[name], "enabled": q.enabled,
             "calibrated": q.calibrated, **q.describe()} for name, q in named_quantizers(model).items()]


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn every quantizer on or off (off = the float model, through the same code path)."""
    for q in named_quantizers(model).values():
        q.enabled = enabled
