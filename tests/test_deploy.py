"""s2d.deploy: ONNX export (fp32, W8A8 QDQ with each PTQ method's scales, int4) and ONNX Runtime parity.

Independent references: s2d's own fake-quantized torch model (the exported QDQ graph must compute the
same logits), the float torch model (fp32 / int4 exports), a hand-computed matmul on the weight grid
(the shifted int8 codes), and ONNX Runtime's optimized graph (integer kernels present)."""
import copy
import json

import numpy as np
import onnx
from onnx import numpy_helper
import pytest
import torch
import transformers as tf

from s2d.deploy import OnnxClassifier, export_onnx, optimized_ops, read_sidecar
from s2d.deploy.embeddings import row_int8
from s2d.deploy.lowering import ActivationQDQ, QDQLinear, WeightQDQ, lower_for_export
from s2d.deploy.onnx_export import INTEGER_OPS, sidecar_path
from s2d.pipeline.deployed import parity
from s2d.quant import QuantConfig, quantize_model
from s2d.train import Outcomes

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
METHODS = ("rtn", "repq", "erq", "ptq4vit")


def _bert():
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=100, num_labels=3, **SMALL)).eval()


def _vit():
    torch.manual_seed(0)
    return tf.ViTForImageClassification(tf.ViTConfig(num_labels=3, image_size=32, patch_size=8, num_channels=3,
                                                     **SMALL)).eval()


def _llama():
    from s2d.models import CausalLMClassifier
    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    return CausalLMClassifier(lm, [5, 6])


