"""Quantized attention: fake-quantize the inputs of the two attention matmuls (q, k, softmax probs, v).

Three routes, none of which copies a model:

* Hugging Face models whose attention modules dispatch through ``transformers.AttentionInterface``
  (BERT, DINOv2, ViT, SigLIP, CLIP, Qwen2, Llama, ...): :func:`quant_attention_forward` is registered as
  the attention implementation ``"s2d_quant"`` (with the eager mask builder) and selected with
  ``model.set_attn_implementation("s2d_quant")``. It reads ``module.s2d_attn_quant``.
* MPNet (transformers 5.x still computes its attention inline, with a relative position bias, and does
  not go through the interface): its ``MPNetSelfAttention`` modules get a minimal subclass whose forward
  projects q/k/v with the module's own Linears and calls :func:`quant_attention_forward` with the
  position bias folded into the additive mask.
* timm ``Attention`` modules (duck-typed: ``qkv``, ``proj``, ``num_heads``, ``scale``): same treatment.
  timm cannot be imported in this project's test environment, so this route is untested here.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from s2d.quant.quantizers import Quantizer

logger = logging.getLogger(__name__)

ATTN_IMPL = "s2d_quant"


class AttentionQuantizers(nn.Module):
    """The four attention matmul-input quantizers; attached to an attention module as ``.s2d_attn_quant``.

    Shapes seen: q (B, H, Tq, D), k and v (B, Hkv, Tk, D) (before GQA head repetition), probs (B, H, Tq, Tk).
    ``scores_out`` and ``context_out`` are identity hook points on the two matmul outputs, the scores
    (B, H, Tq, Tk) before the mask and the context probs @ v (B, H, Tq, D); ``scaling`` is the softmax
    scaling of the last forward pass (PTQ4ViT's search scores the matmul outputs).
    """

    def __init__(self, q: Quantizer, k: Quantizer, probs: Quantizer, v: Quantizer) -> None:
        super().__init__()
        self.q, self.k, self.probs, self.v = q, k, probs, v
        self.scores_out, self.context_out = nn.Identity(), nn.Identity()
        self.scaling: float | None = None


def _apply_mask(scores: Tensor, mask: Tensor | None, key_len: int, inplace: bool = False) -> Tensor:
    """Add an additive float mask or apply a boolean keep-mask (True = attend) to (B, H, Tq, Tk) scores.

    ``inplace``: modify ``scores`` (a fresh temporary owned by the caller) when the mask broadcasts into it.
    """
    if mask is None:
        return scores
    mask = mask[..., :key_len]
    inplace = inplace and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape
    if mask.dtype == torch.bool:
        fill = torch.finfo(scores.dtype).min
        return scores.masked_fill_(~mask, fill) if inplace else scores.masked_fill(~mask, fill)
    mask = mask.to(scores.dtype)
    return scores.add_(mask) if inplace else scores + mask


def quant_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Eager attention with fake-quantized matmul inputs (the ``AttentionInterface`` signature).

    query (B, H, Tq, D); key, value (B, Hkv, Tk, D) with H a multiple of Hkv (GQA: k/v heads are repeated
    after quantization); attention_mask: additive float or boolean keep-mask broadcastable to
    (B, H, Tq, Tk), or None (then a causal mask is applied when ``kwargs["is_causal"]`` or
    ``module.is_causal`` is true and Tq > 1). Returns attn_output (B, Tq, H, D) and the softmax
    probabilities (B, H, Tq, Tk) before quantization.

    Plain static per-tensor quantizers (no hooks, no grad needed) take a faster route with the same
    numbers up to float rounding: q is scaled by its step and the softmax scaling in one pass, and
    probs @ v runs on the integer codes with both steps applied to the output.
    """
    aq = getattr(module, "s2d_attn_quant", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # the (quantized) queries are scaled instead of the scores: 1/Tk-th of the work, equal up to rounding
    if aq is None:
        query = query * scaling
    else:
        aq.scaling = scaling
        qc = _codes(aq.q, query)
        query = qc[0].mul_(qc[1] * scaling) if qc is not None else aq.q(query) * scaling
        key = aq.k(key)
    n_rep = query.shape[1] // key.shape[1]
    scores = torch.matmul(query, _repeat_kv(key, n_rep).transpose(-1, -2))
    if aq is not None:
        scores = aq.scores_out(scores)
    t_q, t_k = scores.shape[-2:]
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", False)
        if is_causal and t_q > 1:
            attention_mask = torch.ones(t_q, t_k, dtype=torch.bool, device=scores.device).tril(t_k - t_q)
    scores = _apply_mask(scores, attention_mask, t_k, inplace=True)  # scores is our own temporary
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out_scale = None
    if aq is None:
        probs_q = probs
    else:
        pc = _codes(aq.probs, probs)
        vc = _codes(aq.v, value) if pc is not None else None
        if vc is not None:  # integer-code matmul, both scales applied once to the (smaller) output
            (probs_q, s_p), (value, s_v) = pc, vc
            out_scale = s_p * s_v
        else:
            probs_q = pc[0].mul_(pc[1]) if pc is not None else aq.probs(probs)
            value = aq.v(value)
    probs_q = F.dropout(probs_q, p=dropout, training=module.training)
    out = torch.matmul(probs_q, _repeat_kv(value, n_rep))
    if out_scale is not None:
        out = out.mul_(out_scale)
    if aq is not None:
        out = aq.context_out(out)
    return out.transpose(1, 2).contiguous(), probs


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hkv·n_rep, T, D), each head repeated n_rep times in place (GQA)."""
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def _codes(q: Quantizer, x: Tensor) -> tuple[Tensor, float] | None:
    fast = getattr(q, "fast_codes", None)
    return fast(x) if fast is not None else None


def register_hf_attention() -> None:
    """Register ``"s2d_quant"`` in transformers' attention-function and attention-mask registries (idempotent)."""
    AttentionInterface.register(ATTN_IMPL, quant_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, eager_mask)  # masks always materialised, additive float


_USES_INTERFACE: dict[type, bool] = {}


def uses_attention_interface(module: nn.Module) -> bool:
    """True if the module's forward dispatches through transformers' ``ALL_ATTENTION_FUNCTIONS``."""
    cls = type(module)
    if cls not in _USES_INTERFACE:
        try:
            src = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            src = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in src and hasattr(module, "config")
    return _USES_INTERFACE[cls]


def _is_mpnet_self_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "MPNetSelfAttention" and all(hasattr(module, a) for a in ("q", "k", "v", "o"))


def _is_timm_attention(module: nn.Module) -> bool:
    return (isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "proj", None), nn.Linear)
            and hasattr(module, "num_heads") and hasattr(module, "scale") and not hasattr(module, "config"))


