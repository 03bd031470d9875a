"""What s2d does when things go wrong (docs/architecture.md, "Failure modes"): non-finite values in
training and in S2D, GradScaler-skipped steps, padding in the activation peaks, a state saved under
another config, and S2D hyperparameters outside the paper's range."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay
from s2d.regularizer.refresh import find_peak
from s2d.train import TrainConfig, TrainingDiverged, finetune
from test_train import tiny_bundle, tiny_loaders


class MaskedMLP(nn.Module):
    """Two Linears on (B, T, C) inputs; takes (and ignores) an ``attention_mask`` like a text model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _step(model, opt, x, mask=None, skip: bool = False) -> None:
    """One training step; ``skip`` does what a GradScaler does on an overflow: no optimizer.step."""
    loss = model(x, attention_mask=mask).pow(2).mean()
    loss.backward()
    if not skip:
        opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- training loop

def test_nan_mid_training_stops_with_one_line_and_keeps_last_good_checkpoint(tmp_path):
    bundle, loaders = tiny_bundle(), tiny_loaders()
    cfg = TrainConfig(steps=12, lr=1e-3, save_every=2, eval_every=100, log_every=100, max_bad_steps=3)

    def poison(step, result):          # after step 3 a weight turns NaN: every later loss is NaN
        if step == 3:
            with torch.no_grad():
                bundle.model.classifier.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged) as info:
        finetune(bundle, loaders, cfg, out_dir=tmp_path, progress=False, callback=poison)
    msg = str(info.value)
    assert "\n" not in msg and "non-finite for 3 consecutive steps" in msg and "ckpt-0000002" in msg
    assert (tmp_path / "latest").read_text() == "ckpt-0000002"          # step 4 (NaN) was not saved
    weights = load_file(tmp_path / "ckpt-0000002" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_isolated_nan_loss_does_not_stop_training(tmp_path):
    bundle, loaders = tiny_bundle(), tiny_loaders()
    res = finetune(bundle, loaders, TrainConfig(steps=4, lr=1e-3, eval_every=100, max_bad_steps=0),
                   progress=False)
    assert res.steps == 4 and math.isfinite(res.final_loss)


# ----------------------------------------------------------------------------- S2D

def test_nonfinite_layer_loses_its_penalty_and_warns_once(caplog):
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    decay = SelectiveSpectralDecay(model, opt, S2DConfig(strength=1e-2, selection="all", interval=100))
    x = torch.randn(2, 5, 8)
    _step(model, opt, x)
    assert set(decay.factors()) == {"fc1", "fc2"}
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="s2d.regularizer.hooks"):
        for _ in range(3):
            _step(model, opt, x)
    for name in ("fc1", "fc2"):            # fc1's inf weight makes fc2's gradient NaN as well
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and f" {name} " in r.getMessage()]
        assert len(warned) == 1 and "non-finite" in warned[0].getMessage()
    assert decay.factors() == {}                                 # both cached penalties are dropped
    stats = {s.name: s for s in decay.layer_stats()}
    assert stats["fc1"].skipped and stats["fc1"].k_target is None


def test_skipped_overflow_step_does_not_poison_the_next_refresh():
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    decay = SelectiveSpectralDecay(model, opt, S2DConfig(interval=2, tau=0.5))
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(2, 5, 8)
    for _ in range(2):                               # steps 0, 1 (refresh at 0)
        _step(model, opt, x)
    hot = x.clone()
    hot[0, 0, 0] = float("inf")                      # step 2 is due: the forward overflows ...
    loss = model(hot).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)                                 # ... so the scaler skips optimizer.step
    scaler.update()
    opt.zero_grad(set_to_none=True)
    assert decay.step == 2
    with torch.no_grad():
        clean = float(model.fc1(x).abs().max())
    _step(model, opt, x)                             # the real step 2: refresh on its own activations
    stats = {s.name: s for s in decay.layer_stats()}
    assert all(s.refreshed_at == 2 and not s.skipped for s in stats.values()), stats
    assert stats["fc1"].max_activation == pytest.approx(clean, rel=1e-6)


def test_activation_peak_leaves_out_padding():
    torch.manual_seed(0)
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    decay = SelectiveSpectralDecay(model, opt, S2DConfig(interval=100, tau=0.5))
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    x[1, 4] = 1e3                                    # a huge value at a padding position
    with torch.no_grad():
        y = model.fc1(x)
    expected = float(y[mask.bool()].abs().max())    # brute force over real tokens only
    assert float(y.abs().max()) > 10 * expected
    _step(model, opt, x, mask)
    stats = {s.name: s for s in decay.layer_stats()}
    assert stats["fc1"].max_activation == pytest.approx(expected, rel=1e-6)


def test_find_peak_mask_matches_brute_force():
    torch.manual_seed(1)
    w = torch.randn(6, 4)
    x = torch.randn(3, 7, 4)
    out = x @ w.T
    mask = torch.rand(3, 7) > 0.4
    peak = find_peak(w.shape, x, out, mask)
    real = out[mask]
    j, i = divmod(int(real.abs().argmax()), 6)
    assert float(peak.max_abs) == float(real.abs().max()) and int(peak.neuron) == i
    torch.testing.assert_close(peak.x, x[mask][j])
    assert find_peak(w.shape, x, out, torch.zeros(3, 7, dtype=torch.bool)) is None


def test_state_from_another_config_is_refused_unless_not_strict(caplog):
    model = MaskedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    saved = SelectiveSpectralDecay(model, opt, S2DConfig(strength=1e-3, interval=10))
    _step(model, opt, torch.randn(2, 5, 8))
    sd = saved.state_dict()
    saved.remove()
    other = SelectiveSpectralDecay(model, opt, S2DConfig(strength=1e-2, interval=10))
    with pytest.raises(ValueError, match=r"strength=0.001, now 0.01.*strict=False"):
        other.load_state_dict(sd)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(sd, strict=False)
    assert "another S2DConfig" in caplog.text and other.step == 1
    same = SelectiveSpectralDecay(model, opt, S2DConfig(strength=1e-3, interval=10))
    same.load_state_dict(sd)                          # the same config loads silently


def test_power_outside_the_papers_range_warns():
    with pytest.warns(UserWarning, match="Definition 1 needs n > 1"):
        S2DConfig(power=1.0)
    with pytest.warns(UserWarning):
        S2DConfig(power=0.5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S2DConfig(power=2.0)
