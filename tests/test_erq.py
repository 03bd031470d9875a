"""ERQ: ridge-regression Aqer vs a closed form, rounding refinement vs brute force, Wqer, whole models."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

from ptq_models import MODELS, logits
import s2d.quant.ptq.erq as erq_mod
from s2d.quant import ERQConfig, QuantConfig, QuantLinear, quantize_model
from s2d.quant.ptq.erq import erq_linear
from s2d.quant.ptq.erq_math import RowGrid, aqer, refine_rounding, ridge_solve, wqer
from s2d.quant.ptq.repq import set_weight_range
from s2d.quant.quantizers import UniformQuantizer


def _layer_data(n=400, d_in=24, d_out=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.6 * torch.randn(d_in, d_in, generator=g) / d_in**0.5  # correlated inputs
    x = (torch.randn(n, d_in, generator=g) * torch.linspace(0.3, 3.0, d_in)) @ mix + 0.5
    w = torch.randn(d_out, d_in, generator=g) * 0.2
    b = torch.randn(d_out, generator=g) * 0.1
    return x, w, b


def _act_quant(x, bits=4):
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero) * step


def _grid(w, bits=4):
    qmax = 2 ** (bits - 1) - 1
    return RowGrid(w.abs().amax(1) / qmax, torch.zeros(w.shape[0]), -qmax, qmax)


def test_ridge_solve_matches_augmented_least_squares():
    a, rhs = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    lam = 2.5
    aug_a = torch.cat([a, lam**0.5 * torch.eye(6, dtype=torch.float64)])
    aug_r = torch.cat([rhs, torch.zeros(6, 3, dtype=torch.float64)])
    torch.testing.assert_close(ridge_solve(a, rhs, lam), torch.linalg.lstsq(aug_a, aug_r).solution)


@pytest.mark.parametrize("lam", [1e-3, 10.0, 1e3])
def test_aqer_closed_form_and_lower_error_than_rtn(lam):
    x, w, b = _layer_data()
    xq, y = _act_quant(x), x @ w.T + b
    w2, b2 = aqer(w, b, xq, y, lam)
    # closed form: [W b] + ((X̃ᵀX̃ + λI)⁻¹ X̃ᵀ (Y − X̃[W b]ᵀ))ᵀ with X̃ = [xq 1], via numpy-free normal equations
    xa = torch.cat([xq, torch.ones(len(xq), 1)], 1).double()
    wb = torch.cat([w, b[:, None]], 1).double()
    delta = torch.linalg.solve(xa.T @ xa + lam * torch.eye(xa.shape[1], dtype=torch.float64),
                               xa.T @ (y.double() - xa @ wb.T))
    torch.testing.assert_close(torch.cat([w2, b2[:, None]], 1).double(), wb + delta.T, atol=1e-5, rtol=1e-5)
    err_rtn = (xq @ w.T + b - y).pow(2).mean()
    err_aqer = (xq @ w2.T + b2 - y).pow(2).mean()
    assert err_aqer < err_rtn


def _proxy(delta, h):
    return torch.einsum("rk,kl,rl->r", delta, h, delta)


def test_rounding_refinement_vs_brute_force_and_rtn():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    xs = torch.randn(200, 5, generator=g, dtype=torch.float64) + 1.0
    h = xs.T @ xs / len(xs)  # μμᵀ + Σ (biased) = E[x xᵀ]
    grid = _grid(w, bits=3)
    q_ref = refine_rounding(w, grid, h).double()
    rtn = grid.dequant(grid.codes(w).round().clamp(grid.qmin, grid.qmax))
    p_ref, p_rtn = _proxy(q_ref - w, h), _proxy(rtn - w, h)
    assert torch.all(p_ref <= p_rtn + 1e-12)
    assert torch.any(p_ref < p_rtn - 1e-9)
    # brute force over every floor/ceil choice per row: greedy is between the optimum and RTN
    v = grid.codes(w)
    for r in range(w.shape[0]):
        best = float("inf")
        for bits in itertools.product((0, 1), repeat=w.shape[1]):
            codes = torch.floor(v[r]) + torch.tensor(bits, dtype=torch.float64)
            codes = codes.clamp(grid.qmin, grid.qmax)
            d = (codes - grid.zero[r]) * grid.scale[r] - w[r]
            best = min(best, float(d @ h @ d))
        assert best - 1e-12 <= float(p_ref[r]) <= float(p_rtn[r]) + 1e-12
    # every value stays on the grid and within one step of w
    codes = grid.codes(q_ref)
    torch.testing.assert_close(codes, codes.round(), atol=1e-9, rtol=0)
    assert torch.all((q_ref - w).abs() <= grid.scale[:, None] * (1 + 1e-9))


def test_refinement_respects_the_flip_budget():
    w = torch.randn(4, 40, dtype=torch.float64)
    xs = torch.randn(300, 40, dtype=torch.float64) + 2.0
    grid = _grid(w)
    rtn_codes = grid.codes(w).round().clamp(grid.qmin, grid.qmax)
    for budget in (0, 3):
        q = refine_rounding(w, grid, xs.T @ xs / 300, max_flips=budget)
        assert int((grid.codes(q).round() != rtn_codes).sum(1).max()) <= budget


def test_wqer_on_grid_and_lower_error_than_rtn():
    x, w, _ = _layer_data(d_in=32)
    xq = _act_quant(x)
    grid = _grid(w)
    wf = wqer(w, xq, grid, lam=1.0)
    codes = grid.codes(wf)
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    rtn = grid.dequant(grid.codes(w).round().clamp(grid.qmin, grid.qmax)).float()
    err = lambda ww: float((xq @ ww.T - xq @ w.T).pow(2).mean())  # noqa: E731
    assert err(wf) < 0.8 * err(rtn)
    assert err(wqer(w, xq, grid, lam=1.0, refine=False)) < err(rtn)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_erq_every_layer_beats_rtn_and_weights_are_on_grid(arch, monkeypatch):
    make, data = MODELS[arch]
    model, batches = make(), data()
    stats = []
    real = erq_mod.erq_group
    monkeypatch.setattr(erq_mod, "erq_group", lambda lins, x, cfg, **kw: stats.extend(real(lins, x, cfg, **kw)) or stats[-len(lins):])
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="erq", calib=batches, progress=False)
    assert len(stats) == sum(isinstance(m, QuantLinear) for m in model.modules())
    for s in stats:  # the layer's output error on its own calibration data
        assert s["mse_erq"] <= s["mse_rtn"] * (1 + 1e-6), s
    assert sum(s["mse_erq"] for s in stats) < sum(s["mse_rtn"] for s in stats)
    for m in model.modules():
        if isinstance(m, QuantLinear):  # Wqer leaves weights exactly on the weight quantizer's grid
            torch.testing.assert_close(m.weight_quantizer(m.weight), m.weight, atol=1e-6, rtol=1e-5)


def test_erq_beats_rtn_on_model_output():
    make, data = MODELS["vit"]
    model, batches = make(), data()
    ref = logits(model, batches[0])
    errs = {}
    for method in ("rtn", "erq"):
        m = copy.deepcopy(model)
        quantize_model(m, QuantConfig(4, 4), method=method, calib=batches, progress=False)
        errs[method] = float((logits(m, batches[0]) - ref).pow(2).mean())
    assert errs["erq"] < errs["rtn"]


def test_erq_is_deterministic_and_bounds_cached_tokens(monkeypatch):
    make, data = MODELS["bert"]
    seen = []
    real = erq_mod.erq_group
    monkeypatch.setattr(erq_mod, "erq_group", lambda lins, x, cfg, **kw: seen.append(x.shape[0]) or real(lins, x, cfg, **kw))
    outs = []
    for _ in range(2):
        model = make()
        quantize_model(model, QuantConfig(4, 4), method="erq", calib=data(), config=ERQConfig(max_tokens=40),
                       progress=False)
        outs.append(logits(model, data()[0]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert max(seen) == 40


@pytest.mark.parametrize("kwargs,field", [({"aqer_lambda": 0.0}, "aqer_lambda"), ({"max_flips": -1}, "max_flips"),
                                          ({"row_group": 0}, "row_group"), ({"num_samples": 0}, "num_samples")])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ERQConfig(**kwargs)


def test_layer_falls_back_to_rtn_when_erq_is_worse(monkeypatch):
    """A (forced) overshooting Aqer: the layer must end exactly at RTN (weights on the RTN grid, bias
    restored) and report RTN's output error, recomputed here independently."""
    x, w, b = _layer_data()
    lin = torch.nn.Linear(24, 12)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    aq = UniformQuantizer(4)
    aq.set_range(x.min().reshape(1), x.max().reshape(1))
    QuantLinear.from_linear(lin, aq, UniformQuantizer(4, True, "channel", axis=0))
    monkeypatch.setattr(erq_mod, "aqer", lambda w, b, xq, y, lam: (w * 3.0, b - 1.0))  # a bad "ridge" step
    cfg = ERQConfig(rtn_fallback=True)  # s2d 0.1's safeguard, off by default (the official code has none)
    stats = erq_linear(lin, x, cfg)
    ref = torch.nn.Linear(24, 12)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    QuantLinear.from_linear(ref, aq, UniformQuantizer(4, True, "channel", axis=0))
    set_weight_range(ref, cfg.w_quantiles)
    w_rtn = ref.weight_quantizer(w)
    assert stats["kept_rtn"]
    torch.testing.assert_close(lin.weight.detach(), w_rtn, atol=1e-6, rtol=0)
    torch.testing.assert_close(lin.bias.detach(), b)
    err_rtn = float((aq(x) @ w_rtn.T + b - (x @ w.T + b)).pow(2).mean())
    assert stats["mse_erq"] == pytest.approx(err_rtn, rel=1e-5) and stats["mse_rtn"] == pytest.approx(err_rtn, rel=1e-5)


def test_erq_recovers_layer_output_better_than_rtn_on_same_data():
    """Aqer + Wqer on one layer lower the output error vs RTN's (no fallback involved)."""
    x, w, b = _layer_data(n=600, d_in=32, d_out=16)
    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    aq = UniformQuantizer(4)
    aq.set_range(x.min().reshape(1), x.max().reshape(1))
    QuantLinear.from_linear(lin, aq, UniformQuantizer(4, True, "channel", axis=0))
    stats = erq_linear(lin, x, ERQConfig(aqer_lambda=1.0, wqer_lambda=1.0))
    assert not stats["kept_rtn"]
    err = float((aq(x) @ lin.weight_quantizer(lin.weight.detach()).T + lin.bias.detach() - (x @ w.T + b)).pow(2).mean())
    assert err == pytest.approx(stats["mse_erq"], rel=1e-5)
    assert err < 0.8 * stats["mse_rtn"]
