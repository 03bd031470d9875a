"""The PTQ methods' defaults follow their official code (issue 14): one test per closed deviation, each
against an independent computation (docs/quantization.md, "Paper, official code and s2d")."""
from __future__ import annotations

import pytest
import torch

from ptq_models import tiny_bert, text_batches
from s2d.quant import QuantConfig, QuantLinear, quantize_model
from s2d.quant.primitives import int_range
from s2d.quant.ptq.erq_math import RowGrid, wqer
from s2d.quant.quantizers import UniformQuantizer
from s2d.quant.reparam import channel_affine_from_ranges


def test_unconstrained_channel_range_keeps_its_own_step():
    """A same-sign channel in [3, 8] at 4 bits: step 5/15 = 0.333 unconstrained (RepQ-ViT's code), 8/15 =
    0.533 when the range must include 0; the unconstrained grid spans [3, 8] exactly."""
    free, with_zero = (UniformQuantizer(4, False, include_zero=z) for z in (False, True))
    for q in (free, with_zero):
        q.set_range(torch.tensor([3.0]), torch.tensor([8.0]))
    assert float(free.scale) == pytest.approx(5 / 15) and float(with_zero.scale) == pytest.approx(8 / 15)
    torch.manual_seed(0)
    x = 3 + 5 * torch.rand(1001)  # random: no value exactly half-way between two levels
    levels = 3 + torch.arange(16) * (5 / 15)  # brute force: the nearest of the 16 levels
    nearest = levels[(x[:, None] - levels[None]).abs().argmin(1)]
    torch.testing.assert_close(free(x), nearest, atol=1e-5, rtol=0)
    assert float((free(x) - x).abs().max()) <= 5 / 30 + 1e-6


def test_unconstrained_reparameterisation_keeps_the_channel_steps():
    """RepQ's per-channel -> per-tensor map with same-sign channels: through the per-tensor quantizer on
    x' = x / r + s, each channel keeps its own step (hi_c − lo_c) / 15 (the per-tensor zero point is
    rounded once, which may shift a channel's grid by up to half a step), so its error stays below one
    step; with the range forced to include 0, channel 0 ([3, 8]) would have step 8/15."""
    lo, hi = torch.tensor([3.0, -1.0, 0.5]), torch.tensor([8.0, 2.0, 0.9])
    aff = channel_affine_from_ranges(lo, hi, 4, include_zero=False)
    q = UniformQuantizer(4, False, include_zero=False)
    q.set_range(torch.tensor([aff.lo]), torch.tensor([aff.hi]))
    torch.manual_seed(0)
    x = lo + (hi - lo) * torch.rand(500, 3)
    back = (q(x / aff.r + aff.shift) - aff.shift) * aff.r
    step = (hi - lo) / 15
    assert torch.all((back - x).abs().amax(0) <= step + 1e-5)
    assert float(step[0]) == pytest.approx(5 / 15) and float((back - x).abs()[:, 0].max()) < (8 / 15) / 2 + 5 / 30


@pytest.mark.parametrize("method", ["repq", "erq"])
def test_repq_and_erq_weights_are_asymmetric_per_channel(method):
    """Every weight row on its own asymmetric grid (codes 0..15 with a zero point), as the official code."""
    torch.manual_seed(0)
    model = tiny_bert()
    quantize_model(model, QuantConfig(4, 4), method=method, calib=text_batches(), progress=False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            wq = m.weight_quantizer
            assert (wq.symmetric, wq.qmin, wq.qmax, wq.granularity) == (False, 0, 15, "channel")
            w = wq(m.weight.detach())
            codes = w / wq.scale[:, None] + wq.zero_point[:, None]
            torch.testing.assert_close(codes, codes.round().clamp(0, 15), atol=1e-3, rtol=0)


def test_ptq4vit_codes_and_qkv_granularity():
    """Full signed codes [-8, 7] at 4 bits; separate q, k, v Linears get one weight scale each (the official
    fused qkv has one per q / k / v block)."""
    assert int_range(4, True, narrow=False) == (-8, 7) and int_range(4, True) == (-7, 7)
    torch.manual_seed(0)
    model = tiny_bert()
    from s2d.quant import PTQ4ViTConfig
    quantize_model(model, QuantConfig(4, 4), method="ptq4vit", calib=text_batches(),
                   config=PTQ4ViTConfig(n_candidates=4, rounds=1), progress=False)
    qkv = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.endswith(("query", "key", "value"))]
    assert qkv
    for m in qkv:
        assert m.weight_quantizer.granularity == "tensor" and m.weight_quantizer.scale.numel() == 1
        assert (m.weight_quantizer.qmin, m.weight_quantizer.qmax) == (-8, 7)
        w = m.weight_quantizer(m.weight.detach()) / m.weight_quantizer.scale
        assert float(w.min()) >= -8 - 1e-4 and float(w.max()) <= 7 + 1e-4


def test_wqer_compensates_the_bias():
    """One weight column and a bias: the column is rounded, then the bias absorbs the mean output error
    by the closed-form ridge step δb = −Σx·δ1 / (N + λ) (the official code's bias column)."""
    torch.manual_seed(0)
    w, b, x = torch.randn(5, 1), torch.randn(5), torch.rand(200, 1) + 0.5
    grid = RowGrid(torch.full((5,), 0.3), torch.zeros(5), -7, 7)
    lam = 3.0
    wq, bq = wqer(w, x, grid, lam, refine=False, bias=b)
    delta1 = (torch.round(w / 0.3).clamp(-7, 7) * 0.3 - w).reshape(-1)
    torch.testing.assert_close(wq, (w.reshape(-1) + delta1)[:, None], atol=1e-6, rtol=0)
    torch.testing.assert_close(bq, b - x.sum() * delta1 / (x.shape[0] + lam), atol=1e-5, rtol=0)