def _text(n=8, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, t // 2:] = 0
    return {"input_ids": torch.randint(5, 90, (n, t), generator=g), "attention_mask": mask,
            "token_type_ids": torch.zeros(n, t, dtype=torch.long)}


def _images(n=8, seed=0):
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _quantized(model, batches, method, bits=8):
    return quantize_model(copy.deepcopy(model), QuantConfig(w_bits=bits, a_bits=bits), method=method,
                          calib=batches, progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_qdq_export_computes_what_s2d_computed_on_integer_kernels(method, tmp_path):
    q = _quantized(_bert(), [_text(seed=i) for i in range(4)], method)
    res = export_onnx(q, tmp_path / "m.onnx", _text(), "qdq")
    assert res.embeddings == "float" and not res.int8_tables   # the default: s2d's own tables
    batch = _text(16, 10, seed=9)                    # other batch and sequence sizes than the example
    with torch.no_grad():
        want = q(**batch).logits
    got = OnnxClassifier(res.path)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    linears = [s for s in res.sites if s["kind"] == "linear"]
    assert len(linears) == 14                         # 6 per block + pooler + classifier
    encoder_int = [s for s in linears if s["integer"] and ".encoder." in s["name"]]
    assert len(encoder_int) >= 10
    # each integer-capable encoder Linear (ERQ's two-part ones: both parts) runs an integer matmul; the
    # 2-D pooler / classifier Gemms are not fused by ONNX Runtime
    assert res.integer_ops.get("MatMulIntegerToFloat", 0) >= len(encoder_int)
    if method == "rtn":                               # all-uniform: every site integer, attention matmuls too
        assert all(s["integer"] for s in res.sites)
        assert res.integer_ops.get("QLinearMatMul", 0) >= 2
    if method == "ptq4vit":                           # twin-uniform post-GELU: fc2 stays a float matmul
        fc2 = [s for s in linears if s["name"].endswith("output.dense") and "attention" not in s["name"]]
        assert fc2 and not any(s["integer"] for s in fc2)


def test_symmetric_activations_run_on_integer_kernels_as_shifted_uint8(tmp_path):
    """Signed activation codes c are written as uint8 c + 128 with zero point 128: same logits as s2d on
    a calibration batch (outside the calibrated range s2d's narrow codes clip at -127, ONNX's at -128:
    docs/deployment.md, item 3)."""
    q = quantize_model(copy.deepcopy(_bert()), QuantConfig(w_bits=8, a_bits=8, a_symmetric=True), method="rtn",
                       calib=[_text(seed=i) for i in range(2)], progress=False)
    res = export_onnx(q, tmp_path / "m.onnx", _text(), "qdq")
    zeros = {i.name: numpy_helper.to_array(i) for i in onnx.load(res.path).graph.initializer
             if i.data_type == onnx.TensorProto.UINT8 and not i.dims and "input_quantizer" in i.name}
    assert zeros and all(int(z) == 128 for z in zeros.values())  # the Linear inputs: signed 0 is code 128
    batch = _text(seed=1)
    with torch.no_grad():
        want = q(**batch).logits
    torch.testing.assert_close(OnnxClassifier(res.path)(**batch).logits, want, rtol=0,
                               atol=1e-5 * float(want.abs().max()))
    assert res.integer_ops.get("MatMulIntegerToFloat", 0) >= 12


def test_qdq_file_stores_8bit_weights(tmp_path):
    """The 14 Linear weights are uint8 codes (zero point 128: see s2d.deploy.lowering) whose dequantized
    values are s2d's weight grid; the embedding tables are int8; the file holds no other 2-D table."""
    q = _quantized(_bert(), [_text()], "rtn")
    grids = {n: m.quantized_weight().detach() for n, m in q.named_modules() if hasattr(m, "quantized_weight")}
    res = export_onnx(q, tmp_path / "m.onnx", _text(), "qdq", embeddings="int8")
    graph = onnx.load(res.path).graph
    tables = {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) == 2}
    u8 = {n: t for n, t in tables.items() if t.dtype == np.uint8}
    assert res.embeddings == "int8" and any("word_embeddings" in t for t in res.int8_tables)
    assert len(u8) == 14 and sum(t.dtype == np.int8 for t in tables.values()) == len(res.int8_tables)
    dequantized = _dequantized_weights(graph, u8)
    for name, grid in grids.items():                    # every grid is some DequantizeLinear's output
        assert any(w.shape == grid.shape and np.array_equal(w, grid.numpy()) for w in dequantized), name
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(_numel(i) for i in floats) < 100 * 64     # no float table left as big as the vocabulary's
    assert all(n.op_type in {"QuantizeLinear", "DequantizeLinear"} or not n.domain for n in graph.node)  # standard ops


def test_vision_qdq_export(tmp_path):
    q = _quantized(_vit(), [_images(seed=i) for i in range(2)], "repq")
    res = export_onnx(q, tmp_path / "v.onnx", _images(), "qdq")
    batch = _images(5, seed=3)
    with torch.no_grad():
        want = q(**batch).logits
    # "extended" fuses the QDQ pairs into integer kernels like "all", but leaves the patch Conv in NCHW:
    # "all" reorders it to NCHWc, whose float summation order can flip a downstream activation code
    got = OnnxClassifier(res.path, optimization="extended")(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    fast = OnnxClassifier(res.path)(**batch).logits
    assert torch.equal(fast.argmax(-1), want.argmax(-1))
    assert float((fast - want).abs().max()) < 0.05 * float(want.abs().max())
    assert sum(res.integer_ops.values()) >= 12
    assert any(s["kind"] == "weight" for s in res.sites)  # the patch embedding: float conv on s2d's grid


@pytest.mark.parametrize("fmt", ["fp32", "qdq"])
def test_causal_lm_export_at_a_fixed_shape_serves_any_smaller_batch(fmt, tmp_path):
    """transformers' decoder masking traces with the example's shapes: the file is fixed to (4, 12), and
    OnnxClassifier right-pads and chunks (3, 9) and (9, 7) batches to it, exactly."""
    model = _llama()
    if fmt == "qdq":
        model = _quantized(model, [{k: v for k, v in _text(seed=i).items() if k != "token_type_ids"} for i in range(2)],
                           "rtn")
    example = {k: v for k, v in _text(4, 12).items() if k != "token_type_ids"}
    res = export_onnx(model, tmp_path / "lm.onnx", example, fmt)
    assert res.static_shape == [4, 12] and read_sidecar(res.path)["static_shape"] == [4, 12]
    onnx_model = OnnxClassifier(res.path)
    for n, t in ((3, 9), (9, 7)):
        batch = {k: v for k, v in _text(n, t, seed=n).items() if k != "token_type_ids"}
        with torch.no_grad():
            want = model(**batch).logits
        torch.testing.assert_close(onnx_model(**batch).logits, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="exported for at most 12"):
        onnx_model(**{k: v for k, v in _text(2, 13).items() if k != "token_type_ids"})


def _dequantized_weights(graph, codes):
    """(code - zero point) · scale, (out, in), for each DequantizeLinear of a 2-D code table, in numpy."""
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in codes:
            q, scale, zero = (consts[n] for n in node.input[:3])
            assert zero.dtype == np.uint8 and (zero == 128).all()
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [-1, 1] if axis == 0 else [1, -1]
            w = (q.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)
            out.append(w if axis == 0 else w.T)            # folded transposes store (in, out)
    return out


def _numel(init):
    n = 1
    for d in init.dims:
        n *= d
    return n


def _dequantized_rows(weight):
    """Per-row symmetric int8 in torch, written out independently of s2d.deploy.embeddings."""
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight / step).clamp(-127, 127) * step


def test_row_int8_codes_against_the_closed_form():
    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(0)).numpy()
    w[3] = 0.0
    codes, scales = row_int8(w)
    assert codes.dtype.name == "int8" and scales.shape == (50, 1) and scales[3, 0] == 1.0
    nonzero = np.delete(np.arange(50), 3)
    assert (np.abs(codes[nonzero]).max(axis=1) == 127).all()       # each row's peak lands on the top code
    assert np.abs(codes * scales - w).max(axis=1).max() <= float(scales[nonzero].max()) / 2 + 1e-7
    np.testing.assert_allclose(codes * scales, _dequantized_rows(torch.from_numpy(w)).nan_to_num().numpy(), atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_embedding_tables_compute_the_dequantized_lookup(tied, tmp_path):
    """fp32 export with int8 tables == the torch model whose embedding rows are replaced by their int8
    dequantization; a tied LM head keeps reading the float table."""
    if tied:
        from s2d.models import CausalLMClassifier
        torch.manual_seed(0)
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                tie_word_embeddings=True)).eval()
        model, example = CausalLMClassifier(lm, [5, 6]), {k: v for k, v in _text(4, 12).items() if k != "token_type_ids"}
    else:
        model, example = _bert(), _text()
    res = export_onnx(model, tmp_path / "e.onnx", example, "fp32", embeddings="int8")
    assert res.int8_tables
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Embedding):  # a fresh module: unties a tied head from the lookup
                setattr(module, name, torch.nn.Embedding.from_pretrained(_dequantized_rows(child.weight.detach())))
    batch = example if tied else _text(6, 9, seed=4)
    with torch.no_grad():
        want, plain = reference(**batch).logits, model(**batch).logits
    got = OnnxClassifier(res.path)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert float((got - plain).abs().max()) > 1e-6                  # the rounding is really in the graph


