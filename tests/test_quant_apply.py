"""Whole-model fake quantization across model families (tiny random configs).

Independent references: the stock transformers attention (sdpa / eager) and the float model; the
quantized Linear vs a hand-written F.linear on hand-quantized input and weight."""
import copy
import dataclasses
import importlib
import pkgutil

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import s2d.quant
import s2d.quant.api as api
from s2d.quant.conv import QuantPatchConv, is_patch_conv
from s2d.quant import (QuantConfig, QuantLinear, RepQConfig, RTNConfig, available_methods, calibrate,
                       list_quantizers, named_quantizers, prepare_model, quantize_model, register_method,
                       set_quantization)
from s2d.quant.api import method_config, method_config_class
from s2d.quant.attention import AttentionQuantizers
from s2d.quant.prepare import quantizer_roles
from s2d.quant.primitives import quantize_dequantize
from s2d.quant.quantizers import UniformQuantizer
from s2d.quant.reparam import ChannelAffineInput, channel_affine_from_ranges

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
VISION = dict(SMALL, image_size=32, patch_size=8, num_channels=3)


def _text_batch(pad=True, left=False):
    ids = torch.randint(5, 90, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    if pad:
        if left:
            mask[1, :4] = 0
        else:
            mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _image_batch():
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def _naflex_batch():
    """SigLIP2's NaFlex input: flattened patches, a patch padding mask and each image's patch grid."""
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0                                   # second image: a 3 x 4 grid, 4 padded patches
    return {"pixel_values": torch.randn(2, 16, 3 * 8 * 8), "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor([[4, 4], [3, 4]])}


# name -> (builder(attn_implementation), batch factory, causal)
FAMILIES = {
    "bert": (lambda impl: tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, num_labels=3, **SMALL),
                                                           ) if impl is None else
             tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, num_labels=3, attn_implementation=impl,
                                                            **SMALL)), _text_batch, False),
    "mpnet": (lambda impl: tf.MPNetForSequenceClassification(tf.MPNetConfig(vocab_size=100, num_labels=3, **SMALL)),
              _text_batch, False),
    "dinov2": (lambda impl: tf.Dinov2ForImageClassification(tf.Dinov2Config(num_labels=3, attn_implementation=impl,
                                                                            **VISION)), _image_batch, False),
    "vit": (lambda impl: tf.ViTForImageClassification(tf.ViTConfig(num_labels=3, attn_implementation=impl, **VISION)),
            _image_batch, False),
    "siglip": (lambda impl: tf.SiglipVisionModel(tf.SiglipVisionConfig(attn_implementation=impl, **VISION)),
               _image_batch, False),
    "siglip2": (lambda impl: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(attn_implementation=impl, num_patches=16,
                                                                          **{k: v for k, v in VISION.items()
                                                                             if k != "image_size"})),
                _naflex_batch, False),
    "clip": (lambda impl: tf.CLIPVisionModel(tf.CLIPVisionConfig(attn_implementation=impl, **VISION)),
             _image_batch, False),
    "qwen2": (lambda impl: tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=100, num_key_value_heads=2,
                                                              attn_implementation=impl, **SMALL)),
              lambda: _text_batch(left=True), True),
    "llama": (lambda impl: tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, num_key_value_heads=2,
                                                              attn_implementation=impl, **SMALL)),
              lambda: _text_batch(left=False), True),
}
N_ATTN = 2  # layers per tiny model


def _out(model, batch):
    out = model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _build(family, impl="sdpa"):
    torch.manual_seed(0)
    return FAMILIES[family][0](impl).eval()


