"""The PTQ methods' defaults follow their official code (issue 14): one test per closed deviation, each
against an independent computation (docs/quantization.md, "Paper, official code and s2d")."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ptq_models import tiny_bert, text_batches
from s2d.models import blocks
from s2d.quant import ERQConfig, QuantConfig, QuantLinear, quantize_model
from s2d.quant.primitives import int_range
from s2d.quant.ptq.erq_math import RowGrid, wqer
from s2d.quant.quantizers import UniformQuantizer
from s2d.quant.reparam import channel_affine_from_ranges
from s2d.quant.twopart import TwoPartQuantizer, outlier_columns


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
            scale, zp = (wq.element_params(w.shape) if isinstance(wq, TwoPartQuantizer)
                         else (wq.scale[:, None], wq.zero_point[:, None]))
            codes = w / scale + zp
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


def _planted_outlier_weight(m: int = 60, n: int = 48, cols: tuple[int, ...] = (5, 17, 30)) -> torch.Tensor:
    """Gaussian weight (m, n) whose columns ``cols`` are 12x larger in every row."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(m, n, generator=g) * 0.05
    w[:, list(cols)] *= 12
    return w


def test_outlier_columns_match_numpy_percentile_count():
    """Brute force of the official rule: per row, np.percentile(positives, 99) / (negatives, 1), then the
    m // 20 columns counted in the most rows (Counter.most_common)."""
    w = _planted_outlier_weight()
    counts = Counter()
    for row in w.numpy().astype(np.float64):
        hi, lo = np.percentile(row[row > 0], 99), np.percentile(row[row < 0], 1)
        counts.update(np.nonzero((row > hi) | (row < lo))[0].tolist())
    expect = sorted(c for c, _ in counts.most_common(w.shape[0] // 20))
    assert outlier_columns(w).tolist() == expect == [5, 17, 30]


def test_two_part_levels_and_error_on_planted_outlier_columns():
    """Each row's outlier columns and other columns round to the nearest of their own 16 levels (brute
    force), and the other columns' error is far below one per-row grid stretched over the outliers."""
    w = _planted_outlier_weight()
    q = TwoPartQuantizer(4)
    q.observe(w)
    q.finalize()
    assert q.columns.tolist() == [5, 17, 30]
    out = q(w)
    mask = q.column_mask(w.shape[1])
    for part, cols in ((0, ~mask), (1, mask)):
        vals = w[:, cols]
        lo, hi = vals.amin(1, keepdim=True), vals.amax(1, keepdim=True)
        step = (hi - lo) / 15  # min-max range, not widened to 0; zero point round(-lo / step), unclamped
        levels = (torch.arange(16) - torch.round(-lo / step)) * step  # (m, 16)
        nearest = levels.gather(1, (vals[:, :, None] - levels[:, None, :]).abs().argmin(2))
        torch.testing.assert_close(out[:, cols], nearest, atol=1e-6, rtol=1e-5)
    single = UniformQuantizer(4, False, "channel", include_zero=False)
    single.observe(w)
    single.finalize()
    err = lambda y: float((y - w)[:, ~mask].pow(2).mean())  # noqa: E731
    assert err(out) < 0.05 * err(single(w))


def test_erq_two_part_on_qkv_and_fc1_only_with_joint_columns():
    """ERQ's default gives q/k/v and fc1 the two-part quantizer, q, k and v the same outlier columns (the
    official fused qkv), every other Linear a plain per-row grid; Wqer leaves weights on the grids."""
    torch.manual_seed(0)
    model = tiny_bert()
    quantize_model(model, QuantConfig(4, 4), method="erq", calib=text_batches(), progress=False)
    mods = dict(model.named_modules())
    for b in blocks(model):
        qkv = [mods[n].weight_quantizer for n in b.qkv]
        assert all(isinstance(q, TwoPartQuantizer) for q in qkv + [mods[n].weight_quantizer for n in b.fc1])
        assert all(torch.equal(q.columns, qkv[0].columns) for q in qkv)
        assert not isinstance(mods[b.attn_out].weight_quantizer, TwoPartQuantizer)
        assert not isinstance(mods[b.fc2].weight_quantizer, TwoPartQuantizer)
    plain = tiny_bert()
    quantize_model(plain, QuantConfig(4, 4), method="erq", calib=text_batches(),
                   config=ERQConfig(two_part=False), progress=False)
    assert not any(isinstance(m, TwoPartQuantizer) for m in plain.modules())


def test_two_part_state_dict_round_trip():
    w = _planted_outlier_weight()
    q = TwoPartQuantizer(4)
    q.observe(w)
    q.finalize()
    fresh = TwoPartQuantizer(4)
    fresh.load_state_dict(q.state_dict())
    assert fresh.calibrated and torch.equal(fresh(w), q(w))


def test_log_sqrt2_delta_from_quantile_candidates():
    """RepQ-ViT's code: Δ is the quantile(p), p ∈ {0.999, 0.9999, 0.99999}, whose log-√2 grid has the lowest
    MSE; brute force with numpy's percentile and an explicit level list."""
    from s2d.quant.nonuniform import LogSqrt2Quantizer
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(64, 50) * 3, -1).reshape(-1)
    q = LogSqrt2Quantizer(4, quantiles=(0.999, 0.9999, 0.99999))
    q.observe(x)
    q.finalize()
    xs = x.double().numpy()

    def mse(delta: float) -> float:  # nearest of the 16 levels Δ·2^(-c/2) on the log2 scale, or 0 past the last
        codes = np.clip(np.round(-2 * np.log2(np.maximum(xs, 1e-300) / delta)), 0, None)
        levels = np.where(codes > 15, 0.0, delta * 2.0 ** (-np.ceil(codes / 2)) * (1 + (np.sqrt(2) - 1) * (codes % 2)))
        return float(np.mean((levels - xs) ** 2))

    cands = [float(np.percentile(xs, 100 * p)) for p in (0.999, 0.9999, 0.99999)]
    errs = [mse(c) for c in cands]
    assert float(q.delta) == pytest.approx(cands[int(np.argmin(errs))], rel=1e-5)
    assert mse(float(q.delta)) < mse(float(x.max()))  # the quantile beats the plain maximum here


def test_ptq4vit_matmul_search_scores_the_output_per_head():
    """The official matmul search: A's per-head step first (B at its initial step), then B's (A at its new
    step), each the candidate with the lowest g-weighted error of the matmul *output*; brute force with
    per-tensor quantizer modules, head by head."""
    from s2d.quant.ptq.ptq4vit_search import search_matmul, set_sym
    torch.manual_seed(0)
    a, b = torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    b[:, 1] *= 5
    g = torch.rand(2, 2, 6, 6)
    product = lambda x, y: x @ y.transpose(-1, -2)  # noqa: E731
    # not max / 7.5: there the extreme value sits exactly half-way between two codes, where x / Δ and x · (1/Δ)
    # may round differently
    init = {n: x.abs().amax(dim=(0, 2, 3)) / 7.3 for n, x in (("a", a), ("b", b))}
    qa, qb = (UniformQuantizer(4, True, "channel", axis=1, narrow=False) for _ in range(2))
    set_sym(qa, init["a"])
    set_sym(qb, init["b"])
    factors = [0.4, 0.6, 0.8, 1.1]
    search_matmul(qa, qb, a, b, g, product, factors, rounds=1, softmax_k_max=0)

    def fq(x: torch.Tensor, step: float) -> torch.Tensor:
        q = UniformQuantizer(4, True, "tensor", narrow=False)
        q.set_range(torch.tensor([-7 * step]), torch.tensor([7 * step]))
        return q(x)

    def best(h: int, steps: list[float], err) -> float:  # first minimum wins, as the search
        errs = [err(s) for s in steps]
        return steps[errs.index(min(errs))]

    for h in range(2):
        ref = a[:, h] @ b[:, h].transpose(-1, -2)
        e = lambda out: float((g[:, h] * (out - ref)).pow(2).mean())  # noqa: E731
        steps_a = [float(init["a"][h])] + [float(init["a"][h]) * f for f in factors]
        sa = best(h, steps_a, lambda s: e(fq(a[:, h], s) @ fq(b[:, h], float(init["b"][h])).transpose(-1, -2)))
        steps_b = [float(init["b"][h])] + [float(init["b"][h]) * f for f in factors]
        sb = best(h, steps_b, lambda s: e(fq(a[:, h], sa) @ fq(b[:, h], s).transpose(-1, -2)))
        assert float(qa.scale[h]) == pytest.approx(sa, rel=1e-5)
        assert float(qb.scale[h]) == pytest.approx(sb, rel=1e-5)
