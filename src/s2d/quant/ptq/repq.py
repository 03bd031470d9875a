"""RepQ-ViT post-training quantization (Li et al., ICCV 2023), in this project's own code.

What it does, per transformer block in forward order ("lazy" calibration: the blocks before the
current one are already quantized when its activations are recorded):

1. Record the inputs of the block's Linears and attention matmuls on the calibration samples.
2. Post-LayerNorm activations (inputs of q/k/v and of fc1): per-channel asymmetric ranges, each the
   quantile/MSE choice among the (1−p, p) quantiles for p ∈ {0.999, 0.9999, 0.99999};
   then the scale reparameterisation (``s2d.quant.reparam``) turns them into one per-tensor quantizer:
   folded into the LayerNorm affine and the consuming Linears for pre-LN ViTs; for post-LN encoders
   (BERT, MPNet) the norm also feeds the residual stream, so the per-channel affine stays as an
   explicit input transform of the consuming Linears (``ChannelAffineInput``) and r, s are folded into
   their weights and bias — see ``s2d.quant.reparam`` for the exact maths and why.
3. Other Linear inputs (out-proj, fc2, head) and q, k, v: per-tensor asymmetric uniform with the same
   quantile/MSE search (RepQ-ViT activations are asymmetric whatever ``spec.a_symmetric`` says).
   Post-softmax probabilities: log-√2 quantizer, Δ the quantile(p) candidate with the lowest MSE (as
   the official code).
4. Weights (after reparameterisation): uniform asymmetric per output channel with the quantile/MSE
   search, as the official code (``RepQConfig(w_symmetric=True)``: symmetric narrow codes).
5. The patch embedding of a vision model (first, before block 0): its weight as every other weight,
   its input (the image) per tensor at ``patch_input_bits`` = 8 bits, as the official code.
Ranges are not widened to include 0 (the official ``init_quantization_scale``; ``include_zero=True``
restores s2d 0.1's widening), and the candidates are the official p ∈ {0.999, 0.9999, 0.99999}.

The reparameterisation is exact for the float model, so no extra calibration pass is needed after it
(the per-tensor range is the one implied by the per-channel ranges). No reconstruction.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2d.models import BlockInfo
from s2d.quant.api import register_method
from s2d.quant.config import QuantConfig
from s2d.quant.conv import QuantPatchConv
from s2d.quant.linear import QuantLinear
from s2d.quant.nonuniform import LogSqrt2Quantizer
from s2d.quant.primitives import bits_ok
from s2d.quant.ptq.common import (
    LinearGroup, capture_inputs, capture_patch_inputs, linear_groups, quant_patch_convs, quantile_mse_range,
    require_blocks, take_samples,
)
from s2d.quant.quantizers import Quantizer, UniformQuantizer
from s2d.quant.reparam import ChannelAffineInput, channel_affine_from_ranges, fold_into_linear, fold_into_norm
from s2d.utils import eval_mode, to_device

logger = logging.getLogger(__name__)

__all__ = ["RepQConfig", "repq", "repq_calibrate", "input_quantizer", "set_weight_range"]


@dataclass(frozen=True)
class RepQConfig:
    """RepQ-ViT hyperparameters (paper / public-code defaults)."""

    quantiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # clipping candidates p in (0.5, 1], 1.0 = min-max
    #                                 (the official code's grid and order: the first wins ties)
    reparam: bool = True            # per-channel -> per-tensor reparameterisation of post-LN inputs (False: ablation)
    log_quantile_delta: bool = True  # log-√2 Δ among the quantile(p) of the probabilities, p in ``quantiles`` (official;
    #                                  False: max·2^(-j/8), j = 0..16, s2d 0.1)
    patch_input_bits: int | None = 8  # bits of the patch-embedding input (the image), per tensor: the official 8
    #                                 (None: float, as PTQ4ViT and ERQ)
    w_symmetric: bool = False       # weights: the official code's asymmetric per-channel [0, 2^b-1] with a zero point
    #                                 (True: symmetric narrow codes, s2d 0.1's default)
    include_zero: bool = False      # ranges widened to include 0 (False: the official unconstrained [q(1-p), q(p)])
    num_samples: int = 32           # calibration samples used (the first ones of calib), >= 1
    max_tokens: int | None = 16384  # token rows kept per recorded activation (random subset), None or >= 16
    seed: int = 0                   # seed of that subsampling

    def __post_init__(self) -> None:
        if not self.quantiles or not all(0.5 < p <= 1.0 for p in self.quantiles):
            raise ValueError(f"RepQConfig.quantiles must be non-empty with every p in (0.5, 1], got {self.quantiles!r}")
        object.__setattr__(self, "quantiles", tuple(self.quantiles))
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"RepQConfig.num_samples must be an int >= 1, got {self.num_samples!r}")
        if self.max_tokens is not None and self.max_tokens < 16:
            raise ValueError(f"RepQConfig.max_tokens must be None or >= 16, got {self.max_tokens!r}")
        if self.patch_input_bits is not None and not bits_ok(self.patch_input_bits):
            raise ValueError(f"RepQConfig.patch_input_bits must be None or an int in [2, 16], "
                             f"got {self.patch_input_bits!r}")


def input_quantizer(lin: QuantLinear) -> Quantizer:
    """The per-tensor Quantizer of a QuantLinear's input (inside a ChannelAffineInput if reparameterised)."""
    iq = lin.input_quantizer
    return iq.quantizer if isinstance(iq, ChannelAffineInput) else iq