def _valid(family, batch, out):
    """Positions whose output is defined identically by every implementation (drop padded queries)."""
    mask = batch.get("attention_mask", batch.get("pixel_attention_mask"))
    if mask is not None and out.dim() == 3:
        return out[mask.bool()]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_disabled_quantizers_equal_stock_attention(family):
    batch = FAMILIES[family][1]()
    for impl in ("sdpa", "eager"):
        if family == "mpnet" and impl == "sdpa":
            continue  # MPNet has a single (inline eager) attention implementation
        ref = _build(family, impl)
        q = prepare_model(copy.deepcopy(ref), QuantConfig())
        set_quantization(q, False)
        with torch.no_grad():
            a, b = _valid(family, batch, _out(ref, batch)), _valid(family, batch, _out(q, batch))
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    attn = [m for m in q.modules() if isinstance(m, AttentionQuantizers)]
    assert len(attn) == N_ATTN


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_linear_and_attention_quantized_and_calibrated(family):
    model = _build(family)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    n_patch = sum(is_patch_conv(m) for m in model.modules())  # Conv2d patch embeddings: weight quantizer only
    batch = FAMILIES[family][1]()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), calib=[batch, FAMILIES[family][1]()], progress=False)
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] == names  # same names, all swapped
    assert sum(isinstance(m, QuantPatchConv) for m in model.modules()) == n_patch
    rows = list_quantizers(model)
    assert len(rows) == 2 * n_linear + 4 * N_ATTN + n_patch
    assert all(r["calibrated"] and r["range"] is not None and r["bits"] == 4 for r in rows)
    roles = {r["role"] for r in rows}
    assert roles == {"input", "weight", "attn_q", "attn_k", "attn_probs", "attn_v"}


@pytest.mark.parametrize("family", ["bert", "mpnet", "vit", "qwen2"])
def test_16_bit_equals_float(family):
    model = _build(family)
    batch = FAMILIES[family][1]()
    with torch.no_grad():
        ref = _valid(family, batch, _out(model, batch))
    quantize_model(model, QuantConfig(w_bits=16, a_bits=16), calib=[batch], progress=False)
    with torch.no_grad():
        out = _valid(family, batch, _out(model, batch))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["bert", "dinov2", "llama"])
def test_low_bits_change_output_monotonically(family):
    model = _build(family)
    batch = FAMILIES[family][1]()
    with torch.no_grad():
        ref = _out(model, batch)
    errs = {}
    for bits in (8, 4, 3):
        q = quantize_model(copy.deepcopy(model), QuantConfig(w_bits=bits, a_bits=bits), calib=[batch], progress=False)
        with torch.no_grad():
            errs[bits] = float((_out(q, batch) - ref).pow(2).mean() / ref.pow(2).mean())
    assert 0 < errs[8] < errs[4] < errs[3]
    assert errs[8] < 1e-2


def test_quant_linear_matches_hand_computation():
    lin = torch.nn.Linear(16, 8)
    w0 = lin.weight
    x = torch.randn(3, 5, 16)
    model = torch.nn.Sequential(lin)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=5, quantize_attention=False), calib=[{"input": x}],
                   progress=False)
    assert model[0] is lin and isinstance(lin, QuantLinear) and lin.weight is w0  # swapped in place
    expected = F.linear(quantize_dequantize(x, 5, symmetric=False), quantize_dequantize(w0, 4, True, axis=0), lin.bias)
    torch.testing.assert_close(model(x), expected)


def test_quantize_head_false_and_skip_leave_float_linears():
    model = _build("bert")
    quantize_model(model, QuantConfig(quantize_head=False, skip=("bert.pooler.*",)), calib=[_text_batch()],
                   progress=False)
    assert type(model.classifier) is torch.nn.Linear and type(model.bert.pooler.dense) is torch.nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)


def test_hooks_and_optimizer_parameters_survive():
    model = _build("vit")
    params = {n: p for n, p in model.named_parameters()}
    seen = []
    model.vit.layers[0].attention.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    quantize_model(model, QuantConfig(), calib=[_image_batch()], progress=False)
    assert {n: p for n, p in model.named_parameters()} == params  # same names, same Parameter objects
    assert seen  # the hook fired during calibration


def test_gradients_flow_through_fake_quant():
    model = _build("bert")
    batch = _text_batch()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), calib=[batch], progress=False)
    model.train()
    out = model(**batch, labels=torch.tensor([0, 2]))
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith("query.weight")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_method_and_missing_calib():
    with pytest.raises(ValueError, match=r"quantize_model\.method must be one of .*rtn"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), QuantConfig(), method="gptq", calib=[])
    with pytest.raises(ValueError, match="calib"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), QuantConfig(), method="rtn", calib=None)


