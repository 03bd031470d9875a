"""Model adapters on tiny random configs: forward shapes, blocks() and linear_roles() checked by hooks."""
import copy
import os

import pytest
import torch
import transformers as tf
from torch import nn

from s2d import models
from s2d.assets.dinov2_onnx import IMAGENET_MEAN

H, L, I = 32, 2, 64
_V = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I, image_size=32, patch_size=8)
_T = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=I, vocab_size=100)
_LM = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, num_key_value_heads=1, intermediate_size=I,
           vocab_size=100, pad_token_id=0)


class TinyTimmViT(nn.Module):
    """Duck-typed stand-in with timm's VisionTransformer module names (timm cannot be imported here)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
            self.attn = nn.Module()
            self.attn.qkv, self.attn.proj = nn.Linear(H, 3 * H), nn.Linear(H, H)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(H, I), nn.Linear(I, H)

        def forward(self, x):
            q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, -1)
            x = x + self.attn.proj(torch.softmax(q @ k.transpose(1, 2) / H ** 0.5, -1) @ v)
            return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    def __init__(self, n_cls=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, H, 8, 8)
        self.blocks = nn.ModuleList(self.Block() for _ in range(L))
        self.norm, self.head = nn.LayerNorm(H), nn.Linear(H, n_cls)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(1))


def _img(m):
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def _naflex(m):  # SigLIP2: flattened 8x8 patches, padding mask, patch grid per image
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return {"pixel_values": torch.randn(2, 16, 3 * 8 * 8), "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor([[4, 4], [3, 4]])}


def _txt(m):
    return {"input_ids": torch.randint(1, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


FAMILIES = {  # name -> (builder, batch maker, n outputs, family seen by blocks)
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**{**_T, "num_hidden_layers": L}, num_labels=3)), _txt, 3),
    "mpnet": (lambda: tf.MPNetForSequenceClassification(tf.MPNetConfig(**{**_T, "num_hidden_layers": L}, num_labels=3)), _txt, 3),
    "dinov2": (lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**{k: v for k, v in _V.items() if k != "intermediate_size"}, num_labels=3)), _img, 3),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(**_V, num_labels=3)), _img, 3),
    "clip": (lambda: tf.CLIPForImageClassification(tf.CLIPConfig(vision_config=_V, text_config=_T, num_labels=3)), _img, 3),
    "siglip": (lambda: tf.SiglipForImageClassification(tf.SiglipConfig(vision_config=_V, text_config=_T, num_labels=3)), _img, 3),
    "siglip2": (lambda: tf.Siglip2ForImageClassification(tf.Siglip2Config(
        vision_config={**{k: v for k, v in _V.items() if k != "image_size"}, "num_patches": 16}, text_config=_T,
        num_labels=3)), _naflex, 3),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_LM)), _txt, 100),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_LM)), _txt, 100),
    "qwen2-cls": (lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**_LM, num_labels=3)), _txt, 3),
    "timm-vit": (lambda: TinyTimmViT(), _img, 3),
}


def _inputs_and_outputs(model, batch, names):
    seen = {}

    def hook(name):
        def fn(module, inputs, output):
            seen.setdefault(name, (inputs[0] if inputs else None, output))
        return fn
    hooks = [dict(model.named_modules())[n].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(**batch) if not isinstance(model, TinyTimmViT) else model(batch["pixel_values"])
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_forward_blocks_roles(family):
    build, make_batch, n_out = FAMILIES[family]
    model = build().eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(**batch) if family != "timm-vit" else model(batch["pixel_values"])
    logits = out if family == "timm-vit" else out.logits
    assert logits.shape[0] == 2 and logits.shape[-1] == n_out
    blocks = models.blocks(model)
    assert len(blocks) == L
    roles = models.linear_roles(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(roles) == set(linears)
    for b in blocks:  # every block Linear has the role its position says
        assert all(roles[q] in ("q", "k", "v", "qkv") for q in b.qkv) and roles[b.attn_out] == "attn_out"
        assert all(roles[f] == "fc1" for f in b.fc1) and roles[b.fc2] == "fc2"
    counts = {r: sum(v == r for v in roles.values()) for r in set(roles.values())}
    assert counts["fc2"] == L and counts["attn_out"] == L
    assert counts.get("q", 0) + counts.get("qkv", 0) == L
    # MPNet's classifier is dense + out_proj: both belong to the head (one rule for quant, Muon and reports)
    assert counts["head"] == (2 if family == "mpnet" else 1)
    assert {n for n, r in roles.items() if r == "head"} == models.head_names(model)
    # independent check through hooks: the named norms really produce the inputs of qkv / fc1
    names = [n for b in blocks for n in (b.qkv[0], b.fc1[0], b.attn_in_norm, b.mlp_in_norm, b.fc2, b.attn_out)]
    seen = _inputs_and_outputs(model, batch, set(names))
    for b in blocks:
        torch.testing.assert_close(seen[b.attn_in_norm][1], seen[b.qkv[0]][0])
        torch.testing.assert_close(seen[b.mlp_in_norm][1], seen[b.fc1[0]][0])
        mods = dict(model.named_modules())
        assert all(q.startswith(b.attention + ".") for q in b.qkv)
        assert isinstance(mods[b.attention], nn.Module) and b.name + "." in b.attention + "."
    assert all(b.post_ln == (family in ("bert", "mpnet")) for b in blocks)
    if family == "bert":
        assert blocks[0].attn_in_norm == "bert.embeddings.LayerNorm"
        assert blocks[1].attn_in_norm == "bert.encoder.layer.0.output.LayerNorm"


def test_load_local_dirs_and_image_size(tmp_path):
    d = tmp_path / "vit"
    tf.ViTModel(tf.ViTConfig(**_V)).save_pretrained(d)
    b = models.load(str(d), num_labels=4)
    assert (b.family, b.modality, b.image_size, b.num_labels) == ("vit", "image", 32, 4)
    assert b.model(pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 4)
    b48 = models.load(str(d), num_labels=4, image_size=48)
    assert b48.image_size == 48 and b48.model(pixel_values=torch.randn(1, 3, 48, 48)).logits.shape == (1, 4)
    # the resized table is the bicubic resize of the pretrained one (cls row unchanged)
    p0 = b.model.vit.embeddings.position_embeddings.detach()
    p1 = b48.model.vit.embeddings.position_embeddings.detach()
    assert p1.shape == (1, 37, H) and torch.equal(p0[:, :1], p1[:, :1])
    ref = torch.nn.functional.interpolate(p0[0, 1:].T.reshape(1, H, 4, 4), size=(6, 6), mode="bicubic")
    torch.testing.assert_close(p1[0, 1:], ref.reshape(H, 36).T)
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        models.load(str(d), num_labels=4, image_size=50)
    dd = tmp_path / "dino"
    tf.Dinov2Model(tf.Dinov2Config(**{k: v for k, v in _V.items() if k != "intermediate_size"})).save_pretrained(dd)
    bd = models.load(str(dd), num_labels=3, image_size=56)
    assert bd.image_mean == IMAGENET_MEAN
    assert bd.model(pixel_values=torch.randn(2, 3, 56, 56)).logits.shape == (2, 3)
    assert models.load(str(dd), task="backbone").num_labels is None


def test_load_siglip2_from_plain_images(tmp_path):
    """SigLIP2 (NaFlex) loads behind a wrapper that takes (B, C, H, W) images; the patches it cuts are
    the ones transformers' own Siglip2 image processor cuts."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches  # numpy
    d = tmp_path / "siglip2"
    vcfg = {**{k: v for k, v in _V.items() if k != "image_size"}, "num_patches": 16}
    tf.Siglip2Model(tf.Siglip2Config(vision_config=vcfg, text_config=_T)).save_pretrained(d)  # a checkpoint
    b = models.load(str(d), num_labels=3)
    assert (b.family, b.modality, b.image_size) == ("siglip", "image", 32)
    images = torch.randn(2, 3, 32, 24)                      # non-square: a 4 x 3 grid
    inner = b.model.model
    ref = inner(pixel_values=torch.stack([torch.from_numpy(convert_image_to_patches(i.numpy(), 8)) for i in images]),
                pixel_attention_mask=torch.ones(2, 12, dtype=torch.long),
                spatial_shapes=torch.tensor([[4, 3], [4, 3]])).logits
    torch.testing.assert_close(b.model(pixel_values=images).logits, ref, rtol=0, atol=0)
    assert len(models.blocks(b.model)) == L and models.linear_roles(b.model)["model.classifier"] == "head"
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        b.model(pixel_values=torch.randn(1, 3, 30, 32))
    from s2d.quant import QuantSpec, quantize_model   # the wrapped model quantizes like the others
    q = quantize_model(copy.deepcopy(b.model), QuantSpec(16, 16), calib=[{"pixel_values": images}], progress=False)
    torch.testing.assert_close(q(pixel_values=images).logits, ref, rtol=0, atol=1e-4)


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        models.load("some-org/some-model", num_labels=2)
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        models.load(str(tmp_path), num_labels=2)
    with pytest.raises(ValueError, match="task must be one of"):
        models.load(str(tmp_path), task="segmentation")
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        models.load(str(tmp_path))
    with pytest.raises(ValueError, match="is a dataset"):
        models.load("fashion-mnist", num_labels=10)


