"""ERQ post-training quantization (Zhong et al., ICML 2024), on RepQ-ViT's quantizers, with the defaults
of the official TPAMI code (``zysxmu/ERQ``, ``test_quant_expand.py``; docs/quantization.md has the table).

1. RepQ-ViT calibration of every activation quantizer (weights still float), including the post-LN
   reparameterisation (``s2d.quant.ptq.repq``).
2. The input X of every Linear group (Linears reading the same tensor) is captured once from the float
   model (``cache="float"``, official; ``"progressive"``: from the model quantized so far, group by
   group, s2d 0.1). Then per group, in forward order (Aqer on every Linear of the group, then the
   weight grids, then Wqer), with X̃ = a Linear's input quantizer applied to X and
   Y = X Wᵀ + b:
   - Aqer: [W b] += δᵀ with δ = (X̃ᵀX̃ + λ_a I)⁻¹ X̃ᵀ (Y − X̃ [W b]ᵀ)  (ridge regression; a bias is
     created if the Linear had none; λ_a = ``head_aqer_lambda`` for a 2-D input, the head);
   - the weight quantizer (asymmetric per channel) is calibrated on the updated weight by the
     official clipping grid ``w_quantiles``; for q/k/v and fc1 it is the official two-part quantizer
     (``two_part``, :mod:`s2d.quant.twopart`): the input columns with the most per-row outliers (out/20
     of them, chosen jointly over q, k and v like the code's fused qkv) get a per-row grid of their own;
   - Wqer: half of the still-float columns at a time are rounded onto that grid with rounding
     refinement (≤ ``max_flips`` greedy floor/ceil flips per row lowering δ1ᵀ(μμᵀ+Σ)δ1) and the
     remaining float columns and the bias are compensated by ridge regression
     δ2 = −(X̃₂ᵀX̃₂ + λ_w I)⁻¹ X̃₂ᵀX̃₁δ1ᵀ.
   The final weight lies exactly on the weight quantizer's grid. ``rtn_fallback`` (off; not in the
   paper or the code) keeps RTN for a layer whose output error ends above RTN's.

3. Before them, the patch embedding of a vision model (:func:`erq_patch_conv`): weight grid, then Wqer
   on the float image patches without rounding refinement, λ = ``patch_wqer_lambda``, as the code.

λ is absolute (not rescaled with the number of tokens) and columns are taken in index order, as in
the code.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.quant.api import register_method
from s2d.quant.config import QuantConfig
from s2d.quant.linear import QuantLinear
from s2d.quant.prepare import named_quantizers, set_quantization
from s2d.quant.conv import QuantPatchConv
from s2d.quant.ptq.common import (
    LinearGroup, capture_inputs, capture_patch_inputs, linear_groups, quant_patch_convs, quantile_mse_range,
)
from s2d.quant.ptq.erq_math import RowGrid, aqer, wqer
from s2d.quant.ptq.repq import RepQConfig, input_quantizer, repq_calibrate, set_weight_range
from s2d.quant.quantizers import Quantizer
from s2d.quant.twopart import TwoPartQuantizer, outlier_columns
from s2d.utils import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["CACHES", "TWO_PART_ROLES", "WEIGHT_QUANTILES", "ERQConfig", "erq", "erq_group", "erq_linear",
           "erq_patch_conv", "calibrate_weight"]


CACHES = ("float", "progressive")  # where ERQ's layer inputs X come from (ERQConfig.cache)
TWO_PART_ROLES = ("qkv", "fc1")  # Linear groups whose weights get the two-part quantizer (official: qkv, fc1)
WEIGHT_QUANTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0)  # official grid


@dataclass(frozen=True)
class ERQConfig:
    """ERQ hyperparameters: the defaults of the official TPAMI code (``test_quant_expand.py``, coe = 2e4)."""

    aqer_lambda: float = 2e3        # Aqer ridge strength λ_a for token inputs, > 0 (official 0.1·coe; absolute,
    #                                 not rescaled by the token count)
    wqer_lambda: float = 2e3        # Wqer ridge strength λ_w, > 0 (official 0.1·coe for every layer)
    head_aqer_lambda: float = 0.1   # Aqer λ for a Linear whose input is 2-D (one row per sample: the head), > 0
    patch_wqer_lambda: float = 2e4  # Wqer λ of the patch embedding, > 0 (official 0.1·coe·10; there the code runs
    #                                 no Aqer and no rounding refinement, and its input stays float)
    max_flips: int = 100            # rounding-refinement flips per row, >= 0 (0 = round to nearest)
    row_group: int = 500            # weight rows refined together (bounds memory), >= 1
    use_aqer: bool = True           # run Aqer (False: ablation)
    use_wqer: bool = True           # run Wqer (False: ablation)
    quantiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # activation clipping candidates (as RepQConfig)
    w_quantiles: tuple[float, ...] = WEIGHT_QUANTILES  # weight clipping candidates p per row: [q(1-p), q(p)]
    w_symmetric: bool = False       # weights asymmetric per channel, as the official code (True: symmetric)
    two_part: bool = True           # qkv / fc1 weights: outlier input columns get a per-row grid of their own
    #                                 (TPAMI code; needs asymmetric per-channel weights, else not applied)
    cache: str = "float"            # "float": X captured once from the float model, X̃ = Q_a(X) (official);
    #                                 "progressive": X from the model quantized so far (s2d 0.1)
    rtn_fallback: bool = False      # keep RTN weights where ERQ's output error ends higher (s2d 0.1; not official)
    num_samples: int = 32           # as RepQConfig.num_samples
    max_tokens: int | None = 16384  # rows of X cached per layer (and RepQ's token budget), None or >= 16
    seed: int = 0                   # seed of the token subsampling (RepQ step: seed, ERQ step: seed + 1)

    def __post_init__(self) -> None:
        for f in ("aqer_lambda", "wqer_lambda", "head_aqer_lambda", "patch_wqer_lambda"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ERQConfig.{f} must be > 0, got {getattr(self, f)!r}")
        if not isinstance(self.max_flips, int) or self.max_flips < 0:
            raise ValueError(f"ERQConfig.max_flips must be an int >= 0, got {self.max_flips!r}")
        if not isinstance(self.row_group, int) or self.row_group < 1:
            raise ValueError(f"ERQConfig.row_group must be an int >= 1, got {self.row_group!r}")
        if self.cache not in CACHES:
            raise ValueError(f"ERQConfig.cache must be one of {CACHES}, got {self.cache!r}")
        if not self.w_quantiles or not all(0.5 < p <= 1.0 for p in self.w_quantiles):
            raise ValueError(f"ERQConfig.w_quantiles must be non-empty with every p in (0.5, 1], got {self.w_quantiles!r}")
        object.__setattr__(self, "w_quantiles", tuple(self.w_quantiles))
        self.repq_config()  # validates quantiles, num_samples, max_tokens

    def repq_config(self) -> RepQConfig:
        """The RepQ-ViT settings of step 1."""
        return RepQConfig(quantiles=self.quantiles, num_samples=self.num_samples, max_tokens=self.max_tokens,
                          seed=self.seed, w_symmetric=self.w_symmetric, patch_input_bits=None)


@dataclass
class _LayerData:
    """What ERQ keeps of one Linear between Aqer and Wqer."""

    x_q: torch.Tensor          # (N, in) quantized input as the weights see it
    y: torch.Tensor            # (N, out) float output X Wᵀ + b of the original layer
    w0: torch.Tensor           # (out, in) original weight
    b0: torch.Tensor | None    # (out,) original bias
    mse_rtn: float             # output MSE with RTN weights (on the original W) and quantized input


@torch.no_grad()
def erq_group(lins: list[QuantLinear], x_raw: torch.Tensor, config: ERQConfig,
              aqer_lambda: float | None = None) -> list[dict]:
    """Aqer, weight calibration and Wqer for Linears that read the same recorded raw input (N, in).

    The input quantizers must be calibrated. The outlier columns of two-part weight quantizers are
    chosen once on the group's stacked weights (q, k and v as the one fused qkv of the official code).
    ``aqer_lambda``: λ_a of this group (default ``config.aqer_lambda``). Returns per Linear its output
    MSE vs Y = XWᵀ+b before (RTN weights, quantized input) and after.
    """
    data = [_aqer_step(lin, x_raw, config, config.aqer_lambda if aqer_lambda is None else aqer_lambda)
            for lin in lins]
    columns = None
    if any(isinstance(lin.weight_quantizer, TwoPartQuantizer) for lin in lins):
        columns = outlier_columns(torch.cat([lin.weight.detach() for lin in lins]))
    for lin in lins:
        calibrate_weight(lin, config.w_quantiles, columns)
    return [_wqer_step(lin, d, config) for lin, d in zip(lins, data)]


def erq_linear(lin: QuantLinear, x_raw: torch.Tensor, config: ERQConfig, aqer_lambda: float | None = None) -> dict:
    """:func:`erq_group` for one Linear."""
    return erq_group([lin], x_raw, config, aqer_lambda)[0]


def calibrate_weight(lin: QuantLinear, quantiles: tuple[float, ...], columns: torch.Tensor | None = None) -> None:
    """The weight quantizer on the Linear's current weight, per row by the clipping grid ``quantiles``; a
    :class:`TwoPartQuantizer` first takes its outlier ``columns`` (default: chosen on this weight) and
    searches each part's range separately. Enables the quantizer."""
    wq = lin.weight_quantizer
    if not isinstance(wq, TwoPartQuantizer):
        set_weight_range(lin, quantiles)
        return
    w = lin.weight.detach().float()
    wq.set_columns(outlier_columns(w) if columns is None else columns)
    rest, out = wq.parts(w)
    lo_r, hi_r = quantile_mse_range(rest, wq.bits, False, quantiles, include_zero=wq.include_zero)
    lo_o, hi_o = (quantile_mse_range(out, wq.bits, False, quantiles, include_zero=wq.include_zero)
                  if out.shape[1] else (lo_r, hi_r))  # no outlier column: the second grid is unused
    wq.set_ranges(torch.stack([lo_r, lo_o], 1), torch.stack([hi_r, hi_o], 1))
    wq.enabled = True