def test_method_registry_and_configs():
    assert available_methods() == sorted(available_methods()) == ["erq", "ptq4vit", "repq", "rtn"]
    assert method_config_class("repq") is RepQConfig and method_config_class("rtn") is RTNConfig
    assert method_config("repq", {"max_tokens": 64}) == RepQConfig(max_tokens=64)
    assert method_config("rtn", {}) == RTNConfig()
    with pytest.raises(ValueError, match="RepQConfig has no field 'bogus'"):
        method_config("repq", {"bogus": 1})
    with pytest.raises(ValueError, match=r"quantize_model\.method must be one of"):
        method_config_class("gptq")


def test_quantize_model_rejects_mismatched_configs():
    lin = lambda: torch.nn.Sequential(torch.nn.Linear(2, 2))  # noqa: E731
    calib = [{"input": torch.randn(3, 2)}]
    with pytest.raises(TypeError, match="method 'rtn' takes a RTNConfig, got RepQConfig"):
        quantize_model(lin(), QuantConfig(), method="rtn", calib=calib, config=RepQConfig())
    with pytest.raises(ValueError, match="either as method= or as config="):
        quantize_model(lin(), QuantConfig(), method=RTNConfig(), calib=calib, config=RTNConfig())
    with pytest.raises(ValueError, match=r"quantize_model\.method must be one of .* or an instance"):
        quantize_model(lin(), QuantConfig(), method=QuantConfig(), calib=calib)


