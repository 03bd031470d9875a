"""PTQ4ViT post-training quantization (Yuan et al., ECCV 2022), in this project's own code.

Quantizers (all symmetric with the full signed codes [−2^(b−1), 2^(b−1)−1], as the official code):
- Linear inputs and weights: uniform, one scale per tensor; a fused qkv weight gets one scale per
  q / k / v block (rows split in thirds), separate q, k, v Linears one scale each;
- post-GELU activations (fc2 inputs): twin uniform, "gelu" mode (negatives with a fixed small step,
  positives with a searched step);
- attention matmul inputs q, k, v: uniform with one scale per head (``per_head``, else per tensor);
  post-softmax probabilities: twin uniform, "softmax" mode (searched power-of-two threshold).
- the patch embedding of a vision model: weight symmetric per output channel, input float (the
  official channel-wise conv with ``a_bit=32``).
Initial scales Δ = max|x| / (2^(b−1) − 0.5) (twin quantizers: their own MSE initialisation).

Hessian-guided scale search, the patch embedding's weight first (per channel, on its output), then block
by block in forward order, on ``num_samples`` calibration samples:
1. the float inputs of the block's Linears / attention quantizers are recorded (quantizers off);
2. a backward pass of KL(p_fp ‖ p_q) — p_q the predictions of the model quantized with the current
   scales — in sub-batches of ``sub_batch`` samples gives g = ∂KL/∂O at every Linear output O (and
   at both attention matmul outputs);
3. per Linear, ``rounds`` alternating rounds: weight scale(s) over the candidates
   Δ_w·(α + i(β−α)/n), i = 0..n, then the input scale over Δ_a·(α + i(β−α)/n), each minimising the
   Hessian-guided distance mean[(g ⊙ (O_fp − O_q))²], O_fp = X Wᵀ + b, O_q = Q_a(X) Q_w(W)ᵀ + b. The
   current scale is always a candidate, so the objective never gets worse than the initial one.
4. attention matmuls, scores = (Q(q)·scaling) Q(k)ᵀ and context = Q(probs) Q(v): ``rounds`` alternating
   rounds, A's parameter then B's (steps per head over the same candidates, the softmax threshold over
   2^0 … 2^−19), each minimising mean[(g_O ⊙ (O_fp − O_q))²] on the matmul output O with g_O = ∂KL/∂O,
   as the official code (``matmul_output=False``: each quantizer on its own output x,
   mean[(g_x ⊙ (x − Q(x)))²], s2d 0.1).
Tokens: padded tokens are dropped; at most ``max_tokens`` token rows per layer are used (CPU budget).
Unsupported (ValueError): models without recognised transformer blocks, a gated MLP (no post-GELU
activation) while ``twin_gelu`` is on, and outputs without ``.logits`` (the KL needs predictions).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from s2d.models import BlockInfo
from s2d.quant.api import register_method
from s2d.quant.attention import AttentionQuantizers
from s2d.quant.calibration import calibrate
from s2d.quant.config import QuantConfig
from s2d.quant.conv import QuantPatchConv, output_rows, patch_rows
from s2d.quant.linear import QuantLinear
from s2d.quant.nonuniform import TwinUniformQuantizer
from s2d.quant.prepare import set_quantization
from s2d.quant.ptq.common import (
    LinearGroup, TokenCapture, forward_batches, linear_groups, output_linears, quant_patch_convs, require_blocks,
    sub_batches, subsample, take_samples, token_rows,
)
from s2d.quant.ptq.ptq4vit_search import search_attn_quantizer, search_layer, search_matmul, set_sym
from s2d.quant.quantizers import Quantizer, UniformQuantizer
from s2d.utils import eval_mode, to_device

logger = logging.getLogger(__name__)

__all__ = ["PTQ4ViTConfig", "ptq4vit", "check_supported"]


@dataclass(frozen=True)
class PTQ4ViTConfig:
    """PTQ4ViT hyperparameters (paper defaults). Scale candidates: Δ·(α + i(β−α)/n), i = 0..n."""

    alpha: float = 0.01            # smallest candidate factor α, 0 < α < β
    beta: float = 1.2              # largest candidate factor β
    n_candidates: int = 100        # n: n + 1 candidates per search, >= 1
    rounds: int = 3                # alternating weight / activation search rounds, >= 1
    sub_batch: int = 4             # samples per backward pass of the KL, >= 1
    twin_softmax: bool = True      # twin-uniform post-softmax quantizer (False: plain uniform, an ablation)
    twin_gelu: bool = True         # twin-uniform post-GELU quantizer (False: plain uniform, an ablation)
    hessian: bool = True           # weight the output error by g = ∂KL/∂O (False: plain output MSE, an ablation)
    per_head: bool = True          # one scale per attention head for q, k, v (False: per tensor)
    matmul_output: bool = True     # score q, k, probs, v on their matmul's output, alternating A and B (official;
    #                                False: each on its own output, s2d 0.1)
    softmax_k_max: int = 19        # softmax threshold candidates 2^-k, k = 0..softmax_k_max, >= 0
    num_samples: int = 32          # calibration samples used (the first ones of calib), >= 1
    max_tokens: int | None = 2048  # token rows per layer in the search (random subset), None or >= 16
    seed: int = 0                  # seed of that subsampling

    def __post_init__(self) -> None:
        if not 0 < self.alpha < self.beta:
            raise ValueError(f"PTQ4ViTConfig.alpha/beta must satisfy 0 < alpha < beta, got {self.alpha}, {self.beta}")
        for f, lo in (("n_candidates", 1), ("rounds", 1), ("sub_batch", 1), ("num_samples", 1), ("softmax_k_max", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"PTQ4ViTConfig.{f} must be an int >= {lo}, got {v!r}")
        if self.max_tokens is not None and self.max_tokens < 16:
            raise ValueError(f"PTQ4ViTConfig.max_tokens must be None or >= 16, got {self.max_tokens!r}")

    def factors(self) -> list[float]:
        """The candidate factors α + i(β−α)/n, i = 0..n."""
        n = self.n_candidates
        return [self.alpha + i * (self.beta - self.alpha) / n for i in range(n + 1)]


def _weight_groups(lin: QuantLinear, group: LinearGroup) -> int:
    """Weight scales of a Linear: 3 (one per q / k / v row block) for a fused qkv Linear, else 1. Separate
    q, k, v Linears (Hugging Face) get one scale each, as the official code's fused qkv does per block."""
    fused = group.role == "qkv" and len(group.names) == 1
    return 3 if fused and lin.out_features % 3 == 0 else 1