def _install_quantizers(model: nn.Module, spec: QuantConfig, cfg: RepQConfig) -> None:
    """RepQ-ViT quantizers (activations always asymmetric, weights by ``cfg.w_symmetric``), all disabled
    until their block is calibrated."""
    zero = cfg.include_zero
    for m in model.modules():
        if isinstance(m, QuantPatchConv):
            m.weight_quantizer = UniformQuantizer(spec.w_bits, cfg.w_symmetric, spec.w_granularity, axis=0,
                                                  include_zero=zero)
            m.weight_quantizer.enabled = False
            if cfg.patch_input_bits is not None:
                m.input_quantizer = UniformQuantizer(cfg.patch_input_bits, False, "tensor", include_zero=zero)
                m.input_quantizer.enabled = False
        if isinstance(m, QuantLinear):
            m.input_quantizer = UniformQuantizer(spec.a_bits, False, "tensor", include_zero=zero)
            m.weight_quantizer = UniformQuantizer(spec.w_bits, cfg.w_symmetric, spec.w_granularity, axis=0,
                                                  include_zero=zero)
            m.input_quantizer.enabled = m.weight_quantizer.enabled = False
        aq = getattr(m, "s2d_attn_quant", None)
        if aq is not None:
            for part in ("q", "k", "v"):
                setattr(aq, part, UniformQuantizer(spec.a_bits, False, "tensor", include_zero=zero))
            aq.probs = LogSqrt2Quantizer(spec.a_bits, quantiles=cfg.quantiles if cfg.log_quantile_delta else None)
            for q in (aq.q, aq.k, aq.v, aq.probs):
                q.enabled = False


def set_weight_range(lin: QuantLinear | QuantPatchConv, quantiles: tuple[float, ...]) -> None:
    """Per-output-channel (or per-tensor) quantile/MSE range of the layer's current weight; enables it."""
    wq = lin.weight_quantizer
    w = lin.weight.detach().float()
    rows = w.reshape(w.shape[0], -1) if wq.granularity == "channel" else w.reshape(1, -1)
    lo, hi = quantile_mse_range(rows, wq.bits, wq.symmetric, quantiles, include_zero=wq.include_zero)
    wq.set_range(lo, hi)
    wq.enabled = True


def _set_tensor_range(q: UniformQuantizer, x: Tensor, quantiles: tuple[float, ...]) -> None:
    lo, hi = quantile_mse_range(x.reshape(1, -1), q.bits, q.symmetric, quantiles, include_zero=q.include_zero)
    q.set_range(lo, hi)
    q.enabled = True


def _reparam_group(model: nn.Module, lins: list[QuantLinear], x: Tensor, norm_name: str | None,
                   post_ln: bool, cfg: RepQConfig) -> str:
    """Per-channel ranges of the shared input x (N, C) -> per-tensor quantizer via reparameterisation."""
    q0 = input_quantizer(lins[0])
    lo, hi = quantile_mse_range(x.T.contiguous(), q0.bits, False, cfg.quantiles, include_zero=cfg.include_zero)
    aff = channel_affine_from_ranges(lo, hi, q0.bits, include_zero=cfg.include_zero)
    norm = model.get_submodule(norm_name) if norm_name else None
    foldable = (not post_ln and isinstance(norm, nn.LayerNorm) and norm.weight is not None
                and norm.bias is not None)
    if foldable:
        fold_into_norm(norm, aff)
    for lin in lins:
        fold_into_linear(lin, aff)
        q = input_quantizer(lin)
        if not foldable:
            lin.input_quantizer = ChannelAffineInput(aff, q)
        q.set_range(torch.tensor([aff.lo]), torch.tensor([aff.hi]))
        q.enabled = True
    return "norm" if foldable else "linear-input"