def _aqer_step(lin: QuantLinear, x_raw: torch.Tensor, config: ERQConfig, aqer_lambda: float) -> _LayerData:
    """Record the layer's tensors, its RTN error, and run Aqer (weight and bias updated in place)."""
    q = input_quantizer(lin)
    q.enabled = False
    x = lin.input_quantizer(x_raw)  # float input as the weights see it (reparameterised if any)
    q.enabled = True
    x_q = lin.input_quantizer(x_raw)
    w0 = lin.weight.detach().clone()
    b0 = None if lin.bias is None else lin.bias.detach().clone()
    y = x @ w0.T + (0 if b0 is None else b0)
    calibrate_weight(lin, config.w_quantiles)
    data = _LayerData(x_q, y, w0, b0, _output_mse(lin, x_q, y))
    if config.use_aqer:
        w, b = aqer(w0, b0, x_q, y, aqer_lambda)
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(b)
        else:
            lin.bias.copy_(b)
    return data


def _wqer_step(lin: QuantLinear, data: _LayerData, config: ERQConfig) -> dict:
    """Wqer on the calibrated weight grid (weight and bias updated in place); the RTN fallback if asked."""
    if config.use_wqer:
        grid = _weight_grid(lin.weight_quantizer, lin.weight.shape)
        w, b = wqer(lin.weight.detach(), data.x_q, grid, config.wqer_lambda, config.max_flips, config.row_group,
                    bias=lin.bias)
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(b)
    err = _output_mse(lin, data.x_q, data.y)
    fallback = config.rtn_fallback and err > data.mse_rtn
    if fallback:  # the ridge steps can overshoot on a tiny calibration set: keep RTN for this layer
        _restore_rtn(lin, data.w0, data.b0, config)
        logger.debug("erq: output error %.3g > RTN's %.3g; layer kept at RTN", err, data.mse_rtn)
        err = _output_mse(lin, data.x_q, data.y)
    return {"mse_rtn": data.mse_rtn, "mse_erq": err, "kept_rtn": fallback}


