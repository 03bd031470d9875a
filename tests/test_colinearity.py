"""Colinearity Decay: the alignment and its gradients against autograd and the SVD form, the held top
singular values, a planted aligned pair, the pairs read from the block layouts, and the hook contract."""
import copy

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from s2d import CDConfig, ColinearityDecay, Pair
from s2d.colinearity.penalty import (
    alignment, alignment_gradients, effective_first, hold_top_singular_, pair_steps, top_alignment,
)
from s2d.models import blocks, colinearity_pairs
from s2d.probes import pair_alignments
from test_models import FAMILIES


def _orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("shape", [(5, 7, 3), (8, 8, 8), (3, 12, 6)])   # (d_out, d_mid, d_in)
def test_gradients_match_autograd(shape):
    d_out, d_mid, d_in = shape
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(d_mid, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_out, d_mid, generator=g, dtype=torch.float64, requires_grad=True)
    ref = (b @ a).square().sum() / (a.square().sum() * b.square().sum())
    ga_ref, gb_ref = torch.autograd.grad(ref, (a, b))
    r, ga, gb = alignment_gradients(a.detach(), b.detach())
    torch.testing.assert_close(r, ref.detach())
    torch.testing.assert_close(ga, ga_ref)
    torch.testing.assert_close(gb, gb_ref)
    # scale invariance: the gradient is orthogonal to each weight, so ‖W‖_F is constant to first order
    assert abs(float((ga * a.detach()).sum())) < 1e-12 and abs(float((gb * b.detach()).sum())) < 1e-12


def test_alignment_is_the_sigma_weighted_cosine_of_the_svds():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    ua, sa, _ = torch.linalg.svd(a, full_matrices=False)
    _, sb, vbh = torch.linalg.svd(b, full_matrices=False)
    cos2 = (vbh @ ua).square()                                # (i over B, j over A)
    brute = (sb[:, None] ** 2 * sa[None, :] ** 2 * cos2).sum() / ((sa ** 2).sum() * (sb ** 2).sum())
    torch.testing.assert_close(alignment(a, b), brute)
    # closed forms at the ends: one direction straight through both -> 1; orthogonal subspaces -> 0
    u = _orth(9, 2, g)
    assert float(alignment(u[:, :1] @ torch.ones(1, 4, dtype=torch.float64),
                           torch.ones(6, 1, dtype=torch.float64) @ u[:, :1].T)) == pytest.approx(1.0)
    assert float(alignment(u[:, :1] @ torch.ones(1, 4, dtype=torch.float64),
                           torch.ones(6, 1, dtype=torch.float64) @ u[:, 1:].T)) == pytest.approx(0.0, abs=1e-24)


@pytest.mark.parametrize("rows,kv_repeat", [(None, 1), ((4, 8), 1), (None, 3)])
def test_pair_steps_match_autograd_through_slices_and_gqa(rows, kv_repeat):
    g = torch.Generator().manual_seed(kv_repeat)
    hd, kv = 2, 2
    first = torch.randn(12 if rows else kv * hd, 5, generator=g, dtype=torch.float64)
    d_mid = (rows[1] - rows[0]) if rows else kv * hd * kv_repeat
    second = torch.randn(7, d_mid, generator=g, dtype=torch.float64)
    pair = Pair("a", "b", rows=rows, head_dim=hd if kv_repeat > 1 else 0, kv_repeat=kv_repeat)
    w1, w2 = first.clone().requires_grad_(), second.clone().requires_grad_()
    block = w1 if rows is None else w1[rows[0]:rows[1]]
    eff = block if kv_repeat == 1 else repeat_kv(block.reshape(kv, hd, 5).permute(0, 2, 1)[None], kv_repeat)[0] \
        .permute(0, 2, 1).reshape(-1, 5)                     # transformers' own kv-head repetition
    torch.testing.assert_close(effective_first(block.detach(), pair), eff.detach())
    ref = alignment(eff, w2)
    g1, g2 = torch.autograd.grad(ref, (w1, w2))
    r, s1, s2 = pair_steps(first, second, pair)
    torch.testing.assert_close(r, ref.detach())
    g1_block = g1 if rows is None else g1[rows[0]:rows[1]]
    torch.testing.assert_close(s1, g1_block * block.detach().square().sum())
    torch.testing.assert_close(s2, g2 * second.square().sum())
    if rows:
        assert float(g1[: rows[0]].abs().max()) == 0.0      # rows outside the pair get nothing


