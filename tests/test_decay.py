"""s2d.decay against autograd, hand-simulated SGD updates, and seeded A/B training runs."""
import copy
import io
import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from s2d import S2DConfig, SelectiveSpectralDecay
from s2d.spectral import pcdr_curve

D = torch.float64


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("strength", -1.0), ("strength", math.inf), ("power", 0.0), ("tau", 0.0), ("tau", 1.5),
    ("k_max", 0), ("k_max", 2.5), ("interval", 0), ("selection", "top"), ("update", "sgd"), ("include", [1]),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"S2DConfig.{field} must be"):
        S2DConfig(**{field: value})


def test_config_normalises_include_patterns():
    assert S2DConfig(include=["a.*", "b"]).include == ("a.*", "b")
    assert S2DConfig(include="fc*").include == ("fc*",)


# ----------------------------------------------------------------------------- penalty
def _autograd_penalty(w: torch.Tensor, strength: float, power: float, k: int) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    loss = strength / (power + 1) * torch.linalg.svdvals(w)[:k].pow(power + 1).sum()
    loss.backward()
    return w.grad


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("k", [1, 3])
def test_penalty_equals_autograd_gradient(shape, power, k):
    lin = nn.Linear(shape[1], shape[0], bias=False, dtype=D)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(strength=0.3, power=power, k_max=k, selection="all"))
    w0 = lin.weight.detach().clone()
    lin(torch.randn(4, shape[1], dtype=D)).sum().backward()
    g0 = lin.weight.grad.clone()
    seen = {}
    opt.register_step_pre_hook(lambda o, a, kw: seen.update(grad=lin.weight.grad.clone()))
    opt.step()
    expected = _autograd_penalty(w0, 0.3, power, k)
    torch.testing.assert_close(seen["grad"] - g0, expected, rtol=1e-7, atol=1e-9)
    f = s2d.factors()[""]
    assert f.U.shape == (shape[0], k) and f.V.shape == (shape[1], k)   # only k columns cached