def test_fp32_and_int4_exports_against_the_float_model(tmp_path):
    model, batch = _bert(), _text(6, 11, seed=5)
    with torch.no_grad():
        want = model(**batch).logits
    fp = export_onnx(model, tmp_path / "f.onnx", _text(), "fp32")
    torch.testing.assert_close(OnnxClassifier(fp.path)(**batch).logits, want, rtol=0, atol=1e-5)
    i4 = export_onnx(model, tmp_path / "i4.onnx", _text(), "int4", block_size=32)
    assert i4.integer_ops.get("MatMulNBits", 0) == 12  # the encoder's Linears (2-D head Gemms stay float)
    assert i4.bytes < fp.bytes
    got = OnnxClassifier(i4.path)(**batch).logits
    err = float((got - want).abs().max())
    assert 0 < err < 0.2 * float(want.abs().max())      # quantized, yet close


def test_weight_codes_far_from_zero_are_shifted_exactly():
    torch.manual_seed(0)
    scale = torch.tensor([0.01, 0.02, 0.5])
    k = torch.stack([torch.arange(-128, 128)[torch.randperm(256)][:40],   # fits int8 as it is
                     torch.randint(100, 356, (40,)),                      # 9-bit codes: shifted
                     torch.randint(-400, -144, (40,))]).float()
    grid = k * scale[:, None]
    wq = WeightQDQ(grid, scale)
    assert wq.offset is not None and float(wq.offset[0]) == 0.0
    codes = torch.round(wq() / scale[:, None])
    assert codes.min() >= -128 and codes.max() <= 127
    x = torch.randn(5, 40)
    lin = QDQLinear(torch.nn.Identity(), [(None, wq)], torch.zeros(3))
    torch.testing.assert_close(lin(x), x @ grid.t(), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="256 codes"):
        WeightQDQ(torch.tensor([[0.0, 3.0]]), torch.tensor([0.01]))


def test_lowering_turns_uniform_8bit_sites_into_qdq():
    q = _quantized(_bert(), [_text()], "rtn")
    sites = lower_for_export(q)
    assert all(isinstance(m, QDQLinear) for n, m in q.named_modules() if n.endswith(("query", "classifier")))
    assert sum(isinstance(m, ActivationQDQ) for m in q.modules()) == 14 + 8  # Linear inputs + q, k, probs, v ×2
    assert {s.kind for s in sites} == {"linear", "activation"}


@pytest.mark.parametrize("bits,match", [(4, "W8A8"), (None, "no quantizers")])
def test_qdq_refuses_what_it_cannot_express(bits, match, tmp_path):
    model = _bert() if bits is None else _quantized(_bert(), [_text()], "rtn", bits)
    with pytest.raises(ValueError, match=match):
        export_onnx(model, tmp_path / "m.onnx", _text(), "qdq")
    with pytest.raises(ValueError, match="format must be one of"):
        export_onnx(model, tmp_path / "m.onnx", _text(), "int2")
    with pytest.raises(ValueError, match="embeddings must be one of int8, float"):
        export_onnx(model, tmp_path / "m.onnx", _text(), "fp32", embeddings="int4")
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxClassifier(export_onnx(_bert(), tmp_path / "f.onnx", _text(), "fp32").path, optimization="max")


