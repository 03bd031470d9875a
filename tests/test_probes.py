"""s2d.probes against brute-force statistics over all captured values."""
import json
from collections import Counter
import math
from dataclasses import asdict

import pytest
import torch
from torch import nn

from s2d import probes
from s2d.probes import capture_activations, quantile_from_top, spectral_table
from s2d.spectral import pcdr_curve, select_rank


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(12, 24), nn.Linear(24, 6), nn.Dropout(0.5)

    def forward(self, x, labels=None):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _batches():
    g = torch.Generator().manual_seed(0)
    # different sizes and a shifted batch exercise the streaming merge of moments
    return [{"x": torch.randn(n, 12, generator=g) + shift, "labels": torch.zeros(n)}
            for n, shift in ((5, 0.0), (1, -1.0), (40, 0.0), (17, 3.0))]


def _brute(model, name, batches, where="output"):
    vals = []
    mod = model.get_submodule(name)
    h = mod.register_forward_hook(lambda m, a, o: vals.append((o if where == "output" else a[0]).reshape(-1)))
    with torch.no_grad():
        for b in batches:
            model(b["x"])
    h.remove()
    return torch.cat(vals).double()


@pytest.mark.parametrize("where", ["output", "input"])
def test_capture_matches_brute_force(where):
    torch.manual_seed(0)
    model = Net().train()
    stats = capture_activations(model, _batches(), where=where, sample_size=50, progress=False)
    assert model.training and model.drop.training      # modes restored
    model.eval()
    assert set(stats) == {"fc1", "fc2"}
    for name, st in stats.items():
        a = _brute(model, name, _batches(), where)
        mu = a.mean()
        kurt = float(((a - mu) ** 4).mean() / ((a - mu) ** 2).mean() ** 2)
        assert st.count == a.numel()
        assert st.max_abs == pytest.approx(float(a.abs().max()), rel=1e-6)
        assert st.kurtosis == pytest.approx(kurt, rel=1e-9)
        assert st.p99 == pytest.approx(float(torch.quantile(a.abs(), 0.99)), rel=1e-6)
        assert st.p999 == pytest.approx(float(torch.quantile(a.abs(), 0.999)), rel=1e-6)
        assert len(st.sample) == 50                       # drawn without replacement: a sub-multiset
        assert not Counter(st.sample) - Counter(a.float().tolist())
        json.dumps(asdict(st))
    again = capture_activations(model, _batches(), where=where, sample_size=50, progress=False)
    assert again["fc1"].sample == stats["fc1"].sample    # seeded


def test_percentiles_fall_back_to_sample_on_adversarial_stream():
    """A batch of large values, then many tiny ones: the tail buffer dropped values p99 needs."""
    lin = nn.Identity()
    xs = [1 + torch.rand(50, 1), *[1e-3 * torch.rand(10, 1) for _ in range(100)]]
    model = nn.Sequential(lin)
    full = capture_activations(model, xs, modules={"id": lin}, sample_size=10_000, progress=False)["id"]
    a = torch.cat(xs).reshape(-1).double().abs()
    assert full.p99 == pytest.approx(float(torch.quantile(a, 0.99)), rel=1e-6)   # sample holds everything
    none = capture_activations(model, xs, modules={"id": lin}, sample_size=0, progress=False)["id"]
    assert math.isnan(none.p99) and none.max_abs == full.max_abs


def test_capture_selected_modules_and_tensor_batches():
    model = Net().eval()
    xs = [b["x"] for b in _batches()]
    stats = capture_activations(model, xs, modules={"first": model.fc1}, sample_size=0, progress=False)
    assert list(stats) == ["first"] and stats["first"].sample == []
    with pytest.raises(ValueError):
        capture_activations(model, xs, where="weights", progress=False)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001, 5000])
@pytest.mark.parametrize("q", [0.5, 0.99, 0.999])
def test_quantile_from_top_matches_torch(n, q):
    v = torch.rand(n, dtype=torch.float64)
    keep = min(math.ceil(0.01 * n) + 2, n) if q > 0.9 else n
    top = v.topk(keep).values
    assert quantile_from_top(top, n, q) == pytest.approx(float(torch.quantile(v, q)), rel=1e-12)


def test_spectral_table_joins_spectrum_pcdr_and_stats():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():                                          # plant a dominant direction in fc1
        v = torch.ones(12) / 12**0.5
        model.fc1.weight += 8 * torch.outer(torch.randn(24).sign() / 24**0.5, v)
    rows = spectral_table(model, _batches(), k_max=3, tau=0.9, progress=False)
    assert [r.name for r in rows] == ["fc1", "fc2"]
    stats = capture_activations(model, _batches(), sample_size=0, progress=False)
    for r in rows:
        lin = model.get_submodule(r.name)
        xs = torch.cat([b["x"] for b in _batches()])
        if r.name == "fc2":
            xs = torch.relu(model.fc1(xs))
        y = lin(xs).detach()
        j, i = divmod(int(y.abs().argmax()), y.shape[1])
        curve = pcdr_curve(lin.weight, xs[j], i)
        assert r.shape == tuple(lin.weight.shape) and r.role == "other"   # no transformer block here
        assert r.sigma_max == pytest.approx(float(torch.linalg.svdvals(lin.weight.double())[0]), rel=1e-5)
        assert r.pcdr == pytest.approx(curve[:3].tolist(), abs=1e-5)
        assert r.k_target == select_rank(curve, 0.9, 3)
        assert r.max_abs == pytest.approx(float(y.abs().max()), rel=1e-6)
        assert (r.kurtosis, r.p99) == (stats[r.name].kurtosis, stats[r.name].p99)
        json.dumps(asdict(r))
    assert rows[0].k_target == 1


def test_spectral_table_uses_model_roles(monkeypatch):
    monkeypatch.setattr(probes, "linear_roles", lambda model: {"fc1": "fc1", "fc2": "fc2"})
    rows = spectral_table(Net(), _batches(), progress=False)
    assert [r.role for r in rows] == ["fc1", "fc2"]
