"""Per-site quantization sensitivity on planted models.

Independent references: a model whose damage is planted in one known site (it must rank first), 16
bits (no site does damage), and a weight site recomputed by hand with ``quantize_dequantize``.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from s2d.quant import QuantConfig
from s2d.quant.primitives import quantize_dequantize
from s2d.quant.sensitivity import first_examples, merge_batches, site_sensitivity


class TwoLayer(nn.Module):
    """x (B, 8) -> fc2(relu(fc1(x))) as ``.logits`` (B, 4)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return SimpleNamespace(logits=self.fc2(torch.relu(self.fc1(x))))


def _data(n=256, seed=0, outlier=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    if outlier:
        x[0, 3] = 400.0                        # one huge input value: fc1's per-tensor input range explodes
    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight[:, 3] = 0.0           # ... without reaching fc1's output: only fc1's input site suffers
        labels = model(x).logits.argmax(-1)
    return model, [{"x": x[i: i + 64], "labels": labels[i: i + 64]} for i in range(0, n, 64)]


def test_planted_input_outlier_ranks_first():
    torch.manual_seed(0)
    model, batches = _data()
    rep = site_sensitivity(model, QuantConfig(4, 4), calib=batches[:2], test=batches, progress=False)
    assert [s.site for s in rep.sites][0] == "fc1.input_quantizer"
    top = rep.sites[0]
    assert top.kl > 5 * rep.sites[1].kl and top.role == "input" and top.range[1] >= 400
    assert top.recovered is not None and top.recovered >= 0         # keeping it float recovers accuracy
    assert rep.float_accuracy == 1.0 and rep.quant_accuracy < 1.0
    assert len(rep.sites) == 4 and rep.examples == 256


def test_16_bits_do_no_damage_anywhere():
    torch.manual_seed(0)
    model, batches = _data(outlier=False)
    rep = site_sensitivity(model, QuantConfig(16, 16), calib=batches[:1], test=batches, progress=False)
    for s in rep.sites:
        assert s.kl < 1e-6 and s.kl_calib < 1e-6 and s.agreement == 1.0 and abs(s.recovered) == 0.0


def test_weight_site_matches_a_hand_quantized_weight():
    torch.manual_seed(0)
    model, batches = _data(outlier=False)
    rep = site_sensitivity(model, QuantConfig(3, 8), calib=batches[:1], test=batches, progress=False)
    site = next(s for s in rep.sites if s.site == "fc2.weight_quantizer")
    hand = copy.deepcopy(model)
    with torch.no_grad():
        hand.fc2.weight.copy_(quantize_dequantize(hand.fc2.weight, 3, True, axis=0))
        x = torch.cat([b["x"] for b in batches])
        ref, got = model(x).logits.log_softmax(-1), hand(x).logits.log_softmax(-1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert site.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)


def test_merge_batches_pads_token_rows():
    a = {"input_ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([1])}
    b = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.tensor([[1, 1, 1, 1]]),
         "labels": torch.tensor([0])}
    (m,) = merge_batches([a, b], 8)
    assert m["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert m["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and m["labels"].tolist() == [1, 0]
    assert [len(x["labels"]) for x in merge_batches([a, b, a], 2)] == [2, 1]

    def two_then_fail():
        yield a
        yield b
        raise AssertionError("read past the examples it needs")
    (f,) = first_examples(two_then_fail(), 2)
    assert f["input_ids"].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6]]
    assert first_examples([a, b], 1)[0]["labels"].tolist() == [1]


def test_all_but_view_only_for_the_top_sites():
    torch.manual_seed(0)
    model, batches = _data()
    rep = site_sensitivity(model, QuantConfig(4, 4), calib=batches[:1], test=batches, recover_top=1, progress=False)
    assert rep.sites[0].recovered is not None and rep.sites[0].kl_recovered is not None
    assert all(s.recovered is None and s.kl_recovered is None for s in rep.sites[1:])