def _mpnet_forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    """MPNetSelfAttention forward with quantized matmul inputs (same projections, bias and output layout)."""
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q = self.q(hidden_states).view(shape).transpose(1, 2)
    k = self.k(hidden_states).view(shape).transpose(1, 2)
    v = self.v(hidden_states).view(shape).transpose(1, 2)
    mask = attention_mask
    if position_bias is not None:
        mask = position_bias if mask is None else _apply_mask(position_bias, mask, k.shape[-2])
    out, probs = quant_attention_forward(self, q, k, v, mask, self.attention_head_size ** -0.5,
                                         self.dropout.p, is_causal=False)
    o = self.o(out.reshape(*hidden_states.shape[:-1], self.all_head_size))
    return (o, probs) if output_attentions else (o,)


def _timm_forward(self, x: Tensor, attn_mask: Tensor | None = None, **kwargs) -> Tensor:
    """timm ViT Attention forward with quantized matmul inputs (untested here: timm is not importable)."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    q = q_norm(q) if q_norm is not None else q
    k = k_norm(k) if k_norm is not None else k
    drop = getattr(self, "attn_drop", None)
    out, _ = quant_attention_forward(self, q, k, v, attn_mask, self.scale, getattr(drop, "p", 0.0), is_causal=False)
    x = out.reshape(b, n, -1)
    norm = getattr(self, "norm", None)
    x = norm(x) if isinstance(norm, nn.Module) else x
    x = self.proj(x)
    proj_drop = getattr(self, "proj_drop", None)
    return proj_drop(x) if proj_drop is not None else x


_WRAPPED: dict[tuple[type, str], type] = {}


def _swap_forward(module: nn.Module, forward: Callable, tag: str) -> None:
    """Swap the module's class for a cached subclass with ``forward`` (state, hooks and names unchanged)."""
    cls = type(module)
    if getattr(cls, "_s2d_wrapped", False):
        return
    key = (cls, tag)
    if key not in _WRAPPED:
        _WRAPPED[key] = type(f"S2DQuant{cls.__name__}", (cls,), {"forward": forward, "_s2d_wrapped": True})
    module.__class__ = _WRAPPED[key]


def attention_modules(model: nn.Module) -> dict[str, str]:
    """Attention modules of ``model``: name -> route ("hf" | "mpnet" | "timm")."""
    found = {}
    for name, m in model.named_modules():
        if _is_mpnet_self_attention(m):
            found[name] = "mpnet"
        elif uses_attention_interface(m):
            found[name] = "hf"
        elif _is_timm_attention(m):
            found[name] = "timm"
    return found


def install_attention(model: nn.Module, routes: dict[str, str]) -> None:
    """Route the given attention modules through :func:`quant_attention_forward`."""
    modules = dict(model.named_modules())
    if "hf" in routes.values():
        register_hf_attention()
        hf = [n for n, m in modules.items() if isinstance(m, PreTrainedModel)]
        roots = [n for n in hf if not any(p != n and (p == "" or n.startswith(p + ".")) for p in hf)]
        for root in roots:
            modules[root].set_attn_implementation(ATTN_IMPL)
    for name, route in routes.items():
        if route == "mpnet":
            _swap_forward(modules[name], _mpnet_forward, "mpnet")
        elif route == "timm":
            _swap_forward(modules[name], _timm_forward, "timm")
    logger.info("quantized attention installed on %d modules", len(routes))