def _weight_grid(wq: Quantizer, shape: torch.Size) -> RowGrid:
    """The calibrated grid of a weight quantizer for a weight of ``shape`` (m, n): per entry for a
    :class:`TwoPartQuantizer`, per row otherwise (a per-tensor scale repeated on every row)."""
    if isinstance(wq, TwoPartQuantizer):
        scale, zero = wq.element_params(shape)
        return RowGrid(scale, zero, wq.qmin, wq.qmax)
    m = shape[0]
    return RowGrid(wq.scale.reshape(-1).expand(m) if wq.scale.numel() == 1 else wq.scale.reshape(-1),
                   wq.zero_point.reshape(-1).expand(m) if wq.zero_point.numel() == 1 else wq.zero_point.reshape(-1),
                   wq.qmin, wq.qmax)


def _output_mse(lin: QuantLinear, x_q: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of the quantized layer output Q_a(X) Q_w(W)ᵀ + b against the float Y."""
    bias = lin.bias if lin.bias is not None else 0
    return float((x_q @ lin.weight_quantizer(lin.weight).T + bias - y).pow(2).mean())


def _restore_rtn(lin: QuantLinear, w0: torch.Tensor, b0: torch.Tensor | None, config: ERQConfig) -> None:
    """Put the RTN weights back, stored on the grid (so the deployed weight equals the fake-quant one)."""
    if b0 is None:
        lin.bias = None
    else:
        lin.bias.copy_(b0)
    lin.weight.copy_(w0)
    calibrate_weight(lin, config.w_quantiles)
    lin.weight.copy_(lin.weight_quantizer(w0))


def _input_ndims(model: nn.Module, mods: dict[str, nn.Module], names: list[str], batch: dict) -> dict[str, int]:
    """The number of dimensions of each named module's input on one calibration batch (2: the head)."""
    ndims: dict[str, int] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:  # returns None: the input is left unchanged
            ndims.setdefault(name, args[0].dim())
        return hook

    handles = [mods[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    return ndims


def _float_inputs(model: nn.Module, mods: dict[str, nn.Module], names: list[str], batches: list[dict],
                  config: ERQConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every named Linear's input in the float model (all quantizers off), captured in one pass, (N, in)."""
    quantizers = named_quantizers(model).values()
    was = [q.enabled for q in quantizers]
    set_quantization(model, False)
    try:
        return capture_inputs(model, {n: mods[n] for n in names}, batches, config.max_tokens, gen)
    finally:
        for q, on in zip(quantizers, was):
            q.enabled = on


@register_method("erq", ERQConfig)
def erq(model: nn.Module, spec: QuantConfig, calib: Iterable[dict] | None, config: ERQConfig = ERQConfig(),
        progress: bool = True) -> None:
    """``quantize_model(model, spec, method="erq", calib=batches, config=ERQConfig())``."""
    if calib is None:
        raise ValueError("erq: calib batches are required, got None")
    batches = repq_calibrate(model, spec, calib, config.repq_config(), progress, weights=False)
    gen = torch.Generator().manual_seed(config.seed + 1)
    mods = dict(model.named_modules())
    groups = [LinearGroup([n for n in g.names if isinstance(mods[n], QuantLinear)], g.role, g.block)
              for g in linear_groups(model)]
    groups = [g for g in groups if g.names]
    if config.two_part:
        _install_two_part(mods, groups, spec, config)
    with eval_mode(model), torch.no_grad():
        for conv in quant_patch_convs(model).values():
            erq_patch_conv(conv, capture_patch_inputs(model, conv, batches, config.max_tokens, gen), config)
        firsts = [g.names[0] for g in groups]
        ndims = _input_ndims(model, mods, firsts, batches[0])
        cached = _float_inputs(model, mods, firsts, batches, config, gen) if config.cache == "float" else {}
        for g in tqdm(groups, desc="erq layers", disable=not progress, leave=False):
            first = g.names[0]
            x_raw = (cached.pop(first) if config.cache == "float" else
                     capture_inputs(model, {first: mods[first]}, batches, config.max_tokens, gen)[first])
            lam = config.head_aqer_lambda if ndims.get(first) == 2 else config.aqer_lambda
            for n, stats in zip(g.names, erq_group([mods[n] for n in g.names], x_raw, config, aqer_lambda=lam)):
                logger.debug("erq %s: output mse %.3g (rtn) -> %.3g", n, stats["mse_rtn"], stats["mse_erq"])
            del x_raw


@torch.no_grad()
def erq_patch_conv(conv: QuantPatchConv, patches: torch.Tensor, config: ERQConfig) -> None:
    """ERQ on the patch embedding as the official code runs it: the weight grid by the clipping search, then
    Wqer with round-to-nearest (no refinement) and λ = ``patch_wqer_lambda`` on the float input patches
    (N, C·kh·kw); no Aqer (the input is not quantized). Weight and bias updated in place."""
    set_weight_range(conv, config.w_quantiles)
    if not config.use_wqer:
        return
    grid = _weight_grid(conv.weight_quantizer, conv.weight_2d().shape)
    out = wqer(conv.weight_2d().detach(), patches, grid, config.patch_wqer_lambda, refine=False, bias=conv.bias)
    w, b = out if conv.bias is not None else (out, None)
    conv.weight.copy_(w.reshape(conv.weight.shape))
    if b is not None:
        conv.bias.copy_(b)


def _install_two_part(mods: dict[str, nn.Module], groups: list[LinearGroup], spec: QuantConfig,
                      config: ERQConfig) -> None:
    """Give the Linears of the qkv and fc1 groups a (disabled) :class:`TwoPartQuantizer` for their weights,
    when the weights are asymmetric per channel (the two-part grid is a per-row asymmetric one)."""
    if config.w_symmetric or spec.w_granularity != "channel":
        logger.info("erq: two_part needs asymmetric per-channel weights; plain per-row grids used")
        return
    for g in groups:
        if g.role in TWO_PART_ROLES:
            for n in g.names:
                mods[n].weight_quantizer = TwoPartQuantizer(spec.w_bits, include_zero=False)
                mods[n].weight_quantizer.enabled = False
