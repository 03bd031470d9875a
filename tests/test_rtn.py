"""RTN PTQ: S2D paper defaults (weights symmetric per output channel, activations asymmetric per tensor,
min/max over all calibration batches), checked against closed forms and independently captured ranges."""
import copy

import pytest
import torch
import transformers as tf

from s2d.quant import (QuantConfig, QuantLinear, RTNConfig, available_methods, list_quantizers, named_quantizers,
                       prepare_model, quantize_model)
from s2d.quant.ptq.rtn import rtn

SETTINGS = [(8, 8), (6, 6), (5, 5), (4, 4), (3, 4), (2, 8)]


def _tiny_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2)
    return tf.BertForSequenceClassification(cfg).eval()


def _batches(n=3):
    out = []
    for _ in range(n):
        mask = torch.ones(4, 10, dtype=torch.long)
        mask[0, 6:] = 0
        out.append({"input_ids": torch.randint(5, 100, (4, 10)), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (4,))})
    return out


def test_rtn_is_registered():
    assert "rtn" in available_methods()


@pytest.mark.parametrize("w_bits, a_bits", SETTINGS)
def test_rtn_ranges_match_closed_form_and_observed_minmax(w_bits, a_bits):
    model = _tiny_bert()
    calib = _batches()
    seen: dict[str, list] = {}
    current = {}

    def tracked(batches):  # run_batches consumes the batches in order: remember the live padding mask
        for b in batches:
            current["mask"] = b["attention_mask"].bool()
            yield b

    def hook(name):
        def fn(mod, args):
            if mod.input_quantizer.calibrating:
                x = args[0]
                if x.dim() == 3:  # token activations: padding positions are not calibration data
                    x = x[current["mask"]]
                lo, hi = seen.get(name, (float("inf"), float("-inf")))
                seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
        return fn

    def attach(m):  # hooks go on after the swap so they see the calibration pass
        for n, mod in m.named_modules():
            if isinstance(mod, QuantLinear):
                mod.register_forward_pre_hook(hook(n))

    spec = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    prepare_model(model, spec)
    attach(model)
    rtn(model, spec, tracked(calib), RTNConfig(), False)
    rows = {r["name"]: r for r in list_quantizers(model)}
    n_lin = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        n_lin += 1
        wq, iq = mod.weight_quantizer, mod.input_quantizer
        expected_scale = mod.weight.detach().abs().amax(1) / (2 ** (w_bits - 1) - 1)
        torch.testing.assert_close(wq.scale, expected_scale)
        assert wq.symmetric and wq.granularity == "channel" and float(wq.zero_point.abs().sum()) == 0
        assert not iq.symmetric and iq.granularity == "tensor"
        assert rows[f"{name}.input_quantizer"]["range"] == pytest.approx(list(seen[name]), rel=1e-6)
        assert rows[f"{name}.input_quantizer"]["bits"] == a_bits and rows[f"{name}.weight_quantizer"]["bits"] == w_bits
        # asymmetric per-tensor: scale = (max(hi,0) - min(lo,0)) / (2^b - 1)
        lo, hi = min(seen[name][0], 0.0), max(seen[name][1], 0.0)
        assert float(iq.scale) == pytest.approx((hi - lo) / (2**a_bits - 1), rel=1e-6)
    assert n_lin == 2 * 6 + 2  # 6 per layer + pooler + classifier


def test_rtn_output_error_decreases_with_bits():
    model, calib = _tiny_bert(), _batches()
    batch = {k: v for k, v in calib[0].items() if k != "labels"}
    with torch.no_grad():
        ref = model(**batch).logits
    err = {}
    for w, a in SETTINGS[:5]:
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=w, a_bits=a), "rtn", calib, progress=False)
        with torch.no_grad():
            err[(w, a)] = float((q(**batch).logits - ref).norm() / ref.norm())
    assert err[(8, 8)] < err[(6, 6)] < err[(4, 4)] and err[(8, 8)] < 0.02


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


SENTENCES = [
    "a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate cliches from start to finish.",
    "an utterly charming and hilarious film that reminded me why i love cinema.", "dull, lifeless and far too long.",
    "the performances are uniformly excellent.", "i walked out halfway through.",
    "a moving meditation on grief and family.", "the jokes fall flat and the pacing drags.",
    "visually stunning but emotionally hollow.", "one of the best thrillers of the decade.",
    "it never finds its footing.", "smart, funny and surprisingly tender.",
    "a mess of a movie with no redeeming qualities.", "the director's confident hand is evident in every frame.",
    "predictable and forgettable.", "a delightful surprise from beginning to end.",
]


@pytest.mark.slow
def test_real_minilm_w8a8_close_w4a4_worse():
    from s2d.models import load

    bundle = load("minilm-l6", task="classification", num_labels=2)
    tok, model = bundle.tokenizer, bundle.model.eval()
    calib = [dict(tok(SENTENCES[i:i + 4], padding=True, return_tensors="pt")) for i in range(0, 8, 4)]
    evalb = dict(tok(SENTENCES[8:], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model.bert(**evalb).pooler_output, model(**evalb).logits
    res = {}
    for name, spec in {"w8a8": QuantConfig(8, 8), "w8a8-pct": QuantConfig(8, 8, a_range="percentile"),
                       "w4a4": QuantConfig(4, 4)}.items():
        q = quantize_model(copy.deepcopy(model), spec, "rtn", calib, progress=False)
        with torch.no_grad():
            res[name] = _cos(q(**evalb).logits, ref[1]), _cos(q.bert(**evalb).pooler_output, ref[0])
    print("minilm cosine (logits, pooled):", res)
    # Measured (2-core CPU): w8a8 (0.9935, 0.9942), w8a8-pct (0.9933, 0.9922), w4a4 (0.57, 0.67). RTN ranges are
    # min / max over the real (unpadded) calibration tokens; with padding included w8a8 logits fell to 0.987.
    # The logits come from an untrained 2-way head (|logit| < 0.07), so the pooled cosine is checked too.
    assert res["w8a8"][0] > 0.99 and res["w8a8"][1] > 0.99
    assert res["w8a8-pct"][0] > 0.99
    assert res["w4a4"][0] < res["w8a8"][0] - 0.1 and res["w4a4"][1] < res["w8a8"][1] - 0.1  # visibly worse


def test_padding_does_not_change_calibrated_ranges():
    """Calibrating on a padded batch gives exactly the ranges of calibrating on its unpadded rows one by one."""
    model, batch = _tiny_bert(), _batches(1)[0]
    batch["input_ids"][0, 6:] = 0  # the padded row's pad ids (id 0 = [PAD])
    padded = quantize_model(copy.deepcopy(model), QuantConfig(), "rtn", [batch], progress=False)
    rows = [{k: v[i:i + 1, :int(batch["attention_mask"][i].sum())] for k, v in batch.items() if k != "labels"}
            for i in range(4)]
    single = quantize_model(copy.deepcopy(model), QuantConfig(), "rtn", rows, progress=False)
    a, b = named_quantizers(padded), named_quantizers(single)
    assert a.keys() == b.keys()
    for name in a:  # the effective grid (ranges are widened to include 0, e.g. masked-out probabilities)
        torch.testing.assert_close(a[name].scale, b[name].scale, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(a[name].zero_point, b[name].zero_point, msg=name)
    # control: treating the pad tokens as real tokens does change some ranges
    unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    c = named_quantizers(quantize_model(copy.deepcopy(model), QuantConfig(), "rtn", [unmasked], progress=False))
    assert any(not torch.allclose(a[n].scale, c[n].scale) for n in a)
