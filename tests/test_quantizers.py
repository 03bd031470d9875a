"""Quantizers vs independent computations: hand-computed affine formulas, torch's own fake-quant ops,
closed-form log-sqrt2 / twin-uniform grids, autograd for the STE, a brute-force MSE clipping search,
and config / bit-setting validation."""
import math
import re

import pytest
import torch

from s2d.quant import Bits, QuantConfig, QuantSpec
from s2d.quant.nonuniform import LogSqrt2Quantizer, TwinUniformQuantizer
from s2d.quant.primitives import (best_clipping, check_bits, fake_quant, int_range, kth, quantize_dequantize,
                                  round_ste, scale_zero_point)
from s2d.quant.quantizers import UniformQuantizer


def _calibrated(q, *xs):
    q.calibrating = True
    for x in xs:
        q(x)
    q.calibrating = False
    q.finalize()
    return q


def _hand_asym(x, bits, lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    zp = round(-lo / scale)
    out = []
    for v in x.tolist():
        q = min(max(round(v / scale) + zp, 0), 2**bits - 1)  # Python round = half to even, like torch
        out.append((q - zp) * scale)
    return torch.tensor(out, dtype=torch.float64)


def _hand_sym(x, bits, amax):
    scale, qmax = amax / (2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return torch.tensor([min(max(round(v / scale), -qmax), qmax) * scale for v in x.tolist()], dtype=torch.float64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_tensor_matches_hand_computation(bits):
    x = torch.randn(257, dtype=torch.float64) * 3 + 0.5
    ref_a = _hand_asym(x, bits, float(x.min()), float(x.max()))
    ref_s = _hand_sym(x, bits, float(x.abs().max()))
    torch.testing.assert_close(quantize_dequantize(x, bits, symmetric=False), ref_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(quantize_dequantize(x, bits, symmetric=True), ref_s, rtol=0, atol=1e-12)


def test_known_values_4bit_asymmetric():
    # range [-1, 2]: scale 0.2, zero point 5 -> 0.29 -> 1 step -> 0.2; -0.31 -> round(-1.55)=-2 -> -0.4
    x = torch.tensor([-1.0, -0.31, 0.0, 0.29, 0.5, 2.0], dtype=torch.float64)
    out = quantize_dequantize(x, 4, symmetric=False)
    torch.testing.assert_close(out, torch.tensor([-1.0, -0.4, 0.0, 0.2, 0.4, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch_fake_quantize(bits, symmetric):
    x = torch.randn(64, 48) * 2 + 0.3
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        scale, zp = max(-lo, hi) / qmax, 0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / qmax
        zp = int(round(-lo / scale))
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    # torch multiplies by 1/scale, we divide: a half-way tie can flip by one step on rare elements
    diff = (quantize_dequantize(x, bits, symmetric) - ref).abs()
    assert (diff > 1e-5).float().mean() < 1e-3 and diff.max() <= scale * 1.0001


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_any_axis_matches_torch(axis, symmetric):
    bits = 4
    x = torch.randn(5, 6, 7) * torch.linspace(0.1, 3, 7)
    ax = axis % x.ndim
    rows = x.movedim(ax, 0).reshape(x.shape[ax], -1)
    lo, hi = rows.min(1).values.clamp(max=0), rows.max(1).values.clamp(min=0)
    if symmetric:
        qmin, qmax = -7, 7
        scale, zp = torch.maximum(-lo, hi) / qmax, torch.zeros(x.shape[ax], dtype=torch.int32)
    else:
        qmin, qmax = 0, 15
        scale = (hi - lo) / qmax
        zp = torch.round(-lo / scale).to(torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, ax, qmin, qmax)
    out = quantize_dequantize(x, bits, symmetric, axis=axis)
    diff = (out - ref).abs()
    assert (diff > 1e-5).float().mean() < 1e-2
    # per-channel: every slice along `axis` equals the per-tensor quantization of that slice
    for i in range(x.shape[ax]):
        sl = x.select(ax, i)
        torch.testing.assert_close(out.select(ax, i), quantize_dequantize(sl, bits, symmetric))


def test_per_token_is_per_row_of_last_dim():
    x = torch.randn(2, 5, 16) * torch.arange(1, 6).view(1, 5, 1)
    q = UniformQuantizer(4, symmetric=False, granularity="token")
    out = q(x)  # dynamic: no calibration needed
    for b in range(2):
        for t in range(5):
            torch.testing.assert_close(out[b, t], quantize_dequantize(x[b, t], 4, False))


def test_calibrated_minmax_over_batches_and_levels():
    x1, x2 = torch.rand(100) * 2 - 1, torch.rand(100) * 6 - 2  # overall range [-2, 4]
    q = _calibrated(UniformQuantizer(3, symmetric=False), x1, x2)
    lo, hi = min(float(x1.min()), float(x2.min())), max(float(x1.max()), float(x2.max()))
    assert q.describe()["range"] == pytest.approx([lo, hi])
    y = q(torch.linspace(-5, 7, 1000))
    assert len(torch.unique(y)) == 8  # 2^3 levels, out-of-range values clipped
    torch.testing.assert_close(q(x2), _hand_asym(x2, 3, lo, hi).float())


def test_percentile_range_is_order_statistic():
    x = torch.randn(10000)
    q = _calibrated(UniformQuantizer(8, symmetric=False, range_method="percentile", percentile=0.99), x)
    s = torch.sort(x).values
    assert float(q.hi) == pytest.approx(float(s[math.ceil(0.99 * 10000) - 1]))
    assert float(q.lo) == pytest.approx(float(s[math.ceil(0.01 * 10000) - 1]))


def test_mse_search_beats_minmax_on_heavy_tails():
    x = torch.randn(20000)
    x[:5] = 60.0  # outliers
    mse = _calibrated(UniformQuantizer(4, symmetric=True, range_method="mse"), x)
    mm = _calibrated(UniformQuantizer(4, symmetric=True, range_method="minmax"), x)
    err = lambda q: float((q(x) - x).pow(2).mean())  # noqa: E731
    assert err(mse) < err(mm)
    # brute force: no shrink factor on a fine grid does meaningfully better than the chosen clip
    best = min(float((quantize_dequantize(x.clamp(-60 * a, 60 * a), 4, True) - x).pow(2).mean())
               for a in torch.linspace(0.02, 1, 200).tolist())
    assert err(mse) <= best * 1.5


def test_log_sqrt2_closed_form():
    bits, delta = 4, 1.0
    q = _calibrated(LogSqrt2Quantizer(bits), torch.tensor([1.0, 0.5, 0.25]))
    q.delta = torch.tensor(delta)
    # exact grid points Δ·2^(-c/2), c = 0..15 map to themselves
    grid = torch.tensor([delta * 2 ** (-c / 2) for c in range(16)])
    torch.testing.assert_close(q(grid), grid)
    # closed form on random inputs
    x = torch.rand(500) ** 4
    code = torch.round(-2 * torch.log2(x / delta))
    expected = torch.where(code > 15, torch.zeros_like(x), delta * 2 ** (-code.clamp(0, 15) / 2))
    torch.testing.assert_close(q(x), expected)
    assert float(q(torch.tensor([0.0]))) == 0.0
    assert float(q(torch.tensor([2.0 ** -8.1]))) == 0.0  # code 16 overflows -> 0


def test_log_sqrt2_mse_delta_near_max():
    p = torch.softmax(torch.randn(4, 16, 16) * 3, -1)
    q = _calibrated(LogSqrt2Quantizer(4), p)
    assert 2 ** -2 <= float(q.delta) / float(p.max()) <= 1.0
    assert float((q(p) - p).pow(2).mean()) < float(p.pow(2).mean()) * 0.05


def test_twin_uniform_softmax_grid():
    bits = 4
    q = _calibrated(TwinUniformQuantizer(bits, "softmax"), torch.softmax(torch.randn(8, 32) * 4, -1))
    s = float(q.threshold)
    assert math.log2(s) == int(math.log2(s))  # power of two
    x = torch.rand(2000)
    fine, coarse = s / 7, 1 / 7  # the official matmul.py: codes 0..7 in each range, top codes s and 1.0
    expected = torch.where(x < s, (torch.round(x / fine).clamp(0, 7) * fine), torch.round(x / coarse).clamp(0, 7) * coarse)
    torch.testing.assert_close(q(x), expected)
    assert float(q(torch.ones(1))) == 1.0  # the top code reaches 1.0 (0.875 in s2d 0.1)
    assert len(torch.unique(q(x)[x < s])) <= 8 and len(torch.unique(q(x)[x >= s])) <= 8


def test_twin_uniform_gelu():
    x = torch.nn.functional.gelu(torch.randn(5000) * 3)
    q = _calibrated(TwinUniformQuantizer(6, "gelu"), x)
    y = q(x)
    neg, pos = y[x < 0], y[x >= 0]
    assert len(torch.unique(neg)) <= 33 and len(torch.unique(pos)) <= 32
    # the official fixed negative range: step 0.16997 / 2^(b-1), lowest code GELU's minimum
    assert float(q.neg_step) == pytest.approx(0.16997124254703522 / 32)
    assert float(q(torch.tensor([-5.0, -0.16997124254703522]))[0]) == pytest.approx(-0.16997124254703522)
    assert float((y - x).abs()[x < 0].max()) <= float(q.neg_step) / 2 + 1e-6  # fine negative range
    assert float((y - x).pow(2).mean()) < float((quantize_dequantize(x, 6, True) - x).pow(2).mean())


def test_round_ste_gradient_is_identity():
    x = torch.randn(100, requires_grad=True)
    y = round_ste(x)
    torch.testing.assert_close(y, torch.round(x.detach()))
    g = torch.randn(100)
    y.backward(g)
    torch.testing.assert_close(x.grad, g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_ste_gradient_inside_and_clipped_outside(symmetric):
    q = _calibrated(UniformQuantizer(4, symmetric=symmetric), torch.linspace(-1, 1, 50))
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    q(x).sum().backward()
    s, z = float(q.scale), float(q.zero_point)
    lo, hi = (q.qmin - z) * s, (q.qmax - z) * s  # representable range
    xd = x.detach()
    inside, outside = (xd >= lo) & (xd <= hi), (xd < lo - s) | (xd > hi + s)
    assert inside.sum() > 150 and outside.sum() > 300
    assert torch.all(x.grad[inside] == 1) and torch.all(x.grad[outside] == 0)


def test_learnable_scale_gets_lsq_gradient():
    x = torch.randn(256)
    q = _calibrated(UniformQuantizer(4, symmetric=True, learnable=True), x)
    assert isinstance(q.scale, torch.nn.Parameter)
    s0 = q.scale.detach().clone()
    q(x).pow(2).sum().backward()
    # LSQ: d x̂/ds = round(x/s) - x/s inside the range, ±qmax when clipped; times g = 1/sqrt(N·qmax)
    v = x / s0
    dq = torch.where(v.abs() <= 7, torch.round(v) - v, torch.sign(v) * 7)
    xhat = torch.round(v).clamp(-7, 7) * s0
    expected = (2 * xhat * dq).sum() / math.sqrt(256 * 7)
    torch.testing.assert_close(q.scale.grad.reshape(()), expected.reshape(()), rtol=1e-4, atol=1e-6)


def test_disabled_is_identity_and_state_dict_roundtrip():
    x = torch.randn(3, 8)
    q = _calibrated(UniformQuantizer(3, granularity="channel", axis=1), x)
    q2 = UniformQuantizer(3, granularity="channel", axis=1)
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x), q(x))
    q.enabled = False
    assert q(x) is x


def test_uncalibrated_use_raises():
    with pytest.raises(RuntimeError, match="calibrat"):
        UniformQuantizer(4)(torch.randn(3))


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 1}, "bits"), ({"bits": 17}, "bits"), ({"bits": 4.0}, "bits"),
    ({"granularity": "row"}, "granularity"), ({"range_method": "kl"}, "range_method"),
    ({"percentile": 0.3}, "percentile"),
])
def test_bad_quantizer_args_raise(kwargs, field):
    with pytest.raises(ValueError, match=rf"UniformQuantizer\.{field} must"):
        UniformQuantizer(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"w_bits": 1}, "w_bits"), ({"a_bits": 17}, "a_bits"), ({"w_granularity": "token"}, "w_granularity"),
    ({"a_granularity": "block"}, "a_granularity"), ({"a_range": "entropy"}, "a_range"),
    ({"skip": "classifier"}, "skip"),
])
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field} must"):
        QuantConfig(**kwargs)