def test_sidecar_round_trip(tmp_path):
    res = export_onnx(_bert(), tmp_path / "f.onnx", _text(), "fp32", meta={"source": "x", "data": "y"})
    side = read_sidecar(res.path)
    assert side["meta"] == {"source": "x", "data": "y"} and side["inputs"] == ["input_ids", "attention_mask",
                                                                              "token_type_ids"]
    assert json.loads(sidecar_path(res.path).read_text())["bytes"] == res.bytes
    with pytest.raises(FileNotFoundError, match="s2d export"):
        read_sidecar(tmp_path / "other.onnx")


def test_optimized_ops_sees_integer_kernels(tmp_path):
    res = export_onnx(_quantized(_bert(), [_text()], "rtn"), tmp_path / "m.onnx", _text(), "qdq")
    ops = optimized_ops(res.path)
    assert {k: v for k, v in ops.items() if k in INTEGER_OPS} == res.integer_ops


def test_parity_counts_agreement():
    ref = Outcomes(torch.tensor([True, True, False, False]), pred=torch.tensor([0, 1, 1, 0]))
    dep = Outcomes(torch.tensor([True, False, False, True]), pred=torch.tensor([0, 0, 1, 1]))
    p = parity(ref, dep)
    assert p["reference_accuracy"] == p["deployed_accuracy"] == 0.5 and p["difference"] == 0.0
    assert p["agreement"] == 0.5 and p["examples"] == 4


# --------------------------------------------------------------------------- the CLI

def _cli_export(model, data, out, *extra):
    from s2d.pipeline.cli import main
    return main(["export", str(model), "--data", str(data), "--out", str(out), "--batch-size", "16",
                 "--max-length", "16", "--calib-samples", "16", "--no-progress", *extra])


def test_export_then_evaluate_the_file(tmp_path, capsys):
    from s2d.pipeline.cli import main
    from test_experiment import make_csv, make_tiny_model
    model, data = make_tiny_model(tmp_path / "bert"), make_csv(tmp_path / "data.csv")
    out = tmp_path / "m.onnx"
    assert _cli_export(model, data, out, "--method", "erq") == 0
    printed = capsys.readouterr().out
    score = read_sidecar(out)["parity"]
    assert f"exported {100 * score['deployed_accuracy']:.2f}%" in printed and 0.9 <= score["agreement"] <= 1
    assert main(["evaluate", str(out), "--no-progress"]) == 0     # data, max_length from the sidecar
    assert f"{100 * score['deployed_accuracy']:.2f}%" in capsys.readouterr().out
    small = tmp_path / "small.onnx"
    assert _cli_export(model, data, small, "--method", "erq", "--embeddings", "int8") == 0
    assert "int8 embeddings" in capsys.readouterr().out
    assert read_sidecar(small)["embeddings"] == "int8" and small.stat().st_size < out.stat().st_size


@pytest.mark.parametrize("method,name,message", [("gptq", "m.onnx", "--method must be one of"),
                                                  ("rtn", "m.txt", "--out must name a .onnx file")])
def test_export_bad_arguments_exit_2(method, name, message, tmp_path, capsys):
    from test_experiment import make_csv, make_tiny_model
    model, data = make_tiny_model(tmp_path / "bert"), make_csv(tmp_path / "data.csv")
    assert _cli_export(model, data, tmp_path / name, "--method", method) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("s2d ")]
    assert len(errors) == 1 and message in errors[0]


@pytest.mark.slow
def test_real_minilm_export_matches_fake_quant(tmp_path):
    """MiniLM-L6 fine-tuned for 80 steps on Rotten Tomatoes (a trained head: an untrained one leaves many
    sentences at a near-tie that any rounding flips), RepQ-ViT W8A8, on 256 test sentences."""
    from s2d.pipeline.cli import main
    ft, out = tmp_path / "ft", tmp_path / "repq.onnx"
    assert main(["finetune", "minilm-l6", "--data", "rotten-tomatoes", "--steps", "80",
                 "--limit-eval", "256", "--out", str(ft), "--no-progress"]) == 0
    assert main(["export", str(ft), "--data", "rotten-tomatoes", "--method", "repq", "--out", str(out),
                 "--limit-eval", "256", "--no-progress"]) == 0
    score = read_sidecar(out)["parity"]
    assert score["reference_accuracy"] > 0.65                         # the head learned something
    assert score["examples"] == 256 and abs(score["difference"]) <= 0.01 and score["agreement"] >= 0.98
    assert read_sidecar(out)["integer_ops"].get("MatMulIntegerToFloat", 0) >= 36
