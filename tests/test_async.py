"""Asynchronous refresh (S2DConfig.async_lead): schedule, staleness, background execution."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from s2d.regularizer import ActivationPeak, S2DConfig, SelectiveSpectralDecay, compute_refresh
from s2d.regularizer.worker import BackgroundTask


# ----------------------------------------------------------------------------- config / worker
@pytest.mark.parametrize("lead", [-1, 4, 7, 1.5, True])
def test_async_lead_validated(lead):
    with pytest.raises(ValueError, match="S2DConfig.async_lead"):
        S2DConfig(interval=4, async_lead=lead)


def test_background_task_runs_concurrently_and_reraises():
    started, release = threading.Event(), threading.Event()

    def work(a, b):
        started.set()
        assert release.wait(10), "submit() must return before the work finishes"
        return a @ b

    task = BackgroundTask()
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    task.submit(work, a, b)           # returns while `work` still blocks on `release`
    assert started.wait(10) and task.pending
    with pytest.raises(RuntimeError, match="already running"):
        task.submit(work, a, b)
    release.set()
    torch.testing.assert_close(task.result(), a @ b)
    assert not task.pending

    task.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        task.result()
    with pytest.raises(RuntimeError, match="nothing was submitted"):
        task.result()


# ----------------------------------------------------------------------------- helpers
def _spiked_mlp(seed: int = 0, spike: float = 4.0) -> nn.Sequential:
    """Tiny MLP whose weights carry one dominant singular direction, like pre-trained layers do."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                u, v = torch.randn(m.out_features), torch.randn(m.in_features)
                bulk = float(torch.linalg.matrix_norm(m.weight, 2))
                m.weight += spike * bulk * torch.outer(u / u.norm(), v / v.norm())
    return model


def _data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)) for _ in range(steps)]


def _penalty(f, power: float) -> torch.Tensor:
    return (f.U.double() * f.S.double().pow(power)) @ f.V.double().T