def test_held_singular_values_move_at_second_order_only():
    g = torch.Generator().manual_seed(5)
    w, d = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(10, 6, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    held = hold_top_singular_(d.clone(), u[:, :3], vh[:3].T)
    for eps in (1e-3, 1e-4):
        moved = torch.linalg.svdvals(w + eps * held) - s
        free = torch.linalg.svdvals(w + eps * d) - s
        assert float(moved[:3].abs().max()) < 10 * eps ** 2   # O(eps²) for the held ones
        assert float(free[:3].abs().max()) > 0.1 * eps        # O(eps) without the hold


def _planted_pair(cos=0.9, d_in=16, d_mid=24, d_out=16, seed=0, top=(5.0, 4.0, 3.0, 2.0)):
    """A (d_mid, d_in), B (d_out, d_mid) with singular values ``top``, then <= 1, and B's top input
    direction at cosine ``cos`` to A's top output direction."""
    g = torch.Generator().manual_seed(seed)
    ua, va, ub, vb = _orth(d_mid, d_in, g), _orth(d_in, d_in, g), _orth(d_out, d_out, g), _orth(d_mid, d_out, g)
    s = torch.linspace(1, 0.2, d_in, dtype=torch.float64)
    s[:len(top)] = torch.tensor(top)
    rest = vb[:, 1] - (vb[:, 1] @ ua[:, 0]) * ua[:, 0]
    vb[:, 0] = cos * ua[:, 0] + (1 - cos ** 2) ** 0.5 * rest / rest.norm()
    vb = torch.linalg.qr(vb)[0] * torch.sign(torch.linalg.qr(vb)[1].diagonal())
    return ua @ torch.diag(s) @ va.T, ub @ torch.diag(s[:d_out]) @ vb.T


class _PairNet(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.up, self.down = nn.Linear(a.shape[1], a.shape[0], bias=False), nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.up.weight.copy_(a.float())
            self.down.weight.copy_(b.float())

    def forward(self, x):
        return self.down(self.up(x))


def _run_cd(net, config, steps, lr=0.01):
    opt = torch.optim.SGD(net.parameters(), lr=lr)       # zero task gradient: only CD moves the weights
    cd = ColinearityDecay(net, opt, config, [Pair("up", "down", "ffn")])
    for _ in range(steps):
        (0.0 * net(torch.randn(2, net.up.in_features)).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return cd


def _top_cos(a, b):
    return float((torch.linalg.svd(a)[0][:, 0] @ torch.linalg.svd(b)[2][0]).abs())


def test_planted_pair_loses_alignment_and_keeps_its_top_singular_values():
    a, b = _planted_pair()
    net = _PairNet(a, b)
    cd = _run_cd(net, CDConfig(strength=1.0, keep_top=4, interval=5), steps=300)
    a1, b1 = net.up.weight.detach().double(), net.down.weight.detach().double()
    assert _top_cos(a, b) == pytest.approx(0.9, abs=1e-6) and _top_cos(a1, b1) < 0.05
    assert top_alignment(a1, b1) < 0.5 * top_alignment(a, b) and top_alignment(a, b) > 0.85
    for before, after in ((a, a1), (b, b1)):
        torch.testing.assert_close(torch.linalg.svdvals(after)[:4], torch.linalg.svdvals(before)[:4].float().double(),
                                   rtol=0.03, atol=0)
    assert 1.0 < float(a1.norm() / a.norm()) < 1.08         # the held step lets the tail grow a little
    stats = cd.pair_stats()[0]
    assert stats.kind == "ffn" and stats.refreshed_at == 295 and stats.alignment < 1.0
    stats.alignment = -1.0
    assert cd.pair_stats()[0].alignment > 0                   # a copy: the caller cannot change CD's record
    # without the hold the same descent also reshapes the top of the spectra: the hold is what keeps it
    net0 = _PairNet(a, b)
    _run_cd(net0, CDConfig(strength=1.0, keep_top=0), steps=300)
    change = [float(((torch.linalg.svdvals(w.detach().double())[:4] - torch.linalg.svdvals(ref)[:4])
                     / torch.linalg.svdvals(ref)[:4]).abs().max()) for w, ref in ((net0.up.weight, a), (net0.down.weight, b))]
    assert min(change) > 0.1, change
    # with a single spike, plain descent on R shrinks σ_max itself (S2D's mechanism); the hold keeps it
    a, b = _planted_pair(top=(5.0,))
    for keep, low, high in ((0, 0.0, 0.95), (4, 0.98, 1.03)):
        net = _PairNet(a, b)
        _run_cd(net, CDConfig(strength=1.0, keep_top=keep, interval=5), steps=300)
        assert low * 5.0 < float(torch.linalg.svdvals(net.up.weight.detach())[0]) < high * 5.0


def test_state_dict_resume_equals_uninterrupted_run_and_remove_detaches():
    a, b = _planted_pair(seed=1)
    cfg = CDConfig(strength=0.5, keep_top=2, interval=3)
    full = _PairNet(a, b)
    _run_cd(full, cfg, steps=8)
    part = _PairNet(a, b)
    cd = _run_cd(part, cfg, steps=5)
    state, weights = cd.state_dict(), copy.deepcopy(part.state_dict())
    cd.remove()
    resumed = _PairNet(a, b)
    resumed.load_state_dict(weights)
    opt = torch.optim.SGD(resumed.parameters(), lr=0.01)
    cd2 = ColinearityDecay(resumed, opt, cfg, [Pair("up", "down", "ffn")])
    cd2.load_state_dict(state)
    for _ in range(3):
        (0.0 * resumed(torch.randn(2, 16)).sum()).backward()
        opt.step()
    torch.testing.assert_close(resumed.state_dict(), full.state_dict())
    assert cd2.step == 8
    with pytest.raises(ValueError, match="strength=0.5, now 1.0"):
        other = torch.optim.SGD(resumed.parameters(), lr=0.01)
        ColinearityDecay(resumed, other, CDConfig(strength=1.0), [Pair("up", "down", "ffn")]).load_state_dict(state)
    cd2.remove()
    before = copy.deepcopy(resumed.state_dict())
    (0.0 * resumed(torch.randn(2, 16)).sum()).backward()
    opt.step()
    torch.testing.assert_close(resumed.state_dict(), before)    # detached: CD no longer moves anything


def test_weights_without_gradients_and_bad_pairs():
    a, b = _planted_pair(seed=2)
    net = _PairNet(a, b)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    ColinearityDecay(net, opt, CDConfig(), [Pair("up", "down", "ffn")])
    before = copy.deepcopy(net.state_dict())
    opt.step()                                                 # no backward: every .grad is None
    torch.testing.assert_close(net.state_dict(), before)
    with pytest.raises(ValueError, match="'nope' is not a module with a 2-D weight"):
        ColinearityDecay(net, opt, CDConfig(), [Pair("nope", "down")])
    with pytest.raises(ValueError, match="not in the optimizer"):
        ColinearityDecay(net, torch.optim.SGD(net.up.parameters(), lr=0.1), CDConfig(), [Pair("up", "down")])
    with pytest.raises(ValueError, match="reads 16 inputs, the first gives 24"):
        pair_steps(net.up.weight, net.up.weight.T[:, :16].T, Pair("up", "down"))


@pytest.mark.parametrize("field,value", [("strength", -1.0), ("keep_top", -1), ("interval", 0), ("strength", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"CDConfig.{field} must be"):
        CDConfig(**{field: value})


@pytest.mark.parametrize("family", ["bert", "mpnet", "dinov2", "llama", "qwen2", "timm-vit"])
def test_pairs_from_the_block_layout_feed_each_other(family):
    """The layout's pairs of every family: one attention and one FFN pair per block, shapes that chain
    (the second weight reads what the effective first weight writes), fused-qkv rows and GQA repeats."""
    model = FAMILIES[family][0]().eval()
    pairs = colinearity_pairs(model)
    infos = blocks(model)
    assert len(pairs) == 2 * len(infos) and [p.kind for p in pairs] == ["attn", "ffn"] * len(infos)
    modules = dict(model.named_modules())
    for pair in pairs:
        r, s1, s2 = pair_steps(modules[pair.first].weight, modules[pair.second].weight, pair)
        assert 0 < float(r) <= 1 and s2.shape == modules[pair.second].weight.shape
    attn = pairs[0]
    if family == "timm-vit":
        assert attn.rows == (64, 96)
    if family in ("llama", "qwen2"):       # 2 query heads share 1 kv head of 16 dims
        assert (attn.kv_repeat, attn.head_dim) == (2, 16)
    assert colinearity_pairs(model, kinds=("ffn",)) == pairs[1::2]
    assert len(pair_alignments(model)) == len(pairs)
    with pytest.raises(ValueError, match="unknown kinds"):
        colinearity_pairs(model, kinds=("qk",))


def test_cd_on_a_tiny_bert_lowers_every_pair_alignment():
    model = FAMILIES["bert"][0]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    cd = ColinearityDecay(model, opt, CDConfig(strength=50.0, keep_top=2, interval=5), colinearity_pairs)
    batch = FAMILIES["bert"][1](model)
    modules = dict(model.named_modules())
    before = [float(alignment(modules[p.first].weight.detach(), modules[p.second].weight.detach())) for p in cd.pairs]
    for _ in range(20):
        model(**batch).logits.sum().mul(0.0).backward()
        opt.step()
        opt.zero_grad()
    after = [float(alignment(modules[p.first].weight.detach(), modules[p.second].weight.detach())) for p in cd.pairs]
    assert all(x < 0.9 * y for x, y in zip(after, before)), (before, after)