def _install_quantizers(model: nn.Module, spec: QuantConfig, groups: list[LinearGroup], cfg: PTQ4ViTConfig) -> None:
    mods = dict(model.named_modules())
    for conv in quant_patch_convs(model).values():  # the official channel-wise conv, float input
        conv.weight_quantizer = UniformQuantizer(spec.w_bits, True, "channel", axis=0, narrow=False)
    fc2 = {n for g in groups if g.role == "fc2" for n in g.names}
    for g in groups:
        for n in g.names:
            lin = mods[n]
            if not isinstance(lin, QuantLinear):
                continue
            gran = "channel" if _weight_groups(lin, g) == 3 else "tensor"
            lin.weight_quantizer = UniformQuantizer(spec.w_bits, True, gran, axis=0, narrow=False)
            lin.input_quantizer = (TwinUniformQuantizer(spec.a_bits, "gelu") if n in fc2 and cfg.twin_gelu
                                   else UniformQuantizer(spec.a_bits, True, "tensor", narrow=False))
    for m in model.modules():
        aq = getattr(m, "s2d_attn_quant", None)
        if aq is not None:
            gran = "channel" if cfg.per_head else "tensor"
            for part in ("q", "k", "v"):
                setattr(aq, part, UniformQuantizer(spec.a_bits, True, gran, axis=1, narrow=False))
            aq.probs = (TwinUniformQuantizer(spec.a_bits, "softmax") if cfg.twin_softmax
                        else UniformQuantizer(spec.a_bits, False, "tensor"))


