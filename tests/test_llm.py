"""Causal LMs as classifiers (tiny random Llama + a word-level tokenizer): the prompt collate, the
label-word likelihood head and its loss, the held-out text NLL, quantization under the causal mask,
the float outcomes of the run directory, and the perplexity table.

Independent references: transformers' own causal-LM loss (``labels`` with -100 outside the scored
tokens), the stock model's logits, a single-example forward against a padded batch, closed forms.
"""
import copy
import csv
import math
import random

import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from s2d.collate import PromptCollate
from s2d.models import CausalLMClassifier, load, with_label_words
from s2d.models.wrappers import label_token_ids
from s2d.pipeline.config import DataConfig, ModelConfig
from s2d.pipeline.evidence import accuracy_rows, perplexity_verdict
from s2d.pipeline.experiment import load_task, ptq_cell
from s2d.pipeline.rundir import pack_outcomes, unpack_outcomes
from s2d.pipeline.tables import format_perplexity_table
from s2d.probes import peak_locations
from s2d.quant import QuantConfig, quantize_model
from s2d.quant.api import check_method
from s2d.train import evaluate_outcomes

WORDS = ["good", "bad", "film", "very", "not", "a", "plot", "actor", "great", "awful", "fun", "dull"]
VOCAB = ["[PAD]", "[UNK]", "Review", "Sentiment", "Text", "Label", ":", "negative", "positive"] + WORDS
PROMPT = "Review: {text}\nSentiment:"


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCAB (whitespace and punctuation split)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def make_llama(root=None) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=True)
    model = tf.LlamaForCausalLM(cfg).eval()
    if root is not None:
        model.save_pretrained(root)
        make_tokenizer().save_pretrained(root)
    return model