class Recorder:
    """Independent record of what S2D should see: pre-update weights and the largest |output| per step."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, s2d: SelectiveSpectralDecay):
        self.s2d, self.step = s2d, 0
        self.weights: list[dict[str, torch.Tensor]] = []
        self.factors: list[dict] = []          # s2d's cached factors right after its pre-hook
        self.peaks: list[dict[str, ActivationPeak]] = [{}]
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        for name, m in self.linears.items():
            m.register_forward_hook(self._hook(name))
        opt.register_step_pre_hook(self._pre)  # registered after S2D's: runs after it

    def _hook(self, name):
        def hook(mod, args, out):
            flat = out.detach().abs().reshape(-1)
            i = int(flat.argmax())
            m = out.shape[-1]
            row = args[0].detach().reshape(-1, args[0].shape[-1])[i // m].clone()
            self.peaks[-1][name] = ActivationPeak(flat[i].clone(), row, torch.tensor(i % m))
        return hook

    def _pre(self, opt, args, kwargs):
        self.weights.append({n: m.weight.detach().clone() for n, m in self.linears.items()})
        self.factors.append({n: (f.U.clone(), f.S.clone(), f.V.clone()) for n, f in self.s2d.factors().items()})
        self.peaks.append({})
        self.step += 1


def _run(cfg: S2DConfig, steps: int, lr: float = 1e-2):
    model = _spiked_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    s2d = SelectiveSpectralDecay(model, opt, cfg)
    rec = Recorder(model, opt, s2d)
    for x, y in _data(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, s2d, rec


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("selection", ["all", "pcdr"])
def test_async_factors_are_those_of_the_weights_lead_steps_earlier(selection):
    cfg = S2DConfig(strength=0.05, tau=0.3, k_max=2, interval=4, async_lead=2, selection=selection)
    _, s2d, rec = _run(cfg, steps=6, lr=5e-2)
    stats = {s.name: s for s in s2d.layer_stats()}
    assert all(s.refreshed_at == 2 for s in stats.values())  # started at step 2, installed at step 4
    for name in rec.linears:
        w2, w4 = rec.weights[2][name].double(), rec.weights[4][name].double()
        # PCDR ran on the activation of the step-2 forward (brute force max over the recorded output)
        peak = rec.peaks[2][name]
        assert stats[name].max_activation == pytest.approx(float(peak.max_abs), rel=1e-6)
        if name not in rec.factors[4]:
            assert stats[name].k_target is None
            continue
        U, S, V = rec.factors[4][name]
        k = S.shape[0]
        got = (U.double() * S.double()) @ V.double().T
        u, s, vh = torch.linalg.svd(w2)
        stale = (u[:, :k] * s[:k]) @ vh[:k]
        u4, s4, vh4 = torch.linalg.svd(w4)
        fresh = (u4[:, :k] * s4[:k]) @ vh4[:k]
        torch.testing.assert_close(got, stale, atol=2e-5, rtol=1e-4)
        assert float((got - fresh).abs().max()) > 1e-3, "weights moved between steps 2 and 4"
        # the factors installed at step 4 stay in place until the next refresh
        for later in (5,):
            torch.testing.assert_close(rec.factors[later][name][1], S)
    assert any(s.k_target is not None for s in stats.values())


def test_step_zero_refresh_is_synchronous_and_equal_to_sync_run():
    base = dict(strength=0.05, tau=0.3, k_max=2, interval=5)
    m_sync, s_sync, _ = _run(S2DConfig(**base), steps=3)
    m_async, s_async, _ = _run(S2DConfig(**base, async_lead=3), steps=3)
    # steps 0..2: one refresh at step 0 in both; the early start for step 5 happens at step 2
    for a, b in zip(m_sync.parameters(), m_async.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert [s.refreshed_at for s in s_async.layer_stats()] == [0] * 3


def test_forced_refresh_drops_the_pending_async_one():
    cfg = S2DConfig(strength=0.05, tau=0.3, k_max=2, interval=4, async_lead=2)
    model = _spiked_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s2d = SelectiveSpectralDecay(model, opt, cfg)
    for i, (x, y) in enumerate(_data(4)):
        if i == 3:
            assert s2d._task is not None and s2d._task.pending  # started at step 2
            s2d.refresh_now()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert not s2d._task.pending
    assert [s.refreshed_at for s in s2d.layer_stats()] == [3] * 3
    assert all(not s.skipped for s in s2d.layer_stats())  # activations were captured for it


def test_state_dict_with_pending_refresh_resumes_with_activations():
    cfg = S2DConfig(strength=0.05, tau=0.3, k_max=2, interval=4, async_lead=2)
    data = _data(6)
    model = _spiked_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s2d = SelectiveSpectralDecay(model, opt, cfg)
    for x, y in data[:3]:      # steps 0, 1, 2 (the async refresh for step 4 starts at step 2)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    sd = s2d.state_dict()
    s2d.remove()
    fresh = SelectiveSpectralDecay(model, opt, cfg)
    fresh.load_state_dict(sd)
    for x, y in data[3:]:      # steps 3, 4, 5: no pending work, so step 4 refreshes synchronously
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    stats = fresh.layer_stats()
    assert [s.refreshed_at for s in stats] == [4] * 3
    assert all(not s.skipped for s in stats)


# ----------------------------------------------------------------------------- staleness (paper G.2)
def test_async_penalty_within_cosine_099_of_fresh():
    """Penalty from factors `lead` steps old vs the one a synchronous refresh computes at the due step."""
    power = 2.0
    cfg = S2DConfig(strength=5e-3, power=power, tau=0.5, k_max=3, interval=10, async_lead=3, selection="all")
    _, s2d, rec = _run(cfg, steps=31, lr=1e-3)
    cosines = []
    for due in (10, 20, 30):
        weights = rec.weights[due]
        fresh = compute_refresh(weights, rec.peaks[due], cfg, due)
        for name, (U, S, V) in rec.factors[due].items():
            g_async = (U.double() * S.double().pow(power)) @ V.double().T
            g_fresh = _penalty(fresh[name].factors, power)
            cos = float((g_async * g_fresh).sum() / (g_async.norm() * g_fresh.norm()))
            cosines.append(cos)
        # and the stale factors differ from fresh ones: the test could fail
        assert any(not torch.equal(rec.factors[due][n][1], fresh[n].factors.S.to(rec.factors[due][n][1].dtype))
                   for n in rec.factors[due])
    assert len(cosines) == 9 and min(cosines) >= 0.99, cosines