def _sgd_problem(update: str, interval: int = 3, steps: int = 7):
    torch.manual_seed(0)
    lin = nn.Linear(10, 6, bias=False, dtype=D)
    opt = torch.optim.SGD(lin.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    cfg = S2DConfig(strength=0.05, power=2.0, k_max=2, interval=interval, selection="all", update=update)
    s2d = SelectiveSpectralDecay(lin, opt, cfg)
    xs = [torch.randn(5, 10, dtype=D) for _ in range(steps)]
    return lin, opt, sched, s2d, cfg, xs


@pytest.mark.parametrize("update", ["coupled", "decoupled"])
def test_sgd_update_matches_hand_simulation(update):
    """W <- W - lr_t (grad L + G), G from cached top-k factors refreshed at steps 0, 3, 6."""
    lin, opt, sched, s2d, cfg, xs = _sgd_problem(update)
    w = lin.weight.detach().clone()
    G = None
    for t, x in enumerate(xs):
        lr = opt.param_groups[0]["lr"]
        wr = w.clone().requires_grad_(True)
        (x @ wr.T).pow(2).mean().backward()
        if t % cfg.interval == 0:
            G = _autograd_penalty(w, cfg.strength, cfg.power, cfg.k_max)
        w = w - lr * (wr.grad + G)
        lin(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        torch.testing.assert_close(lin.weight.detach(), w, rtol=1e-10, atol=1e-12)
    assert s2d.step == len(xs)
    assert s2d.layer_stats()[0].refreshed_at == 6


@pytest.mark.parametrize("update", ["coupled", "decoupled"])
def test_step_with_closure_equals_plain_step(update):
    """optimizer.step(closure) (Lightning, LBFGS): forward/backward run inside step(); S2D acts after them."""
    ref_lin, ref_opt, ref_sched, ref_s2d, _, xs = _sgd_problem(update)
    for x in xs:
        ref_lin(x).pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    lin, opt, sched, s2d, _, _ = _sgd_problem(update)
    for x in xs:
        def closure(x=x):
            opt.zero_grad()
            loss = lin(x).pow(2).mean()
            loss.backward()
            return loss
        opt.step(closure)
        sched.step()
    torch.testing.assert_close(lin.weight, ref_lin.weight, rtol=1e-12, atol=1e-12)
    assert [s.refreshed_at for s in s2d.layer_stats()] == [s.refreshed_at for s in ref_s2d.layer_stats()]
    assert [s.max_activation for s in s2d.layer_stats()] == [s.max_activation for s in ref_s2d.layer_stats()]


def test_weight_without_grad_is_left_alone():
    a, b = nn.Linear(4, 4, dtype=D), nn.Linear(4, 4, dtype=D)
    model = nn.ModuleDict({"a": a, "b": b})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for update in ("coupled", "decoupled"):
        s2d = SelectiveSpectralDecay(model, opt, S2DConfig(strength=0.1, selection="all", update=update))
        wb = b.weight.detach().clone()
        a(torch.randn(3, 4, dtype=D)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(b.weight, wb) and b.weight.grad is None
        s2d.remove()


# ----------------------------------------------------------------------------- selection
def _selection_stats(weight: torch.Tensor, x: torch.Tensor, **cfg):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(**cfg))
    lin(x).sum().backward()
    opt.step()
    return s2d.layer_stats()[0], s2d


def test_dominant_direction_selects_k1_isotropic_is_healthy():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(48, generator=g), torch.randn(64, generator=g)
    u, v = u / u.norm(), v / v.norm()
    spiky = 10 * torch.outer(u, v) + 0.02 * torch.randn(48, 64, generator=g)
    x = torch.randn(16, 64, generator=g) * 0.1 + v          # inputs share the dominant direction
    st, s2d = _selection_stats(spiky, x)
    assert st.k_target == 1 and st.pcdr[0] >= 0.95 and not st.skipped
    assert s2d.factors()[""].S.shape == (1,)
    # the recorded entry is the brute-force largest |output|, and its PCDR matches pcdr_curve there
    y = x @ spiky.T
    j, i = divmod(int(y.abs().argmax()), 48)
    assert st.max_activation == pytest.approx(float(y.abs().max()))
    assert st.pcdr == pytest.approx(pcdr_curve(spiky, x[j], i)[:3].tolist(), abs=1e-6)
    iso = torch.linalg.qr(torch.randn(64, 64, generator=g))[0][:48]  # all singular values 1
    st, s2d = _selection_stats(iso, torch.randn(16, 64, generator=g))
    assert st.k_target is None and st.pcdr[2] < 0.95 and s2d.factors() == {}
    st, _ = _selection_stats(iso, torch.randn(16, 64, generator=g), selection="all")
    assert st.k_target == 3


def test_layer_of_rank_at_most_k_is_not_selected():
    """PCDR_rank == 1 for every activation, so a (2, n) head must not be selected by PCDR alone."""
    g = torch.Generator().manual_seed(0)
    head = torch.randn(2, 32, generator=g)
    x = torch.randn(8, 32, generator=g)
    st, s2d = _selection_stats(head, x)
    assert st.pcdr[1] == pytest.approx(1.0, abs=1e-6) and st.k_target in (None, 1)
    if st.k_target is None:
        assert st.pcdr[0] < 0.95 and s2d.factors() == {}
    st, _ = _selection_stats(torch.randn(1, 32, generator=g), x)   # rank 1: nothing to single out
    assert st.k_target is None


def test_include_patterns_and_callable():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Embedding(5, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert list(SelectiveSpectralDecay(model, opt).targets) == ["0", "2"]
    assert list(SelectiveSpectralDecay(model, opt, S2DConfig(include=["2", "3"])).targets) == ["2", "3"]
    cfg = S2DConfig(include=lambda name, m: isinstance(m, nn.Embedding))
    assert list(SelectiveSpectralDecay(model, opt, cfg).targets) == ["3"]


# ----------------------------------------------------------------------------- optimizers & loops
def _probe_grads(opt, lin):
    seen = {}
    opt.register_step_pre_hook(lambda o, a, kw: seen.update(grad=lin.weight.grad.clone()))
    return seen


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-3),
    lambda p: torch.optim.Muon(p, lr=1e-3),
], ids=["sgd", "adamw", "muon"])
def test_coupled_grad_seen_by_optimizer(make_opt):
    lin = nn.Linear(24, 16, bias=False)
    opt = make_opt(lin.parameters())
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(strength=0.1, k_max=2, selection="all", interval=2))
    seen = _probe_grads(opt, lin)
    for t in range(3):
        w = lin.weight.detach().clone()
        lin(torch.randn(8, 24)).pow(2).mean().backward()
        g0 = lin.weight.grad.clone()
        opt.step()
        if t % 2 == 0:
            G = _autograd_penalty(w.double(), 0.1, 2.0, 2).float()
        torch.testing.assert_close(seen["grad"] - g0, G, rtol=1e-4, atol=1e-6)
        opt.zero_grad()
    assert s2d.step == 3 and all(torch.isfinite(p).all() for p in lin.parameters())