def test_other_quantizers_validate():
    with pytest.raises(ValueError, match=r"LogSqrt2Quantizer\.bits must be an int in \[2, 16\]"):
        LogSqrt2Quantizer(1)
    with pytest.raises(ValueError, match=r"TwinUniformQuantizer\.mode must"):
        TwinUniformQuantizer(4, "relu")
    with pytest.raises(ValueError, match=r"quantize_dequantize\.bits"):
        quantize_dequantize(torch.randn(3), 17, True)


@pytest.mark.parametrize("bits", [2, 4, 8, 12])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_inference_fast_path_is_bit_identical_to_torch_kernels(bits, symmetric, granularity):
    x = torch.randn(6, 33, 10) * torch.linspace(0.1, 4, 10) + 0.2
    q = _calibrated(UniformQuantizer(bits, symmetric, granularity, axis=-1), x)
    y = x * 1.3  # partly out of range: clipping included
    zp = q.zero_point.to(torch.int32)
    if granularity == "tensor":
        ref = torch.fake_quantize_per_tensor_affine(y, q.scale.reshape(()), zp.reshape(()), q.qmin, q.qmax)
    else:
        ref = torch.fake_quantize_per_channel_affine(y, q.scale, zp, 2, q.qmin, q.qmax)
    with torch.no_grad():
        out = q(y)
    assert torch.equal(out, ref)
    y.requires_grad_(True)
    assert torch.equal(q(y).detach(), ref)  # the autograd (fused STE kernel) path gives the same values
    if granularity == "tensor":
        with torch.no_grad():
            c, s = q.fast_codes(y)
        assert torch.equal(c * s, ref) and torch.equal(c, c.round())