@torch.no_grad()
def _init_scales(model: nn.Module, groups: list[LinearGroup]) -> None:
    """Δ = max|x| / (2^(b−1) − 0.5) for symmetric uniform quantizers (after a min-max calibration)."""
    mods = dict(model.named_modules())
    for q in mods.values():
        if isinstance(q, UniformQuantizer) and q.symmetric and q.calibrated:
            top = torch.maximum(q.lo.abs(), q.hi.abs())
            set_sym(q, top / (q.qmax + 0.5))
    for g in groups:
        for n in g.names:
            lin = mods[n]
            if isinstance(lin, QuantLinear) and _weight_groups(lin, g) == 3:
                w = lin.weight.detach().reshape(3, -1)
                s = (w.abs().amax(1) / (lin.weight_quantizer.qmax + 0.5)).repeat_interleave(lin.out_features // 3)
                set_sym(lin.weight_quantizer, s)


# ----------------------------------------------------------------------------- search

@torch.no_grad()
def _search_linear(lin: QuantLinear, n_groups: int, x: Tensor, g: Tensor | None, cfg: PTQ4ViTConfig) -> dict:
    """Alternating weight / input scale search for one Linear on float inputs x (N, in), grads g (N, out).

    Weight steps: one per group of output rows (n_groups = 3 for a fused qkv). Returns the Hessian
    distance before (initial scales) and after the search.
    """
    b = None if lin.bias is None else lin.bias.detach().float()
    return search_layer(lin.weight.detach().float(), b, lin.weight_quantizer, lin.input_quantizer, n_groups, x, g,
                        cfg.factors(), cfg.rounds)


def _search_patch_conv(model: nn.Module, conv: QuantPatchConv, batches: list[dict], logits_fp: list[Tensor],
                       cfg: PTQ4ViTConfig, gen: torch.Generator) -> dict:
    """The patch embedding's weight: one step per output channel (the official channel-wise conv), searched
    on the image patches (its input is the image whatever else is quantized) with g = ∂KL/∂O at its
    output; the input stays float."""
    grads: list[Tensor] = []
    out: dict[str, Tensor] = {}

    def keep(mod: nn.Module, args: tuple, y: Tensor) -> Tensor:
        out["y"] = y if y.requires_grad else y.detach().requires_grad_(True)
        return out["y"]

    handle = conv.register_forward_hook(keep)
    inputs: list[Tensor] = []
    record = conv.register_forward_pre_hook(lambda mod, a: inputs.append(patch_rows(a[0].detach().float(), mod)))
    try:
        for i, (_, o) in enumerate(forward_batches(model, batches, grad=True)):
            (gr,) = torch.autograd.grad(_kl(_logits(o, model), logits_fp[i]), [out["y"]])
            grads.append(output_rows(gr).float())
    finally:
        handle.remove()
        record.remove()
    x, g = torch.cat(inputs), torch.cat(grads)
    idx = subsample(torch.arange(x.shape[0]), cfg.max_tokens, gen)
    b = None if conv.bias is None else conv.bias.detach().float()
    return search_layer(conv.weight_2d().detach().float(), b, conv.weight_quantizer, None, conv.out_channels,
                        x[idx], g[idx] if cfg.hessian else None, cfg.factors(), 1)


def _kl(logits_q: Tensor, logits_fp: Tensor) -> Tensor:
    """KL(p_fp ‖ p_q) summed over samples (and positions), softmax over the last dim."""
    return F.kl_div(F.log_softmax(logits_q.float(), -1), F.log_softmax(logits_fp.float(), -1),
                    log_target=True, reduction="sum")


def _block_targets(model: nn.Module, groups: list[LinearGroup], infos: list[BlockInfo],
                   block: int | None) -> tuple[dict[str, QuantLinear], AttentionQuantizers | None]:
    """The block's QuantLinears by name and its attention quantizers (None outside blocks or without)."""
    mods = dict(model.named_modules())
    lin = {n: mods[n] for g in groups if g.block == block for n in g.names if isinstance(mods[n], QuantLinear)}
    aq = None if block is None else getattr(mods[infos[block].attention], "s2d_attn_quant", None)
    return lin, aq


def _attn_parts(aq: AttentionQuantizers | None) -> tuple[dict[str, Quantizer], dict[str, nn.Module]]:
    """The attention quantizers ("attn.q", ...) and the matmul-output hook points ("attn.scores", "attn.context")."""
    if aq is None:
        return {}, {}
    return ({f"attn.{p}": getattr(aq, p) for p in ("q", "k", "v", "probs")},
            {"attn.scores": aq.scores_out, "attn.context": aq.context_out})


def _record_block(model: nn.Module, lin: dict[str, QuantLinear], attn: dict[str, Quantizer],
                  probes: dict[str, nn.Module], batches: list[dict], logits_fp: list[Tensor],
                  ) -> tuple[TokenCapture, dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """Float inputs of the block's Linears (token rows) / attention quantizers (as recorded) and the KL
    gradients at their outputs and at the ``probes``' outputs (the attention matmuls), per batch."""
    set_quantization(model, False)
    xs_lin = TokenCapture(lin)
    xs_attn: dict[str, list[Tensor]] = {n: [] for n in attn}
    handles: list[RemovableHandle] = [
        m.register_forward_pre_hook(lambda mod, a, n=n: xs_attn[n].append(a[0].detach())) for n, m in attn.items()]
    try:
        for _ in forward_batches(model, batches, xs_lin):
            pass
    finally:
        xs_lin.remove()
        for h in handles:
            h.remove()
    set_quantization(model, True)
    grads: dict[str, list[Tensor]] = {n: [] for n in (*lin, *attn, *probes)}
    outs: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if out.requires_grad:  # in the graph already: the gradient reaches it, nothing to cut
                outs[name] = out
                return out
            outs[name] = out.detach().requires_grad_(True)
            # a probe's output is edited in place downstream (the scores' mask): hand on a non-leaf copy
            return outs[name].clone() if name in probes else outs[name]
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in {**lin, **attn, **probes}.items()]
    try:
        for i, (batch, out) in enumerate(forward_batches(model, batches, grad=True)):
            names = list(outs)
            loss = _kl(_logits(out, model), logits_fp[i])
            gs = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
            for n, gr in zip(names, gs):
                gr = torch.zeros_like(outs[n]) if gr is None else gr
                grads[n].append(token_rows(gr, batch.get("attention_mask")).float() if n in lin
                                else gr.detach().float())
            outs.clear()
    finally:
        for h in handles:
            h.remove()
    return xs_lin, xs_attn, grads


def _search_attention(aq: AttentionQuantizers, xs: dict[str, Tensor], grads: dict[str, Tensor],
                      cfg: PTQ4ViTConfig) -> None:
    """Scores = (Q(q)·scaling) Q(k)ᵀ and context = Q(probs) Q(v), each pair searched on its matmul output."""
    q, k = xs["attn.q"], xs["attn.k"]
    n_rep, s = q.shape[1] // k.shape[1], aq.scaling

    def rep(x: Tensor) -> Tensor:  # (K, B, Hkv, T, D) -> (K, B, H, T, D): GQA heads repeated
        return x.repeat_interleave(n_rep, dim=2) if n_rep > 1 else x

    pairs = (("q", "k", "attn.scores", lambda a, b: (a * s) @ rep(b).transpose(-1, -2)),
             ("probs", "v", "attn.context", lambda a, b: a @ rep(b)))
    for a, b, out, product in pairs:
        stats = search_matmul(getattr(aq, a), getattr(aq, b), xs[f"attn.{a}"], xs[f"attn.{b}"],
                              grads[out] if cfg.hessian else None, product, cfg.factors(), cfg.rounds,
                              cfg.softmax_k_max)
        logger.debug("ptq4vit %s @ %s: distance %.3g -> %.3g", a, b, stats["initial"], stats["final"])


def _search_block(model: nn.Module, groups: list[LinearGroup], infos: list[BlockInfo], block: int | None,
                  batches: list[dict], logits_fp: list[Tensor], cfg: PTQ4ViTConfig, gen: torch.Generator) -> None:
    """Record one block (``None``: the Linears outside blocks) and search all its scales."""
    lin, aq = _block_targets(model, groups, infos, block)
    attn, probes = _attn_parts(aq)
    if not cfg.matmul_output:
        probes = {}
    if not lin and not attn:
        return
    xs_lin, xs_attn, grads = _record_block(model, lin, attn, probes, batches, logits_fp)
    group_of = {n: g for g in groups if g.block == block for n in g.names}
    for n, mod in lin.items():
        x, g = xs_lin.cat(n), torch.cat(grads[n])
        idx = subsample(torch.arange(x.shape[0]), cfg.max_tokens, gen)
        stats = _search_linear(mod, _weight_groups(mod, group_of[n]), x[idx], g[idx] if cfg.hessian else None, cfg)
        logger.debug("ptq4vit %s: distance %.3g -> %.3g", n, stats["initial"], stats["final"])
    if aq is not None and cfg.matmul_output:
        _search_attention(aq, {n: torch.cat(v) for n, v in xs_attn.items()},
                          {n: torch.cat(grads[n]) for n in probes}, cfg)
        return
    for n, q in attn.items():
        x, g = torch.cat(xs_attn[n]), torch.cat(grads[n])
        search_attn_quantizer(q, x, g if cfg.hessian else None, cfg.factors(), cfg.softmax_k_max)


def check_supported(model: nn.Module, infos: list[BlockInfo], cfg: PTQ4ViTConfig) -> None:
    """ValueError for structures PTQ4ViT's quantizers assume away: the twin-uniform "gelu" quantizer
    needs the fc2 input to be a GELU output, which a gated MLP (SwiGLU / gate+up) does not produce."""
    if not cfg.twin_gelu:
        return
    mods, linears = dict(model.named_modules()), output_linears(model)
    for b in infos:
        fc1_out = sum(linears[n].out_features for n in b.fc1)
        if len(b.fc1) > 1 or fc1_out != mods[b.fc2].in_features:    # fc2's slot: the factor reading its input
            raise ValueError(
                f"ptq4vit: block {b.name} has a gated MLP ({', '.join(b.fc1)} -> {b.fc2}); the twin-uniform "
                "post-GELU quantizer needs a GELU MLP. Pass PTQ4ViTConfig(twin_gelu=False) to quantize the "
                "fc2 input with a plain uniform quantizer instead")


def _logits(out: object, model: nn.Module) -> Tensor:
    logits = getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(f"ptq4vit: the Hessian-guided search needs a model whose output has .logits "
                         f"(a classification or causal-LM head); {type(model).__name__} returned {type(out).__name__}")
    return logits


def _preflight(model: nn.Module, cfg: PTQ4ViTConfig) -> None:
    check_supported(model, require_blocks(model), cfg)


@register_method("ptq4vit", PTQ4ViTConfig, check=_preflight)
def ptq4vit(model: nn.Module, spec: QuantConfig, calib: Iterable[dict] | None,
            cfg: PTQ4ViTConfig = PTQ4ViTConfig(), progress: bool = True) -> None:
    """``quantize_model(model, spec, method="ptq4vit", calib=batches, config=PTQ4ViTConfig())``."""
    if calib is None:
        raise ValueError("ptq4vit: calib batches are required, got None")
    infos = require_blocks(model)
    groups = linear_groups(model, infos)      # check_supported ran as the registered pre-flight
    device = next(model.parameters()).device
    batches = [to_device(b, device) for b in sub_batches(take_samples(calib, cfg.num_samples), cfg.sub_batch)]
    gen = torch.Generator().manual_seed(cfg.seed)
    _install_quantizers(model, spec, groups, cfg)
    with eval_mode(model):
        calibrate(model, batches, progress=False)
        _init_scales(model, groups)
        set_quantization(model, False)
        logits_fp = [_logits(out, model).detach() for _, out in forward_batches(model, batches)]
        set_quantization(model, True)
        for name, conv in quant_patch_convs(model).items():
            stats = _search_patch_conv(model, conv, batches, logits_fp, cfg, gen)
            logger.debug("ptq4vit %s: distance %.3g -> %.3g", name, stats["initial"], stats["final"])
        for block in tqdm(list(range(len(infos))) + [None], desc="ptq4vit blocks", disable=not progress, leave=False):
            _search_block(model, groups, infos, block, batches, logits_fp, cfg, gen)
    set_quantization(model, True)
