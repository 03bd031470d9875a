"""ERQ post-training quantization (Zhong et al., ICML 2024), on RepQ-ViT's quantizers.

1. RepQ-ViT calibration of every activation quantizer (weights still float), including the post-LN
   reparameterisation (``s2d.quant.ptq.repq``).
2. Then, Linear group by Linear group in forward order (groups = Linears reading the same tensor),
   with every earlier Linear already final: record the group's input X on the calibration samples
   (only this group's tokens are cached: memory is one layer's X, at most ``max_tokens`` rows), and per
   Linear with X̃ = its input quantizer applied to X and Y = X Wᵀ + b:
   - Aqer: [W b] += δᵀ with δ = (X̃ᵀX̃ + λ_a I)⁻¹ X̃ᵀ (Y − X̃ [W b]ᵀ)  (ridge regression; a bias is
     created if the Linear had none);
   - the weight quantizer is calibrated on the updated weight (per-channel quantile/MSE search);
   - Wqer: half of the still-float input columns at a time are rounded onto that grid with rounding
     refinement (≤ ``max_flips`` greedy floor/ceil flips per row lowering δ1ᵀ(μμᵀ+Σ)δ1) and the
     remaining float columns are compensated by ridge regression δ2 = −(X̃₂ᵀX̃₂ + λ_w I)⁻¹ X̃₂ᵀX̃₁δ1ᵀ.
   The final weight lies exactly on the weight quantizer's grid.  A layer whose output error on the
   calibration data ends above RTN's (the ridge steps can overshoot on few samples) keeps RTN.

X comes from the model as quantized so far (the paper's "float input" of the layer in the progressively
quantized network), Y from the same X with float weights and an unquantized input, so each Linear
corrects its own activation and weight error. λ: the papers' ≈ 1e3 for token inputs, absolute (it is
not rescaled with the number of tokens); columns are taken in index order.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.quant.api import register_method
from s2d.quant.config import QuantConfig
from s2d.quant.linear import QuantLinear
from s2d.quant.ptq.common import capture_inputs, linear_groups
from s2d.quant.ptq.erq_math import RowGrid, aqer, wqer
from s2d.quant.ptq.repq import RepQConfig, input_quantizer, repq_calibrate, set_weight_range
from s2d.utils import eval_mode

logger = logging.getLogger(__name__)

__all__ = ["ERQConfig", "erq", "erq_linear"]


@dataclass(frozen=True)
class ERQConfig:
    """ERQ hyperparameters (paper / public-code defaults)."""

    aqer_lambda: float = 1e3        # Aqer ridge strength λ_a, > 0 (absolute, not rescaled by token count)
    wqer_lambda: float = 1e3        # Wqer ridge strength λ_w, > 0
    max_flips: int = 100            # rounding-refinement flips per row, >= 0 (0 = round to nearest)
    row_group: int = 500            # weight rows refined together (bounds memory), >= 1
    use_aqer: bool = True           # run Aqer (False: ablation)
    use_wqer: bool = True           # run Wqer (False: ablation)
    quantiles: tuple[float, ...] = (1.0, 0.99999, 0.9999, 0.999)  # as RepQConfig.quantiles
    num_samples: int = 32           # as RepQConfig.num_samples
    max_tokens: int | None = 16384  # rows of X cached for one layer (and RepQ's token budget), None or >= 16
    seed: int = 0                   # seed of the token subsampling (RepQ step: seed, ERQ step: seed + 1)

    def __post_init__(self) -> None:
        for f in ("aqer_lambda", "wqer_lambda"):
            if not getattr(self, f) > 0:
                raise ValueError(f"ERQConfig.{f} must be > 0, got {getattr(self, f)!r}")
        if not isinstance(self.max_flips, int) or self.max_flips < 0:
            raise ValueError(f"ERQConfig.max_flips must be an int >= 0, got {self.max_flips!r}")
        if not isinstance(self.row_group, int) or self.row_group < 1:
            raise ValueError(f"ERQConfig.row_group must be an int >= 1, got {self.row_group!r}")
        self.repq_config()  # validates quantiles, num_samples, max_tokens

    def repq_config(self) -> RepQConfig:
        """The RepQ-ViT settings of step 1."""
        return RepQConfig(quantiles=self.quantiles, num_samples=self.num_samples,
                          max_tokens=self.max_tokens, seed=self.seed)


@torch.no_grad()
def erq_linear(lin: QuantLinear, x_raw: torch.Tensor, config: ERQConfig) -> dict:
    """Aqer + weight calibration + Wqer for one QuantLinear given its recorded raw input (N, in).

    The input quantizer must be calibrated. Returns the layer's output MSE vs Y = XWᵀ+b before
    (RTN weights, quantized input) and after.
    """
    q = input_quantizer(lin)
    q.enabled = False
    x = lin.input_quantizer(x_raw)  # float input as the weights see it (reparameterised if any)
    q.enabled = True
    x_q = lin.input_quantizer(x_raw)
    w0 = lin.weight.detach().clone()
    b0 = None if lin.bias is None else lin.bias.detach().clone()
    y = x @ w0.T + (0 if b0 is None else b0)
    set_weight_range(lin, config.quantiles)
    err_rtn = _output_mse(lin, x_q, y)
    w, b = w0, b0
    if config.use_aqer:
        w, b = aqer(w0, b0, x_q, y, config.aqer_lambda)
        lin.weight.copy_(w)
        if lin.bias is None:
            lin.bias = nn.Parameter(b)
        else:
            lin.bias.copy_(b)
        set_weight_range(lin, config.quantiles)  # weight quantizer on the updated weights
    if config.use_wqer:
        wq = lin.weight_quantizer
        m = w.shape[0]
        grid = RowGrid(wq.scale.reshape(-1).expand(m) if wq.scale.numel() == 1 else wq.scale.reshape(-1),
                       wq.zero_point.reshape(-1).expand(m) if wq.zero_point.numel() == 1 else wq.zero_point.reshape(-1),
                       wq.qmin, wq.qmax)
        w = wqer(w, x_q, grid, config.wqer_lambda, config.max_flips, config.row_group)
        lin.weight.copy_(w)
    err = _output_mse(lin, x_q, y)
    fallback = err > err_rtn
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
    set_weight_range(lin, config.quantiles)
    lin.weight.copy_(lin.weight_quantizer(w0))


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
        for names in tqdm(groups, desc="erq layers", disable=not progress, leave=False):
            x_raw = capture_inputs(model, {names[0]: mods[names[0]]}, batches, config.max_tokens, gen)[names[0]]
            for n in names:
                stats = erq_linear(mods[n], x_raw, config)
                logger.debug("erq %s: output mse %.3g (rtn) -> %.3g", n, stats["mse_rtn"], stats["mse_erq"])
            del x_raw