def test_param_cache_follows_set_range_and_inplace_edits():
    x = torch.randn(500)
    q = _calibrated(UniformQuantizer(4, symmetric=False), x)
    with torch.no_grad():
        a = q(x)
        q.set_range(torch.tensor([-0.5]), torch.tensor([0.5]))
        b = q(x)
        ref_b = torch.fake_quantize_per_tensor_affine(x, 1 / 15, round(0.5 * 15 - 1e-4), 0, 15)  # scale 1/15, zp 7
        q.scale.mul_(2)  # in-place edit of the finalized step
        c = q(x)
    torch.testing.assert_close(b, ref_b)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    ref_c = torch.fake_quantize_per_tensor_affine(x, 2 / 15, 7, 0, 15)
    torch.testing.assert_close(c, ref_c)


def test_fast_codes_declines_when_hooks_or_grad_need_the_module():
    x = torch.randn(64)
    q = _calibrated(UniformQuantizer(4), x)
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    assert q.fast_codes(x) is None
    h.remove()
    assert q.fast_codes(x) is not None
    assert q.fast_codes(x.clone().requires_grad_(True)) is None
    assert _calibrated(UniformQuantizer(4, granularity="channel", axis=0), x[None]).fast_codes(x[None]) is None


# ----------------------------------------------------------------------------- MSE clipping search

