"""ERQ post-training quantization (Zhong et al., ICML 2024), on RepQ-ViT's quantizers, with the defaults
of the official TPAMI code (``zysxmu/ERQ``, ``test_quant_expand.py``; docs/quantization.md has the table).

1. RepQ-ViT calibration of every activation quantizer (weights still float), including the post-LN
   reparameterisation (``s2d.quant.ptq.repq``).
2. The input X of every Linear group (Linears reading the same tensor) is captured once from the float
   model (``cache="float"``, official; ``"progressive"``: from the model quantized so far, group by
   group, s2d 0.1). Then per Linear, in forward order, with X̃ = its input quantizer applied to X and
   Y = X Wᵀ + b:
   - Aqer: [W b] += δᵀ with δ = (X̃ᵀX̃ + λ_a I)⁻¹ X̃ᵀ (Y − X̃ [W b]ᵀ)  (ridge regression; a bias is
     created if the Linear had none; λ_a = ``head_aqer_lambda`` for a 2-D input, the head);
   - the weight quantizer (asymmetric per channel) is calibrated on the updated weight by the
     official clipping grid ``w_quantiles``;
   - Wqer: half of the still-float columns at a time are rounded onto that grid with rounding
     refinement (≤ ``max_flips`` greedy floor/ceil flips per row lowering δ1ᵀ(μμᵀ+Σ)δ1) and the
     remaining float columns and the bias are compensated by ridge regression
     δ2 = −(X̃₂ᵀX̃₂ + λ_w I)⁻¹ X̃₂ᵀX̃₁δ1ᵀ.
   The final weight lies exactly on the weight quantizer's grid. ``rtn_fallback`` (off; not in the
   paper or the code) keeps RTN for a layer whose output error ends above RTN's.

λ is absolute (not rescaled with the number of tokens) and columns are taken in index order, as in
the code. Not built: the code's two-part weight quantizer for qkv / fc1 (outlier input columns with a
scale of their own).
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
from s2d.quant.ptq.common import capture_inputs, linear_groups
from s2d.quant.ptq.erq_math import RowGrid, aqer, wqer
from s2d.quant.ptq.repq import RepQConfig, input_quantizer, repq_calibrate, set_weight_range
from s2d.utils import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["CACHES", "WEIGHT_QUANTILES", "ERQConfig", "erq", "erq_linear"]


CACHES = ("float", "progressive")  # where ERQ's layer inputs X come from (ERQConfig.cache)
WEIGHT_QUANTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999, 1.0)  # official grid


@dataclass(frozen=True)
class ERQConfig:
    """ERQ hyperparameters: the defaults of the official TPAMI code (``test_quant_expand.py``, coe = 2e4)."""

    aqer_lambda: float = 2e3        # Aqer ridge strength λ_a for token inputs, > 0 (official 0.1·coe; absolute,
    #                                 not rescaled by the token count)
    wqer_lambda: float = 2e3        # Wqer ridge strength λ_w, > 0 (official 0.1·coe for every layer)
    head_aqer_lambda: float = 0.1   # Aqer λ for a Linear whose input is 2-D (one row per sample: the head), > 0
    max_flips: int = 100            # rounding-refinement flips per row, >= 0 (0 = round to nearest)
    row_group: int = 500            # weight rows refined together (bounds memory), >= 1
    use_aqer: bool = True           # run Aqer (False: ablation)
    use_wqer: bool = True           # run Wqer (False: ablation)
    quantiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # activation clipping candidates (as RepQConfig)
    w_quantiles: tuple[float, ...] = WEIGHT_QUANTILES  # weight clipping candidates p per row: [q(1-p), q(p)]
    w_symmetric: bool = False       # weights asymmetric per channel, as the official code (True: symmetric)
    cache: str = "float"            # "float": X captured once from the float model, X̃ = Q_a(X) (official);
    #                                 "progressive": X from the model quantized so far (s2d 0.1)
    rtn_fallback: bool = False      # keep RTN weights where ERQ's output error ends higher (s2d 0.1; not official)
    num_samples: int = 32           # as RepQConfig.num_samples
    max_tokens: int | None = 16384  # rows of X cached per layer (and RepQ's token budget), None or >= 16
    seed: int = 0                   # seed of the token subsampling (RepQ step: seed, ERQ step: seed + 1)

    def __post_init__(self) -> None:
        for f in ("aqer_lambda", "wqer_lambda", "head_aqer_lambda"):
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
                          seed=self.seed, w_symmetric=self.w_symmetric)


@torch.no_grad()
def erq_linear(lin: QuantLinear, x_raw: torch.Tensor, config: ERQConfig, aqer_lambda: float | None = None) -> dict:
    """Aqer + weight calibration + Wqer for one QuantLinear given its recorded raw input (N, in).

    The input quantizer must be calibrated. ``aqer_lambda``: λ_a of this layer (default
    ``config.aqer_lambda``). Returns the layer's output MSE vs Y = XWᵀ+b before (RTN weights,
    quantized input) and after.
    """
    q = input_quantizer(lin)
    q.enabled = False
    x = lin.input_quantizer(x_raw)  # float input as the weights see it (reparameterised if any)
    q.enabled = True
    x_q = lin.input_quantizer(x_raw)
    w0 = lin.weight.detach().clone()
    b0 = None if lin.bias is None else lin.bias.detach().clone()
    y = x @ w0.T + (0 if b0 is None else b0)
    set_weight_range(lin, config.w_quantiles)
    err_rtn = _output_mse(lin, x_q, y)
    w, b = w0, b0
    if config.use_aqer:
        w, b = aqer(w0, b0, x_q, y, config.aqer_lambda if aqer_lambda is None else aqer_lambda)
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(b)
        else:
            lin.bias.copy_(b)
        set_weight_range(lin, config.w_quantiles)  # weight quantizer on the updated weights
    if config.use_wqer:
        wq = lin.weight_quantizer
        m = w.shape[0]
        grid = RowGrid(wq.scale.reshape(-1).expand(m) if wq.scale.numel() == 1 else wq.scale.reshape(-1),
                       wq.zero_point.reshape(-1).expand(m) if wq.zero_point.numel() == 1 else wq.zero_point.reshape(-1),
                       wq.qmin, wq.qmax)
        w, b = wqer(w, x_q, grid, config.wqer_lambda, config.max_flips, config.row_group, bias=lin.bias)
        lin.weight.copy_(w)
        if lin.bias is not None:
            lin.bias.copy_(b)
    err = _output_mse(lin, x_q, y)
    fallback = config.rtn_fallback and err > err_rtn
    if fallback:  # the ridge steps can overshoot on a tiny calibration set: keep RTN for this layer
        _restore_rtn(lin, w0, b0, config)
        logger.debug("erq: output error %.3g > RTN's %.3g; layer kept at RTN", err, err_rtn)
        err = _output_mse(lin, x_q, y)
    return {"mse_rtn": err_rtn, "mse_erq": err, "kept_rtn": fallback}


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
    set_weight_range(lin, config.w_quantiles)
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
    groups = [[n for n in g.names if isinstance(mods[n], QuantLinear)] for g in linear_groups(model)]
    groups = [g for g in groups if g]
    with eval_mode(model), torch.no_grad():
        firsts = [g[0] for g in groups]
        ndims = _input_ndims(model, mods, firsts, batches[0])
        cached = _float_inputs(model, mods, firsts, batches, config, gen) if config.cache == "float" else {}
        for names in tqdm(groups, desc="erq layers", disable=not progress, leave=False):
            x_raw = (cached.pop(names[0]) if config.cache == "float" else
                     capture_inputs(model, {names[0]: mods[names[0]]}, batches, config.max_tokens, gen)[names[0]])
            lam = config.head_aqer_lambda if ndims.get(names[0]) == 2 else config.aqer_lambda
            for n in names:
                stats = erq_linear(mods[n], x_raw, config, aqer_lambda=lam)
                logger.debug("erq %s: output mse %.3g (rtn) -> %.3g", n, stats["mse_rtn"], stats["mse_erq"])
            del x_raw
