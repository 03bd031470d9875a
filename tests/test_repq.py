"""RepQ-ViT: scale reparameterisation (exact in float), log-√2 use, quantile/MSE range search, whole models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq_models import MODELS, logits
from s2d.quant import QuantConfig, QuantLinear, RepQConfig, quantize_model, set_quantization
from s2d.quant.nonuniform import LogSqrt2Quantizer
from s2d.quant.primitives import fake_quant, scale_zero_point
from s2d.quant.ptq.common import quantile_mse_range
from s2d.quant.ptq.repq import input_quantizer
from s2d.quant.quantizers import UniformQuantizer
from s2d.quant.reparam import ChannelAffineInput, channel_affine_from_ranges, fold_into_linear, fold_into_norm


def _channel_data(n=512, c=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, c)  # channel ranges over two decades: the case reparam exists for
    return torch.randn(n, c, generator=g) * scale + torch.linspace(-2, 2, c)


def test_affine_reproduces_the_per_channel_grid():
    x = _channel_data()
    bits = 4
    lo, hi = x.min(0).values, x.max(0).values
    aff = channel_affine_from_ranges(lo, hi, bits)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # ranges always contain 0 (zero is representable)
    delta = (hi - lo) / (2**bits - 1)
    zero = -lo / delta  # unrounded, as in the derivation
    codes_c = torch.round(x / delta + zero)
    xp = x / aff.r + aff.shift
    d_bar = (aff.hi - aff.lo) / (2**bits - 1)
    codes_t = torch.round(xp / d_bar - aff.lo / d_bar)
    # identical codes except where float rounding sits exactly on a .5 boundary
    assert (codes_c == codes_t).float().mean() > 0.999
    # every channel's range maps exactly onto the shared per-tensor range
    torch.testing.assert_close(lo / aff.r + aff.shift, torch.full((x.shape[1],), aff.lo), atol=1e-4, rtol=0)
    torch.testing.assert_close(hi / aff.r + aff.shift, torch.full((x.shape[1],), aff.hi), atol=1e-4, rtol=0)


def test_fold_into_layernorm_and_linear_is_exact():
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(24), nn.Linear(24, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.2, 3.0)
        norm.bias.normal_()
    x = _channel_data()
    ref_norm, ref_out = norm(x).detach(), lin(norm(x)).detach()
    lo, hi = ref_norm.min(0).values, ref_norm.max(0).values
    aff = channel_affine_from_ranges(lo, hi, 4)
    fold_into_norm(norm, aff)
    fold_into_linear(lin, aff)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref_norm / aff.r + aff.shift, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin(norm(x)), ref_out, atol=1e-5, rtol=1e-5)
    # every channel now lies inside the one shared per-tensor range
    y = norm(x).detach()
    assert y.min() >= aff.lo - 1e-4 and y.max() <= aff.hi + 1e-4


def test_channel_affine_input_on_a_linear_is_exact():
    lin = nn.Linear(24, 8)
    x = _channel_data()
    ref = lin(x).detach()
    aff = channel_affine_from_ranges(x.min(0).values, x.max(0).values, 4)
    fold_into_linear(lin, aff)
    q = UniformQuantizer(4)
    q.enabled = False
    wrapped = ChannelAffineInput(aff, q)
    torch.testing.assert_close(lin(wrapped(x)).detach(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantile_mse_range_matches_brute_force(symmetric):
    x = _channel_data(n=300, c=5).T.contiguous()  # rows = channels
    x[0, 0] = 60.0  # one outlier
    quantiles = (1.0, 0.999, 0.99)
    lo, hi = quantile_mse_range(x, 4, symmetric, quantiles)
    for r in range(x.shape[0]):
        best = None
        for p in quantiles:
            v = x[r]
            if symmetric:
                t = v.abs().max() if p == 1.0 else torch.quantile(v.abs(), p)
                c_lo, c_hi = -t, t
            else:
                c_lo = v.min() if p == 1.0 else torch.quantile(v, 1 - p)
                c_hi = v.max() if p == 1.0 else torch.quantile(v, p)
            s, z = scale_zero_point(c_lo, c_hi, 4, symmetric)
            qmin, qmax = (-7, 7) if symmetric else (0, 15)
            err = float((fake_quant(v, s, z, qmin, qmax) - v).pow(2).mean())
            if best is None or err < best[0]:
                best = (err, float(c_lo), float(c_hi))
        assert lo[r].item() == pytest.approx(best[1], rel=1e-5, abs=1e-6)
        assert hi[r].item() == pytest.approx(best[2], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_repq_reparam_leaves_float_model_unchanged(arch):
    make, data = MODELS[arch]
    model, batches = make(), data()
    ref = logits(model, batches[0])
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="repq", calib=batches, progress=False)
    set_quantization(model, False)
    torch.testing.assert_close(logits(model, batches[0]), ref, atol=1e-5, rtol=1e-5)
    set_quantization(model, True)
    assert not torch.allclose(logits(model, batches[0]), ref, atol=1e-4)  # really quantized when on
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    wrapped = [m for m in lins if isinstance(m.input_quantizer, ChannelAffineInput)]
    if arch == "bert":  # post-LN: q/k/v and fc1 of each layer keep an explicit input transform
        assert len(wrapped) == 2 * (3 + 1)
    else:  # pre-LN: folded into the LayerNorms, no transform left
        assert wrapped == []
    for m in lins:  # the deployed activation quantizers are per tensor
        q = input_quantizer(m)
        assert q.granularity == "tensor" and q.enabled and q.calibrated


def test_repq_uses_log_sqrt2_for_softmax_with_its_formula():
    model, batches = MODELS["vit"][0](), MODELS["vit"][1]()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="repq", calib=batches, progress=False)
    attn = model.vit.layers[0].attention.s2d_attn_quant
    assert isinstance(attn.probs, LogSqrt2Quantizer) and attn.probs.bits == 4
    probs = torch.softmax(torch.randn(2, 2, 17, 17) * 3, -1)
    delta = float(attn.probs.delta)
    code = torch.clamp(torch.round(-2 * torch.log2(probs / delta)), min=0)
    expected = torch.where(code > 15, torch.zeros_like(probs), delta * 2 ** (-code / 2))  # Δ·2^(-q/2)
    torch.testing.assert_close(attn.probs(probs), expected, atol=1e-6, rtol=1e-5)


def test_repq_is_deterministic():
    make, data = MODELS["bert"]
    outs = []
    for _ in range(2):
        model = make()
        quantize_model(model, QuantConfig(4, 4), method="repq", calib=data(), config=RepQConfig(max_tokens=32),
                       progress=False)
        outs.append(logits(model, data()[0]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_repq_rejects_models_without_blocks():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no transformer blocks"):
        quantize_model(model, QuantConfig(4, 4), method="repq", calib=[{"input": torch.randn(4, 4)}], progress=False)


@pytest.mark.parametrize("kwargs,field", [({"quantiles": ()}, "quantiles"), ({"quantiles": (0.3,)}, "quantiles"),
                                          ({"num_samples": 0}, "num_samples"), ({"max_tokens": 2}, "max_tokens")])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"RepQConfig.{field}"):
        RepQConfig(**kwargs)


@torch.no_grad()
def test_reparam_beats_plain_per_tensor_quantization_on_outlier_channels():
    """The reason for RepQ: post-LN channels with very different ranges. Per-tensor 4-bit quantization of
    the reparameterised input (same grid as per-channel) gives a smaller (< half) Linear output error than
    per-tensor quantization of the original input."""
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(24), nn.Linear(24, 16)
    norm.weight[:3] = 20.0  # outlier channels
    x = torch.randn(512, 24)
    ref = lin(norm(x)).detach()
    q_plain = UniformQuantizer(4)
    q_plain.set_range(norm(x).min().reshape(1), norm(x).max().reshape(1))
    err_plain = float((lin(q_plain(norm(x))) - ref).pow(2).mean())
    y = norm(x).detach()
    aff = channel_affine_from_ranges(y.min(0).values, y.max(0).values, 4)
    fold_into_norm(norm, aff)
    fold_into_linear(lin, aff)
    q_rep = UniformQuantizer(4)
    q_rep.set_range(torch.tensor([aff.lo]), torch.tensor([aff.hi]))
    err_rep = float((lin(q_rep(norm(x))) - ref).pow(2).mean())
    assert err_rep < 0.5 * err_plain, (err_rep, err_plain)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dispatch_by_config_type_equals_dispatch_by_name(arch):
    """``method=RepQConfig(...)`` selects RepQ through the config's type: the same quantized model as
    ``method="repq", config=RepQConfig(...)`` (logits and every tensor of the state dict)."""
    make, data = MODELS[arch]
    cfg = RepQConfig(max_tokens=64, quantiles=(1.0, 0.999))
    by_name, by_type = make(), make()
    quantize_model(by_name, QuantConfig(4, 4), method="repq", calib=data(), config=cfg, progress=False)
    quantize_model(by_type, QuantConfig(4, 4), method=cfg, calib=data(), progress=False)
    torch.testing.assert_close(logits(by_type, data()[0]), logits(by_name, data()[0]), rtol=0, atol=0)
    a, b = by_name.state_dict(), by_type.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the config really was used: the default RepQConfig gives a different model
    default = make()
    quantize_model(default, QuantConfig(4, 4), method="repq", calib=data(), progress=False)
    assert not torch.equal(logits(default, data()[0]), logits(by_type, data()[0]))