def _brute_force_clipping(rows, candidates, bits, symmetric):
    """Row by row, candidate by candidate: the first candidate with the smallest quantization MSE."""
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = [], []
    for r in range(rows.shape[0]):
        best = None
        for c_lo, c_hi in candidates:
            s, z = scale_zero_point(c_lo[r], c_hi[r], bits, symmetric)
            err = float((fake_quant(rows[r], s, z, qmin, qmax) - rows[r]).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, float(c_lo[r]), float(c_hi[r]))
        lo.append(best[1])
        hi.append(best[2])
    return torch.tensor(lo, dtype=rows.dtype), torch.tensor(hi, dtype=rows.dtype)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_best_clipping_matches_brute_force(symmetric, bits):
    g = torch.Generator().manual_seed(bits)
    rows = torch.randn(6, 400, generator=g, dtype=torch.float64) * torch.linspace(0.5, 4, 6, dtype=torch.float64)[:, None]
    rows[0, :3] = 40.0  # outliers: clipping pays off on this row
    rows[3, -2:] = -25.0
    lo, hi = rows.amin(1), rows.amax(1)
    cands = [(lo * a, hi * a) for a in (1.0, 0.8, 0.6, 0.4, 0.2)]
    cands += [(kth(rows, 1 - p), kth(rows, p)) for p in (0.99, 0.999)]
    got_lo, got_hi = best_clipping(rows, cands, bits, symmetric)
    ref_lo, ref_hi = _brute_force_clipping(rows, cands, bits, symmetric)
    torch.testing.assert_close(got_lo, ref_lo, rtol=0, atol=0)
    torch.testing.assert_close(got_hi, ref_hi, rtol=0, atol=0)
    if bits <= 4:
        assert not torch.equal(got_hi, hi)  # some row really clips