def make_csv(path, n=96, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.randrange(2)
            words = [rng.choice(WORDS[2:]) for _ in range(rng.randint(2, 7))]
            words.insert(rng.randint(0, len(words)), ["bad", "good"][label])
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    make_llama(root / "llama")
    return root / "llama", make_csv(root / "data.csv")


def _batch(texts, labels, max_length=16):
    return PromptCollate(make_tokenizer(), max_length, PROMPT)([(t, y) for t, y in zip(texts, labels)])


def test_prompt_collate_truncates_the_text_and_keeps_the_suffix():
    tok = make_tokenizer()
    batch = _batch(["good film", "very very very very very very very very bad plot"], [1, 0], max_length=10)
    assert batch["input_ids"].shape == (2, 10)
    for i, n_text in ((0, 2), (1, 10 - 2 - 2)):                    # prefix "Review :", suffix "Sentiment :"
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert tok.convert_ids_to_tokens(ids[:2]) == ["Review", ":"]
        assert tok.convert_ids_to_tokens(ids[-2:]) == ["Sentiment", ":"]
        assert int(batch["text_mask"][i].sum()) == n_text and batch["text_mask"][i, 2: 2 + n_text].all()
    assert batch["attention_mask"][0, 6:].sum() == 0 and (batch["input_ids"][0, 6:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="data.prompt"):
        PromptCollate(tok, 16, "no slot")
    with pytest.raises(ValueError, match="no room"):
        PromptCollate(tok, 4, PROMPT)


def test_label_words_must_be_single_distinct_tokens():
    tok = make_tokenizer()
    assert label_token_ids(tok, ["negative", "positive"]) == [VOCAB.index("negative"), VOCAB.index("positive")]
    with pytest.raises(ValueError, match="label word 'very good' is 2 tokens"):
        label_token_ids(tok, ["very good", "bad"])
    with pytest.raises(ValueError, match="distinct"):
        label_token_ids(tok, ["unknownword", "otherunknown"])      # both [UNK]


def test_classifier_logits_and_loss_are_the_causal_lm_on_the_answer_token():
    lm = make_llama()
    words = label_token_ids(make_tokenizer(), ["negative", "positive"])
    clf = CausalLMClassifier(lm, words).eval()
    batch = _batch(["good film", "not a very dull plot at all"], [1, 0])
    out = clf(**batch)
    for i in range(2):
        n = int(batch["attention_mask"][i].sum())
        ref = lm(input_ids=batch["input_ids"][i: i + 1, :n]).logits[0, -1].log_softmax(-1)
        torch.testing.assert_close(out.logits[i], ref[words], rtol=0, atol=1e-5)
        # the loss: transformers' causal-LM loss of the prompt + true answer with only the answer scored
        y = words[int(batch["labels"][i])]
        ids = torch.cat([batch["input_ids"][i, :n], torch.tensor([y])])[None]
        labels = torch.full_like(ids, -100)
        labels[0, -1] = y
        hf = lm(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(-out.logits[i, int(batch["labels"][i])], hf, rtol=0, atol=1e-5)
    assert out.loss is not None and torch.isclose(out.loss, -out.logits.gather(1, batch["labels"][:, None]).mean())


def test_text_nll_equals_the_lm_loss_over_the_text_tokens():
    lm = make_llama()
    clf = CausalLMClassifier(lm, [7, 8]).eval()
    batch = _batch(["good film", "not a very dull plot"], [1, 0])
    nll = clf(**batch).text_nll
    for i in range(2):
        labels = torch.where(batch["text_mask"][i: i + 1], batch["input_ids"][i: i + 1], -100)
        ref = lm(input_ids=batch["input_ids"][i: i + 1], attention_mask=batch["attention_mask"][i: i + 1],
                 labels=labels).loss
        torch.testing.assert_close(nll[i], ref, rtol=0, atol=1e-5)
    assert clf.train()(**batch).text_nll is None                    # training computes the answer only


def test_load_task_builds_a_prompt_classifier(tiny_lm):
    model, data = tiny_lm
    cfg = DataConfig(str(data), max_length=16, prompt=PROMPT, label_words=("bad", "good"))
    bundle, loaders = load_task(ModelConfig(str(model)), cfg, batch_size=8, eval_batch_size=16)
    assert isinstance(bundle.model, CausalLMClassifier) and bundle.num_labels == 2
    assert bundle.model.label_ids.tolist() == [VOCAB.index("bad"), VOCAB.index("good")]
    out = evaluate_outcomes(bundle.model, loaders.test, progress=False)
    assert out.correct.shape == out.nll.shape == (len(loaders.test.dataset),)
    assert torch.isfinite(out.nll).all() and (out.nll > 0).all()
    with pytest.raises(ValueError, match="3 words but"):
        load_task(ModelConfig(str(model)), DataConfig(str(data), label_words=("a", "bad", "good")))
    with pytest.raises(ValueError, match="label words apply to a causal LM loaded for classification"):
        with_label_words(load(str(model), task="causal-lm"), ["bad", "good"])


def test_prompt_rejected_for_an_encoder(tmp_path):
    from test_experiment import make_tiny_model
    bert = make_tiny_model(tmp_path / "bert")
    with pytest.raises(ValueError, match="apply to causal LMs"):
        load_task(ModelConfig(str(bert)), DataConfig(str(make_csv(tmp_path / "d.csv")), prompt=PROMPT))


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_16_bit_quantization_equals_float_token_by_token(granularity):
    clf = CausalLMClassifier(make_llama(), [7, 8]).eval()
    batch = _batch(["good film", "not a very dull plot"], [1, 0])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = clf.lm(input_ids=ids, attention_mask=mask).logits
    q = quantize_model(copy.deepcopy(clf), QuantConfig(16, 16, a_granularity=granularity), calib=[batch],
                       progress=False)
    with torch.no_grad():
        out = q.lm(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=1e-4)


def test_quantized_causal_lm_respects_padding_and_the_causal_mask():
    """W8A8 with per-token activations: each example's outputs do not depend on what else is in the
    batch (padding) nor on later tokens (causality)."""
    clf = CausalLMClassifier(make_llama(), [7, 8]).eval()
    batch = _batch(["good film", "not a very dull plot"], [1, 0])
    q = quantize_model(copy.deepcopy(clf), QuantConfig(8, 8, a_granularity="token"), calib=[batch], progress=False)
    with torch.no_grad():
        both = q.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = int(batch["attention_mask"][0].sum())
        alone = q.lm(input_ids=batch["input_ids"][:1, :n]).logits
        changed = batch["input_ids"][:1, :n].clone()
        changed[0, -1] = VOCAB.index("awful")
        prefix = q.lm(input_ids=changed).logits
    torch.testing.assert_close(both[0, :n], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(prefix[0, : n - 1], alone[0, : n - 1], rtol=0, atol=1e-4)


def test_ptq_cell_keeps_the_text_nll(tiny_lm):
    model, data = tiny_lm
    bundle, loaders = load_task(ModelConfig(str(model)), DataConfig(str(data), max_length=16, prompt=PROMPT,
                                                                    label_words=("bad", "good")), batch_size=8)
    calib = [next(iter(loaders.train))]
    q16 = ptq_cell(bundle.model, QuantConfig(16, 16), "rtn", calib, loaders.test, False)
    fp = evaluate_outcomes(bundle.model, loaders.test, progress=False)
    torch.testing.assert_close(q16.nll, fp.nll, rtol=0, atol=1e-4)
    assert torch.equal(q16.correct, fp.correct)


def test_ptq4vit_refused_before_training_on_a_gated_mlp():
    clf = CausalLMClassifier(make_llama(), [7, 8])
    with pytest.raises(ValueError, match="gated MLP"):
        check_method(clf, "ptq4vit")
    for method in ("rtn", "repq", "erq"):
        check_method(clf, method)


def test_float_outcomes_round_trip():
    x = np.random.default_rng(0).gamma(2.0, 2.0, size=37).astype(np.float32)
    assert np.array_equal(unpack_outcomes(pack_outcomes(x)), x)
    b = np.arange(11) % 3 == 0
    assert np.array_equal(unpack_outcomes(pack_outcomes(b)), b)


def _nll_results(nll_a, nll_b):
    """A results dict with two float arms whose per-example NLLs are given (S, n)."""
    def run(name, seed, nll):
        hits = pack_outcomes(np.ones(nll.shape[-1], dtype=bool))
        return {"name": name, "seed": seed, "kind": name, "qat_bits": None, "fp_correct": hits,
                "fp_nll": pack_outcomes(nll.astype(np.float32))}
    runs = [run("adamw", s, nll_a[s]) for s in range(len(nll_a))] + [run("s2d", s, nll_b[s]) for s in range(len(nll_b))]
    return {"arms": {"adamw": {"qat_bits": None, "kind": "adamw"}, "s2d": {"qat_bits": None, "kind": "adamw+s2d"}},
            "runs": runs, "cells": [], "seeds": list(range(len(nll_a)))}


def test_perplexity_table_is_exp_of_the_mean_nll_and_the_ratio():
    rng = np.random.default_rng(0)
    a = rng.gamma(5.0, 1.0, size=(2, 200))
    b = a + 0.3 + rng.normal(0, 0.05, size=a.shape)             # a clear increase: ratio exp(0.3) - 1 = 35 %
    res = _nll_results(a, b)
    row = accuracy_rows(res, metric="nll")[0]
    assert math.isclose(row["values"]["adamw"].mean, float(np.float32(a).astype(float).mean()), rel_tol=1e-6)
    delta = row["deltas"]["s2d"]
    assert delta.significant and math.isclose(delta.delta, float((np.float32(b) - np.float32(a)).mean()), rel_tol=1e-5)
    table = format_perplexity_table(res)
    assert f"{math.exp(float(np.float32(a).mean())):.2f}" in table
    assert f"+{100 * math.expm1(delta.delta):.2f} %" in table and "*" in table
    assert "perplexity, full precision +" in perplexity_verdict(res, "s2d")[0]
    assert format_perplexity_table(_nll_results(a, b) | {"runs": []}) == ""


def test_peak_locations_match_brute_force():
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 1:] = False
    x[2, 3] = 1000.0                                             # a huge value at a padded position

    class Fwd(torch.nn.Module):                                  # a dict-batch model around the Linear
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input, attention_mask=None):
            return self.lin(input)

    m = Fwd()
    batches = [{"input": x[:2], "attention_mask": mask[:2].long()}, {"input": x[2:], "attention_mask": mask[2:].long()}]
    found = peak_locations(m, batches, modules={"lin": lin}, progress=False)["lin"]
    out = lin(x).detach().abs().masked_fill(~mask[..., None], -1)
    b, t, c = np.unravel_index(int(out.argmax()), out.shape)
    assert (found.batch * 2 + found.example, found.token, found.channel) == (b, t, c)
    assert math.isclose(found.max_abs, float(out.max()), rel_tol=1e-6)


def test_run_experiment_on_a_causal_lm(tiny_lm, tmp_path):
    """Every float arm kind trains the prompt classifier; the report gets the perplexity table."""
    from s2d.pipeline.experiment import run_experiment
    from s2d.pipeline.parse import from_dict
    from s2d.pipeline.report import write_report
    model, data = tiny_lm
    raw = {"name": "tiny-lm", "seeds": [0], "model": {"name": str(model)},
           "data": {"dataset": str(data), "max_length": 16, "calib_samples": 8, "prompt": PROMPT,
                    "label_words": ["bad", "good"]},
           "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 16, "eval_every": 1, "log_every": 1,
                     "eval_batches": 1, "lr": 1e-3},
           "s2d": {"interval": 100, "min_refreshes": 2, "include": ["lm.model.layers.*"]},
           "arms": {"names": ["adamw", "adamw+s2d", "muon", "adamw+s2d-all"]},
           "quant": {"bits": ["W8A8"], "methods": ["rtn"]}, "probes": {"batches": 1, "sample_size": 16}}
    res = run_experiment(from_dict(raw), tmp_path / "run", progress=False)
    assert {r["name"] for r in res.runs} == {"adamw", "adamw+s2d", "muon", "adamw+s2d-all"}
    n = len(unpack_outcomes(res.runs[0]["fp_correct"]))
    assert all(len(unpack_outcomes(r["fp_nll"])) == n for r in res.runs)
    assert all(c["nll"] is not None for c in res.cells) and len(res.cells) == 4
    write_report(res, tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out perplexity (causal LM)" in md and "held-out perplexity, full precision" in md
    with pytest.raises(ValueError, match="gated MLP"):          # refused before anything trains
        run_experiment(from_dict({**raw, "quant": {"bits": ["W4A4"], "methods": ["ptq4vit"]}}),
                       tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2" / "arms").exists()