def test_gradient_accumulation_keeps_largest_activation_and_steps_once():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=True)
    opt = torch.optim.SGD(lin.parameters(), lr=0.0)
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(selection="all", interval=1))
    xs = [torch.randn(4, 8), 3 * torch.randn(4, 8), torch.randn(4, 8)]
    for x in xs:
        lin(x).sum().backward()
    opt.step()
    y = torch.cat([lin(x).detach() for x in xs])
    st = s2d.layer_stats()[0]
    assert s2d.step == 1 and st.max_activation == pytest.approx(float(y.abs().max()))
    j, i = divmod(int(y.abs().argmax()), 6)
    assert st.pcdr == pytest.approx(pcdr_curve(lin.weight, torch.cat(xs)[j], i)[:3].tolist(), abs=1e-6)


def test_skipped_step_does_not_advance_or_refresh():
    """torch.amp.GradScaler skips optimizer.step on inf grads: S2D must not count or consume it."""
    lin = nn.Linear(6, 6)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(selection="all", interval=2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    w0 = lin.weight.detach().clone()
    scaler.scale(lin(torch.randn(3, 6)).sum() * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert s2d.step == 0 and s2d.layer_stats() == [] and torch.equal(lin.weight, w0)
    for _ in range(3):
        scaler.scale(lin(torch.randn(3, 6)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert s2d.step == 3 and s2d.layer_stats()[0].refreshed_at == 2


def test_remove_restores_plain_optimizer():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5, dtype=D)
    ref = copy.deepcopy(lin)
    opt, opt_ref = torch.optim.SGD(lin.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    s2d = SelectiveSpectralDecay(lin, opt, S2DConfig(strength=0.5, selection="all"))
    s2d.remove()
    x = torch.randn(4, 5, dtype=D)
    for m, o in ((lin, opt), (ref, opt_ref)):
        m(x).sum().backward()
        o.step()
    assert torch.equal(lin.weight, ref.weight) and s2d.factors() == {}


# ----------------------------------------------------------------------------- robustness
class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.good, self.bad_w, self.bad_a = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        xa = x.clone()
        xa[0, 0] = math.inf
        return self.good(x), self.bad_w(x), self.bad_a(xa)


def test_non_finite_layers_are_skipped_others_penalised():
    torch.manual_seed(0)
    model = _Branches()
    with torch.no_grad():
        model.bad_w.weight[1, 2] = math.nan
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s2d = SelectiveSpectralDecay(model, opt, S2DConfig(strength=0.1, selection="all"))
    w_good = model.good.weight.detach().clone()
    good, _, _ = model(torch.randn(4, 8))
    good.sum().backward()                       # only `good` gets a gradient
    task = model.good.weight.grad.clone()
    opt.step()
    stats = {s.name: s for s in s2d.layer_stats()}
    assert stats["bad_w"].skipped and stats["bad_w"].reason == "non-finite weight"
    assert stats["bad_a"].skipped and stats["bad_a"].reason == "non-finite activation"
    assert not stats["good"].skipped and set(s2d.factors()) == {"good"}
    expected = w_good - 0.1 * (task + _autograd_penalty(w_good.double(), 0.1, 2.0, 3).float())
    torch.testing.assert_close(model.good.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model.bad_a.weight).all()


# ----------------------------------------------------------------------------- resume & training
class TinyEncoder(nn.Module):
    """A 2-layer post-LN transformer classifier (d=32) on token sequences."""

    def __init__(self, vocab: int = 16, d: int = 32, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _task(n: int, seed: int):
    """Label = whether token 1 appears more often than token 2."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (n, 12), generator=g)
    return ids, ((ids == 1).sum(1) > (ids == 2).sum(1)).long()


def _plant_spike(model: TinyEncoder, scale: float = 15.0) -> str:
    """Give layer 0's fc1 a dominant direction aligned with its mean input (an outlier-prone start,
    like a pre-trained layer with an inflated top singular value)."""
    lin = model.enc.layers[0].linear1
    cap = {}
    h = lin.register_forward_hook(lambda m, a, o: cap.update(x=a[0].detach()))
    with torch.no_grad():
        model(_task(64, seed=5)[0])
    h.remove()
    v = cap["x"].reshape(-1, 32).mean(0)
    u = torch.randn(64)
    with torch.no_grad():
        lin.weight += scale * torch.outer(u / u.norm(), v / v.norm())
    return "enc.layers.0.linear1"


def _train(s2d_cfg: S2DConfig | None, steps: int = 30, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyEncoder()
    spiked = _plant_spike(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    s2d = SelectiveSpectralDecay(model, opt, s2d_cfg) if s2d_cfg else None
    ids, y = _task(steps * 16, seed=1)
    losses, selected = [], set()
    for t in range(steps):
        sl = slice(16 * t, 16 * (t + 1))
        loss = nn.functional.cross_entropy(model(ids[sl]), y[sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if s2d is not None:
            selected |= {s.name for s in s2d.layer_stats() if s.k_target is not None}
    return model, selected, losses, spiked


def _max_abs_output(model: nn.Module, name: str, ids: torch.Tensor) -> float:
    out = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.update(v=float(o.abs().max())))
    with torch.no_grad():
        model(ids)
    h.remove()
    return out["v"]


def test_training_with_s2d_lowers_sigma_and_outliers():
    base, _, base_losses, spiked = _train(None)
    reg, selected, reg_losses, _ = _train(S2DConfig(strength=0.05, interval=10))
    assert spiked in selected
    ids, _ = _task(64, seed=7)
    for name in selected:
        w_b, w_r = base.get_submodule(name).weight, reg.get_submodule(name).weight
        assert torch.linalg.matrix_norm(w_r, 2) < torch.linalg.matrix_norm(w_b, 2)
        assert _max_abs_output(reg, name, ids) < _max_abs_output(base, name, ids)
    s_b = float(torch.linalg.matrix_norm(base.get_submodule(spiked).weight.detach(), 2))
    s_r = float(torch.linalg.matrix_norm(reg.get_submodule(spiked).weight.detach(), 2))
    assert s_r < 0.9 * s_b
    first, last = sum(reg_losses[:5]) / 5, sum(reg_losses[-5:]) / 5
    assert last < first


def test_resume_is_bitwise_identical():
    cfg = S2DConfig(strength=0.05, interval=3, tau=0.5)
    torch.manual_seed(0)
    model = TinyEncoder()
    ids, y = _task(8 * 10, seed=2)
    init = copy.deepcopy(model.state_dict())

    def run(model, opt, steps):
        for t in steps:
            sl = slice(8 * t, 8 * (t + 1))
            nn.functional.cross_entropy(model(ids[sl]), y[sl]).backward()
            opt.step()
            opt.zero_grad()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s2d = SelectiveSpectralDecay(model, opt, cfg)
    run(model, opt, range(10))
    # interrupted: 4 steps, checkpoint through torch.save / weights_only load, fresh objects, 6 more
    m2 = TinyEncoder()
    m2.load_state_dict(init)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    s2 = SelectiveSpectralDecay(m2, o2, cfg)
    run(m2, o2, range(4))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict(), "s2d": s2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3 = TinyEncoder()
    m3.load_state_dict(ck["model"])
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2)
    o3.load_state_dict(ck["opt"])
    s3 = SelectiveSpectralDecay(m3, o3, cfg)
    s3.load_state_dict(ck["s2d"])
    run(m3, o3, range(4, 10))
    assert s3.step == s2d.step == 10
    assert any(s.k_target for s in s3.layer_stats())
    for (n, a), (_, b) in zip(model.state_dict().items(), m3.state_dict().items()):
        assert torch.equal(a, b), n
    assert [asdict(s) for s in s3.layer_stats()] == [asdict(s) for s in s2d.layer_stats()]