def test_best_clipping_first_candidate_wins_ties():
    rows = torch.tensor([[-1.0, 0.5, 2.0], [0.1, 0.2, 0.3]])
    # symmetric scale depends on max(|lo|, |hi|) only: both candidates quantize identically (equal errors)
    first = (torch.tensor([-1.0, -0.1]), torch.tensor([2.0, 0.3]))
    second = (torch.tensor([-2.0, -0.3]), torch.tensor([2.0, 0.3]))
    lo, hi = best_clipping(rows, [first, second], 4, True)
    torch.testing.assert_close(lo, first[0])
    lo, hi = best_clipping(rows, [second, first], 4, True)
    torch.testing.assert_close(lo, second[0])
    with pytest.raises(ValueError, match="candidates"):
        best_clipping(rows, [], 4, True)


def test_mse_range_method_is_best_clipping_over_its_candidates():
    x = torch.randn(4, 3000)
    x[:, :4] *= 30
    q = _calibrated(UniformQuantizer(4, symmetric=False, granularity="channel", axis=0, range_method="mse"), x)
    lo, hi = x.amin(1), x.amax(1)
    cands = [(lo * a, hi * a) for a in torch.linspace(1.0, 0.3, 15).tolist()]
    cands += [(kth(x, 1 - p), kth(x, p)) for p in (0.99, 0.999, 0.9999, 0.99999)]
    ref_lo, ref_hi = _brute_force_clipping(x, cands, 4, False)
    torch.testing.assert_close(q.lo, ref_lo, rtol=0, atol=0)
    torch.testing.assert_close(q.hi, ref_hi, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bit settings, config

@pytest.mark.parametrize("text, bits", [("W4A4", (4, 4)), ("w8a6", (8, 6)), (" W16A2 ", (16, 2)), ("W03A4", (3, 4))])
def test_bits_parse_valid(text, bits):
    b = Bits.parse(text)
    assert b == bits and (b.w, b.a) == bits and isinstance(b, Bits)
    assert b.name == str(b) == f"W{bits[0]}A{bits[1]}"
    assert Bits.parse(b.name) == b


@pytest.mark.parametrize("text, message", [
    ("4/4", r"quant\.bits must look like 'W4A4', got '4/4'"),
    ("W4", r"quant\.bits must look like 'W4A4', got 'W4'"),
    ("A4W4", r"quant\.bits must look like 'W4A4'"),
    (44, r"quant\.bits must look like 'W4A4', got 44"),
    ("W1A4", r"quant\.bits: bit widths must be 2\.\.8 or 16 \(the reference\), got 'W1A4'"),
    ("W4A17", r"quant\.bits: bit widths must be 2\.\.8 or 16 \(the reference\), got 'W4A17'"),
    ("W2A9", r"quant\.bits: bit widths must be 2\.\.8 or 16 \(the reference\), got 'W2A9'"),
    ("W12A8", r"quant\.bits: bit widths must be 2\.\.8 or 16"),
])
def test_bits_parse_invalid(text, message):
    with pytest.raises(ValueError, match=message):
        Bits.parse(text, "quant.bits")


def test_bits_parse_default_field_name():
    with pytest.raises(ValueError, match=r"^bit setting must look like 'W4A4'"):
        Bits.parse("x")


def test_config_bits_name_and_alias():
    c = QuantConfig(w_bits=3, a_bits=6)
    assert c.bits == Bits(3, 6) and c.name == "W3A6"
    assert QuantSpec is QuantConfig and QuantSpec(4, 4) == QuantConfig(4, 4)


@pytest.mark.parametrize("bits", [1, 17, 4.0, True, "4", None])
def test_check_bits_rejects(bits):
    with pytest.raises(ValueError, match=rf"^Owner\.bits must be an int in \[2, 16\], got {re.escape(repr(bits))}$"):
        check_bits("Owner.bits", bits)
    check_bits("Owner.bits", 2)
    check_bits("Owner.bits", 16)


def test_token_mask_limits_observation_to_real_tokens():
    x = torch.randn(2, 5, 3)
    x[1, 3:] = 100.0  # padded positions hold junk
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    q = UniformQuantizer(8)
    q.token_dims, q.token_mask = (0, 1), mask
    q = _calibrated(q, x)
    assert float(q.hi) == pytest.approx(float(x[mask].max()))
    q2 = UniformQuantizer(8)  # no mask: padding counts
    assert float(_calibrated(q2, x).hi) == 100.0
    # attention layout (B, H, T, D) with token dim 2
    xa = torch.randn(2, 4, 5, 3)
    xa[1, :, 3:] = -50.0
    qa = UniformQuantizer(8)
    qa.token_dims, qa.token_mask = (0, 2), mask
    assert float(_calibrated(qa, xa).lo) == pytest.approx(float(xa.movedim(2, 1)[mask].min()))
