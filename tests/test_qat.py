"""QAT: fake-quant training lowers the quantized loss, STE gradients reach the weights, S2D works on it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay
from s2d.quant import QATConfig, QuantConfig, QuantLinear, convert_qat, named_quantizers, prepare_qat, set_quantization
from s2d.quant.qat import EMAQuantizer
from s2d.quant.quantizers import UniformQuantizer


class TinyMLP(nn.Module):
    """Two-layer regression MLP with the HF-style interface model(**batch).loss."""

    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, 1)

    def forward(self, x, y=None):
        out = self.fc2(torch.relu(self.fc1(x))).squeeze(-1)
        loss = None if y is None else (out - y).pow(2).mean()
        return type("Out", (), {"logits": out, "loss": loss})()


def _data(n: int = 256, d: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g)
    return x, torch.tanh(x @ w) + 0.5 * torch.sin(3 * x[:, 0])


def _pretrained_mlp(x, y) -> TinyMLP:
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("act_range", ["ema", "lsq"])
def test_qat_w4a4_lowers_fake_quant_loss(act_range):
    x, y = _data()
    model = _pretrained_mlp(x, y)
    calib = [{"x": x[:64]}]
    qmodel = prepare_qat(copy.deepcopy(model), QuantConfig(w_bits=4, a_bits=4), calib=calib,
                         config=QATConfig(act_range=act_range, momentum=0.1), progress=False)
    with torch.no_grad():
        before = qmodel.eval()(x, y).loss.item()
    qmodel.train()
    opt = torch.optim.Adam(qmodel.parameters(), lr=3e-3)
    for _ in range(60):
        qmodel(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    final = convert_qat(qmodel)
    with torch.no_grad():
        after = final(x, y).loss.item()
    assert after < 0.8 * before, (before, after)
    # the converted model really is quantized: the fc1 input takes at most 2^4 distinct values
    seen = {}
    h = final.fc2.register_forward_pre_hook(lambda m, a: seen.setdefault("x", m.input_quantizer(a[0])))
    final(x)
    h.remove()
    assert seen["x"].unique().numel() <= 16
    assert all(isinstance(q, UniformQuantizer) and not q.dynamic for q in named_quantizers(final).values())


def test_ste_gradients_reach_weights_and_match_autograd_of_dequantized_weights():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    prepare_qat(model, QuantConfig(w_bits=4, a_bits=8), calib=[{"input": torch.randn(32, 8)}], progress=False)
    assert isinstance(model[0], QuantLinear)
    x = torch.randn(5, 8)
    model.eval()  # frozen ranges, so both passes below see the same quantizers
    model(x).pow(2).sum().backward()
    # STE: dL/dW = dL/dW_q (per-channel minmax weights are never clipped), with W_q the fake-quant weight
    wq = model[0].weight_quantizer(model[0].weight).detach().requires_grad_(True)
    xq = model[0].input_quantizer(x).detach()
    nn.functional.linear(xq, wq, model[0].bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, wq.grad)
    assert model[0].weight.grad.abs().sum() > 0


def test_ema_range_follows_batches():
    q = EMAQuantizer(bits=8, momentum=0.5)
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    assert q.lo.item() == -1.0 and q.hi.item() == 1.0
    q(torch.tensor([-3.0, 5.0]))
    assert q.lo.item() == pytest.approx(-2.0) and q.hi.item() == pytest.approx(3.0)
    q.eval()
    q(torch.tensor([-100.0, 100.0]))  # frozen in eval mode
    assert q.hi.item() == pytest.approx(3.0)


def test_s2d_hooks_work_with_qat():
    x, y = _data()
    model = prepare_qat(_pretrained_mlp(x, y), QuantConfig(w_bits=4, a_bits=4), calib=[{"x": x[:64]}],
                        progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dec = SelectiveSpectralDecay(model, opt, S2DConfig(strength=1e-2, interval=5, k_max=2, selection="all"))
    sigma0 = torch.linalg.matrix_norm(model.fc1.weight.detach(), ord=2).item()
    for _ in range(10):
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    stats = {s.name: s for s in dec.layer_stats()}
    assert {"fc1", "fc2"} <= set(stats)
    assert stats["fc1"].sigma_max == pytest.approx(sigma0, rel=0.2)
    assert stats["fc1"].k_target == 2  # selection="all" penalises the top k_max of every layer
    dec.remove()


@pytest.mark.parametrize("field,value", [("act_range", "minmax"), ("momentum", 0.0), ("momentum", 1.5)])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"QATConfig.{field}"):
        QATConfig(**{field: value})


def test_lsq_requires_calib():
    with pytest.raises(ValueError, match="lsq"):
        prepare_qat(nn.Sequential(nn.Linear(4, 4)), QuantConfig(4, 4), config=QATConfig(act_range="lsq"))


def _qat_run(base, x, y, s2d_config=None, steps=12):
    model = prepare_qat(copy.deepcopy(base), QuantConfig(w_bits=4, a_bits=4), calib=[{"x": x[:64]}], progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dec = SelectiveSpectralDecay(model, opt, s2d_config) if s2d_config is not None else None
    torch.manual_seed(0)
    for _ in range(steps):
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, dec


def test_qat_plus_s2d_targets_quant_linears_and_changes_their_weights():
    x, y = _data()
    base = _pretrained_mlp(x, y)
    alone, _ = _qat_run(base, x, y)
    with_s2d, dec = _qat_run(base, x, y, S2DConfig(strength=0.05, interval=4, k_max=1, selection="all"))
    targets = {s.name for s in dec.layer_stats()}
    assert targets == {n for n, m in with_s2d.named_modules() if isinstance(m, QuantLinear)} == {"fc1", "fc2"}
    sigma = lambda m: torch.linalg.matrix_norm(m.fc1.weight.detach(), ord=2).item()  # noqa: E731
    assert not torch.allclose(alone.fc1.weight, with_s2d.fc1.weight)
    assert sigma(with_s2d) < sigma(alone)  # the spectral penalty shrinks the top singular value
    dec.remove()


@pytest.mark.parametrize("act_range", ["ema", "lsq"])
def test_convert_equals_quantized_forward_of_trained_model(act_range):
    x, y = _data()
    model = prepare_qat(_pretrained_mlp(x, y), QuantConfig(w_bits=4, a_bits=4), calib=[{"x": x[:64]}],
                        config=QATConfig(act_range=act_range, momentum=0.1), progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
        final = convert_qat(copy.deepcopy(model))
        out = final(x).logits
        set_quantization(model, False)
        fp = model(x).logits
    torch.testing.assert_close(out, trained, rtol=1e-5, atol=1e-6)
    assert (out - fp).abs().max() > 1e-3  # and it is really quantized
    # frozen weight steps: symmetric per output channel, max|w_row| / (2^(4-1) - 1), from the trained weights
    torch.testing.assert_close(final.fc1.weight_quantizer.scale, final.fc1.weight.detach().abs().amax(1) / 7)
