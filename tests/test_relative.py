"""The relative update and its guard against closed forms on planted matrices and brute-force losses."""
import math

import pytest
import torch
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay
from s2d.regularizer.relative import per_step_rate, relative_decay_

D = torch.float64


def _planted(m: int, n: int, sigmas: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(sigmas) Vᵀ with random orthonormal U (m, r), V (n, r)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigmas)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=D))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=D))[0]
    return u @ torch.diag(torch.tensor(sigmas, dtype=D)) @ v.T, u, v


@pytest.mark.parametrize("fraction,interval", [(0.5, 1), (0.5, 7), (0.1, 30), (0.9, 100)])
def test_per_step_rate_compounds_to_the_fraction(fraction, interval):
    c = per_step_rate(fraction, interval)
    assert (1 - c) ** interval == pytest.approx(1 - fraction, rel=1e-12)


def test_relative_decay_shrinks_only_the_given_directions():
    w, u, v = _planted(9, 6, [40.0, 5.0, 2.0, 1.0])
    before = torch.linalg.svdvals(w)
    s = relative_decay_(w, u[:, :2], v[:, :2], 0.25)
    torch.testing.assert_close(s, torch.tensor([40.0, 5.0], dtype=D))
    after = torch.linalg.svdvals(w)
    torch.testing.assert_close(after, torch.tensor([30.0, 3.75, 2.0, 1.0, 0.0, 0.0], dtype=D)[: after.numel()],
                               atol=1e-10, rtol=0)
    assert before[0] == pytest.approx(40.0)