def test_register_method_dispatches_by_name_and_config_type(monkeypatch):
    monkeypatch.setattr(api, "_BY_NAME", dict(api._BY_NAME))  # registrations below are undone afterwards
    monkeypatch.setattr(api, "_BY_CONFIG", dict(api._BY_CONFIG))

    @dataclasses.dataclass(frozen=True)
    class HalfConfig:
        factor: float = 0.5  # weight multiplier applied before RTN calibration

    calls = []

    @register_method("half", HalfConfig)
    def half(model, spec, calib, config, progress):
        calls.append(config)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, QuantLinear):
                    m.weight.mul_(config.factor)
        calibrate(model, calib, progress=progress)

    assert "half" in available_methods() and method_config_class("half") is HalfConfig
    calib = [{"input": torch.randn(4, 3)}]
    torch.manual_seed(0)
    a = quantize_model(torch.nn.Sequential(torch.nn.Linear(3, 2)), QuantConfig(), method="half", calib=calib,
                       progress=False)
    torch.manual_seed(0)
    b = quantize_model(torch.nn.Sequential(torch.nn.Linear(3, 2)), QuantConfig(), method=HalfConfig(0.5),
                       calib=calib, progress=False)
    assert calls == [HalfConfig(), HalfConfig(0.5)]  # the default config is an instance of the config type
    torch.testing.assert_close(a(calib[0]["input"]), b(calib[0]["input"]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already configures method 'half'"):
        register_method("other", HalfConfig)(half)


def test_quantizer_roles_are_structural():
    model = _build("bert")
    prepare_model(model, QuantConfig())
    roles = quantizer_roles(model)
    assert list(roles) == list(named_quantizers(model))
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            expected[f"{name}.input_quantizer"] = "input"
            expected[f"{name}.weight_quantizer"] = "weight"
        if isinstance(m, AttentionQuantizers):
            expected.update({f"{name}.{p}": f"attn_{p}" for p in ("q", "k", "probs", "v")})
    assert roles == expected
    assert {r["name"]: r["role"] for r in list_quantizers(model)} == roles
    # the role follows the attachment, not the name: a quantizer moved under another name keeps its role,
    # and a quantizer wrapped inside a non-quantizer module (RepQ's ChannelAffineInput) is "other"
    lin = model.bert.encoder.layer[0].attention.self.query
    model.spare = torch.nn.Module()
    model.spare.input_quantizer = UniformQuantizer(8)  # named like a Linear input, attached to no Linear
    aff = channel_affine_from_ranges(-torch.ones(32), torch.ones(32), 8)
    lin.input_quantizer = ChannelAffineInput(aff, lin.input_quantizer)
    roles = quantizer_roles(model)
    assert roles["spare.input_quantizer"] == "other"
    assert roles["bert.encoder.layer.0.attention.self.query.input_quantizer.quantizer"] == "other"
    assert roles["bert.encoder.layer.0.attention.self.query.weight_quantizer"] == "weight"


def test_calibration_masks_are_cleared():
    model = _build("bert")
    quantize_model(model, QuantConfig(), calib=[_text_batch()], progress=False)
    qs = named_quantizers(model)
    assert all(q.token_mask is None and not q.calibrating for q in qs.values())
    dims = {n: q.token_dims for n, q in qs.items()}
    roles = quantizer_roles(model)
    assert all(dims[n] == (0, 1) for n, r in roles.items() if r == "input")
    assert all(dims[n] == (0, 2) for n, r in roles.items() if r.startswith("attn_"))
    assert all(dims[n] is None for n, r in roles.items() if r == "weight")


def test_timm_vit_attention():
    timm = pytest.importorskip("timm")  # not importable in this project's environment: untested here
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32,
                              patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    q = prepare_model(copy.deepcopy(model), QuantConfig())
    set_quantization(q, False)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)
    assert sum(isinstance(m, AttentionQuantizers) for m in q.modules()) == 2


def test_eval_weight_cache_reused_and_invalidated():
    lin = torch.nn.Linear(16, 8)
    model = torch.nn.Sequential(lin)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, quantize_attention=False), calib=[{"input": torch.randn(4, 16)}],
                   progress=False)
    with torch.no_grad():
        w1 = lin.quantized_weight()
        assert lin.quantized_weight() is w1  # cached: the weight is quantized once
        torch.testing.assert_close(w1, quantize_dequantize(lin.weight, 4, True, axis=0))
        lin.weight.mul_(0.5)  # in-place edit -> new _version -> recomputed (scale stays: weights were calibrated)
        w2 = lin.quantized_weight()
        assert w2 is not w1
        torch.testing.assert_close(w2, lin.weight_quantizer.quantize(lin.weight))
        lin.weight_quantizer.set_range(-lin.weight.abs().amax(1), lin.weight.abs().amax(1))  # re-finalized
        w3 = lin.quantized_weight()
        torch.testing.assert_close(w3, quantize_dequantize(lin.weight, 4, True, axis=0))
        assert not torch.equal(w2, w3)
    model.train()
    assert lin.quantized_weight() is not lin.quantized_weight()  # training: always recomputed (autograd)


@pytest.mark.parametrize("family", ["bert", "qwen2", "mpnet"])
def test_inference_fast_paths_match_module_calls(family):
    """The no-grad fast paths (GEMM-alpha Linear, code-domain attention) equal the plain quantizer calls,
    which a forward pre-hook on every quantizer forces (hooks disable the fast paths)."""
    model = _build(family)
    batch = FAMILIES[family][1]()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), calib=[batch], progress=False)
    with torch.no_grad():
        fast = _valid(family, batch, _out(model, batch))
    calls = []
    hooks = [q.register_forward_pre_hook(lambda m, a: calls.append(1)) for q in model.modules()
             if type(q).__name__ == "UniformQuantizer"]
    with torch.no_grad():
        slow = _valid(family, batch, _out(model, batch))
    for h in hooks:
        h.remove()
    assert len(calls) > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_no_submodule_is_shadowed_by_a_reexported_name():
    """``import s2d.quant.<mod> as m`` must give the module: no public name equals a submodule's name."""
    for info in pkgutil.walk_packages(s2d.quant.__path__, "s2d.quant."):
        mod = importlib.import_module(info.name)
        parent, _, leaf = info.name.rpartition(".")
        assert getattr(importlib.import_module(parent), leaf) is mod, info.name