def test_real_timm_vit():
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=2)
    roles = models.linear_roles(net)
    assert sum(r == "qkv" for r in roles.values()) == 2 and roles["head"] == "head"


@pytest.mark.slow
def test_dinov2_matches_onnxruntime():
    onnx, ort = pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")
    import numpy as np
    from s2d import assets
    entry = assets.fetch("dinov2-s14", progress=False)
    graph = onnx.load(str(entry / "vit_s_focus.onnx"))
    out = "/backbone/layernorm/Add_1_output_0"   # the backbone's last hidden state inside the graph
    graph.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = sess.run([out], {"input_image": x})[0]
    bundle = models.load("dinov2-s14", task="backbone")
    cfg = bundle.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size,
            cfg.mlp_ratio, cfg.layer_norm_eps) == (384, 12, 6, 14, 518, 4, 1e-6)
    with torch.no_grad():
        got = bundle.model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == ref.shape == (2, 257, 384)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name,family,fc2_floor", [("minilm-l6", "bert", 50.0), ("mpnet-base", "mpnet", 200.0)])
def test_real_text_models(name, family, fc2_floor):
    if name == "mpnet-base" and os.environ.get("S2D_TEST_MPNET") != "1":
        pytest.skip("mpnet-base is 404 MB: set S2D_TEST_MPNET=1")
    b = models.load(name, num_labels=2)
    assert b.family == family and b.tokenizer is not None
    batch = b.tokenizer(["a gripping, beautifully shot film.", "dull and far too long"], padding=True,
                        return_tensors="pt")
    fc2 = {blk.fc2 for blk in models.blocks(b.model)}
    seen = _inputs_and_outputs(b.model, dict(batch), fc2)
    assert max(o.abs().max().item() for _, o in seen.values()) > fc2_floor  # known FFN outliers are there
    out = b.model(**batch, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