def _run(lin: nn.Linear, x: torch.Tensor, steps: int, cfg: S2DConfig, lr: float = 0.0, guard=None):
    """``steps`` optimizer steps of a plain loop; SGD at lr 0 leaves all the movement to S2D."""
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    s2d = SelectiveSpectralDecay(lin, opt, cfg, guard=guard)
    for _ in range(steps):
        lin(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return s2d


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_relative_mode_removes_the_fraction_per_interval(scale, fraction):
    """Closed form: after j intervals the selected σ_1 is (1 - fraction)^j σ_1, the rest is untouched,
    whatever the scale of W."""
    w, u, v = _planted(12, 8, [100.0 * scale, 3.0 * scale, 2.0 * scale, 1.0 * scale])
    lin = nn.Linear(8, 12, bias=False, dtype=D)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = v[:, 0].repeat(4, 1)             # the input the top direction reads: PCDR_1 = 1
    cfg = S2DConfig(update="relative", fraction=fraction, interval=5, k_max=1)
    s2d = _run(lin, x, 10, cfg)
    sv = torch.linalg.svdvals(lin.weight.detach())
    expected = torch.tensor([100.0 * (1 - fraction) ** 2, 3.0, 2.0, 1.0], dtype=D) * scale
    torch.testing.assert_close(sv[:4], expected, rtol=1e-9, atol=1e-12 * scale)
    assert [s.k_target for s in s2d.layer_stats()] == [1]


def test_relative_mode_ignores_the_learning_rate():
    """The same weights and the same (zero) gradient at two learning rates decay identically."""
    w, u, v = _planted(10, 6, [50.0, 2.0, 1.0])
    out = []
    for lr in (1e-5, 1.0):
        lin = nn.Linear(6, 10, bias=False, dtype=D)
        with torch.no_grad():
            lin.weight.copy_(w)
        opt = torch.optim.SGD(lin.parameters(), lr=lr)
        SelectiveSpectralDecay(lin, opt, S2DConfig(update="relative", fraction=0.5, interval=4, k_max=1))
        for _ in range(4):
            lin(v[:, 0].repeat(3, 1))           # the activation peak of the refresh step
            lin.weight.grad = torch.zeros_like(lin.weight)
            opt.step()
        out.append(torch.linalg.svdvals(lin.weight.detach())[0])
    torch.testing.assert_close(out[0], out[1])
    assert float(out[0]) == pytest.approx(25.0)


# ----------------------------------------------------------------------------- the guard
class _Planted(nn.Module):
    """Two planted layers: ``a``'s top direction carries the label, ``b``'s feeds nothing the head reads."""

    def __init__(self) -> None:
        super().__init__()
        e = torch.eye(8, dtype=D)
        self.a = nn.Linear(8, 8, bias=False, dtype=D)
        self.b = nn.Linear(8, 8, bias=False, dtype=D)
        self.head = nn.Linear(8, 2, bias=False, dtype=D)
        with torch.no_grad():
            self.a.weight.copy_(torch.diag(torch.tensor([50.0] + [1.0] * 7, dtype=D)))   # σ_1 on e_0
            self.b.weight.copy_(torch.diag(torch.tensor([1.0, 80.0] + [0.5] * 6, dtype=D)))  # σ_1 on e_1
            self.head.weight.copy_(torch.stack([-0.02 * e[0], 0.02 * e[0]]))    # margin = 2 x_0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x)) + 0.0 * self.b(x).sum(-1, keepdim=True)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.1 * torch.randn(n, 8, generator=g, dtype=D)
    x[:, 0] = 2.0 * y - 1.0                # the label, in the direction of a's σ_1
    x[:, 1] = 2.0 * torch.randn(n, generator=g, dtype=D)
    return x, y


@torch.no_grad()
def _ce_with_a_scaled(model: _Planted, x: torch.Tensor, y: torch.Tensor, keep: float) -> float:
    """Brute force: the loss with a's σ_1 multiplied by ``keep``."""
    w = model.a.weight.detach().clone()
    w[0, 0] *= keep
    h = x @ w.T
    return float(nn.functional.cross_entropy(model.head(h), y))


def _guarded_run(tolerance: float, guard: bool):
    torch.manual_seed(0)
    model = _Planted()
    x, y = _data(64, 1)
    xv, yv = _data(128, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def loss() -> float:
        return float(nn.functional.cross_entropy(model(xv), yv))

    cfg = S2DConfig(update="relative", fraction=0.5, interval=4, k_max=1, include=["a", "b"],
                    guard_tolerance=tolerance, guard_backoffs=2)
    s2d = SelectiveSpectralDecay(model, opt, cfg, guard=loss if guard else None)
    reference = _Planted()
    for _ in range(4):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, s2d, reference, (xv, yv)


def _expected_keep(reference: _Planted, val, tolerance: float, backoffs: int = 2) -> float:
    """What the guard should let ``a`` keep of σ_1 after one interval, by brute force over the back-offs."""
    base = _ce_with_a_scaled(reference, *val, 1.0)
    for halving in range(backoffs + 1):
        f = 0.5 * 0.5 ** halving
        if _ce_with_a_scaled(reference, *val, 1 - f) - base <= tolerance:
            return 1 - f
    return 1.0


@pytest.mark.parametrize("tolerance", [0.02, 0.1, 1.0])
def test_guard_backs_off_the_layer_whose_decay_costs_the_label(tolerance):
    model, s2d, reference, val = _guarded_run(tolerance, guard=True)
    keep = _expected_keep(reference, val, tolerance)
    assert float(torch.linalg.svdvals(model.a.weight.detach())[0]) == pytest.approx(50.0 * keep, rel=1e-9)
    assert float(torch.linalg.svdvals(model.b.weight.detach())[0]) == pytest.approx(40.0, rel=1e-9)  # decays freely
    stats = {s.name: s for s in s2d.layer_stats()}
    if keep == 1.0:
        assert stats["a"].k_target is None and stats["a"].reason.startswith("guard:")
        assert "a" in s2d.guard.stopped
    else:
        assert stats["a"].k_target == 1 and "a" not in s2d.guard.stopped
    assert s2d.guard.history[0]["layers"]["b"]["cost"] == pytest.approx(0.0, abs=1e-12)


def test_the_planted_cases_cover_stop_backoff_and_pass():
    """The tolerances above reach every branch: stopped, backed off once or more, passed at once."""
    _, _, reference, val = _guarded_run(0.0, guard=False)
    keeps = [_expected_keep(reference, val, t) for t in (0.02, 0.1, 1.0)]
    assert keeps[0] == 1.0 and 0.5 < keeps[1] < 1.0 and keeps[2] == 0.5


def test_without_guard_the_label_direction_is_decayed():
    model, _, _, val = _guarded_run(0.02, guard=False)
    assert float(torch.linalg.svdvals(model.a.weight.detach())[0]) == pytest.approx(25.0, rel=1e-9)
    base = _ce_with_a_scaled(_Planted(), *val, 1.0)
    assert float(nn.functional.cross_entropy(model(val[0]), val[1])) > base + 0.1   # and it costs the task


def test_guard_state_round_trips():
    _, s2d, _, _ = _guarded_run(0.02, guard=True)
    sd = s2d.state_dict()
    model2 = _Planted()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.0)
    other = SelectiveSpectralDecay(model2, opt2, s2d.config, guard=lambda: 0.0)
    other.load_state_dict(sd)
    assert other.guard.stopped == s2d.guard.stopped and other.guard.halvings == s2d.guard.halvings
    assert len(other.guard.history) == len(s2d.guard.history)


@pytest.mark.parametrize("field,value", [("fraction", 0.0), ("fraction", 1.0), ("guard_tolerance", -1.0),
                                         ("guard_tolerance", math.nan), ("guard_backoffs", -1)])
def test_config_rejects_bad_relative_values(field, value):
    with pytest.raises(ValueError, match=f"S2DConfig.{field} must be"):
        S2DConfig(update="relative", **{field: value})


def test_guard_needs_the_relative_update():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="guard needs S2DConfig.update='relative'"):
        SelectiveSpectralDecay(lin, torch.optim.SGD(lin.parameters(), lr=0.1), S2DConfig(), guard=lambda: 0.0)