def _calibrate_group_set(model: nn.Module, groups: list[LinearGroup], infos: list[BlockInfo], block: int | None,
                         batches: list[dict], cfg: RepQConfig, gen: torch.Generator, weights: bool) -> None:
    """Calibrate every activation quantizer of one block (or of the Linears outside blocks)."""
    mods = dict(model.named_modules())
    lin_groups = [g for g in groups if g.block == block]
    lin_groups = [[n for n in g.names if isinstance(mods[n], QuantLinear)] for g in lin_groups]
    roles = [g.role for g in groups if g.block == block]
    targets: dict[str, nn.Module] = {names[0]: mods[names[0]] for names in lin_groups if names}
    attn = None
    if block is not None:
        attn = getattr(mods[infos[block].attention], "s2d_attn_quant", None)
        if attn is not None:
            targets.update({f"attn.{p}": getattr(attn, p) for p in ("q", "k", "v", "probs")})
    unmasked = [n for n in targets if n.startswith("attn.")]
    xs = capture_inputs(model, targets, batches, cfg.max_tokens, gen, unmasked=unmasked)
    for names, role in zip(lin_groups, roles):
        if not names:
            continue
        lins = [mods[n] for n in names]
        x = xs[names[0]]
        if cfg.reparam and role in ("qkv", "fc1"):
            info = infos[block]
            norm = info.attn_in_norm if role == "qkv" else info.mlp_in_norm
            how = _reparam_group(model, lins, x, norm, info.post_ln, cfg)
            logger.debug("reparameterised %s input into the %s", names, how)
        else:
            for lin in lins:
                _set_tensor_range(input_quantizer(lin), x, cfg.quantiles)
        if weights:
            for lin in lins:
                set_weight_range(lin, cfg.quantiles)
    if attn is not None:
        for p in ("q", "k", "v"):
            _set_tensor_range(getattr(attn, p), xs[f"attn.{p}"], cfg.quantiles)
        attn.probs.reset()
        attn.probs.observe(xs["attn.probs"])
        attn.probs.finalize()
        attn.probs.enabled = True


def _calibrate_patch_conv(model: nn.Module, conv: QuantPatchConv, batches: list[dict], cfg: RepQConfig,
                          gen: torch.Generator, weights: bool) -> None:
    """The patch embedding: its input quantizer (if any) from the image patches, its weight as any weight."""
    if isinstance(conv.input_quantizer, Quantizer):
        _set_tensor_range(conv.input_quantizer, capture_patch_inputs(model, conv, batches, cfg.max_tokens, gen),
                          cfg.quantiles)
    if weights:
        set_weight_range(conv, cfg.quantiles)


def repq_calibrate(model: nn.Module, spec: QuantConfig, calib: Iterable[dict] | None, config: RepQConfig,
                   progress: bool = True, weights: bool = True) -> list[dict]:
    """RepQ-ViT calibration of a prepared model, block by block. ``weights=False`` leaves the weight
    quantizers disabled (ERQ's first step). Returns the calibration batches actually used."""
    if calib is None:
        raise ValueError("repq: calib batches are required, got None")
    infos = require_blocks(model)
    groups = linear_groups(model, infos)
    device = next(model.parameters()).device
    batches = [to_device(b, device) for b in take_samples(calib, config.num_samples)]
    gen = torch.Generator().manual_seed(config.seed)
    _install_quantizers(model, spec, config)
    steps = list(range(len(infos))) + [None]
    with eval_mode(model), torch.no_grad():
        for conv in quant_patch_convs(model).values():
            _calibrate_patch_conv(model, conv, batches, config, gen, weights)
        for block in tqdm(steps, desc="repq blocks", disable=not progress, leave=False):
            _calibrate_group_set(model, groups, infos, block, batches, config, gen, weights)
    return batches


@register_method("repq", RepQConfig)
def repq(model: nn.Module, spec: QuantConfig, calib: Iterable[dict] | None, config: RepQConfig = RepQConfig(),
         progress: bool = True) -> None:
    """``quantize_model(model, spec, method="repq", calib=batches, config=RepQConfig())``."""
    repq_calibrate(model, spec, calib, config, progress)

