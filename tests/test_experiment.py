"""s2d.experiment.run_experiment end to end on a tiny random BERT saved to disk + a generated CSV.

Checks: local model dirs and CSV paths load through models.load / data.build_loaders; the results
structure (arms, QAT at own bits, PTQ cells restricted by method_bits); the recorded accuracies equal
an independent recomputation from the saved weights; the S2D interval is scaled and noted; a re-run
recomputes nothing; an interrupted run (exception in a PTQ cell) finishes only what is missing; a
run directory of another config (or a non-empty non-run directory) is refused.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

import s2d.pipeline.experiment as experiment
from s2d.pipeline.parse import from_dict
from s2d.pipeline.config import DataConfig, ModelConfig
from s2d.pipeline.experiment import load_task, run_experiment
from s2d.pipeline.rundir import RunDir, unpack_outcomes

WORDS = ["good", "bad", "film", "very", "not", "a", "plot", "actor", "great", "awful", "fun", "dull"]


def make_tiny_model(root: Path, num_labels: int = 2, head: bool = True) -> Path:
    """A random 2-layer BERT (hidden 32) + WordPiece tokenizer, saved as a Hugging Face directory;
    head=False saves the bare encoder (like the pretrained assets)."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels)
    (BertForSequenceClassification if head else BertModel)(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def make_csv(path: Path, n: int = 160, classes: int = 2, seed: int = 0) -> Path:
    """Sentences of 6 words; the label word ("bad"/"good"/"fun") sits at a random position."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            label = rng.randrange(classes)
            words = [rng.choice(WORDS[2:]) for _ in range(5)]
            words.insert(rng.randint(0, 5), ["bad", "good", "fun"][label])
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "bert"), make_csv(root / "data.csv")


def raw_config(model: Path, data: Path, **over) -> dict:
    raw = {"name": "tiny", "seed": 0, "model": {"name": str(model)},
           "data": {"dataset": str(data), "max_length": 16, "calib_samples": 8},
           "train": {"steps": 4, "batch_size": 16, "eval_batch_size": 32, "eval_every": 2, "log_every": 2,
                     "eval_batches": 1, "lr": 1e-3},
           "s2d": {"interval": 100, "min_refreshes": 2},
           "arms": {"names": ["adamw", "adamw+s2d", "qat"], "qat_bits": ["W4A4"]},
           "quant": {"bits": ["W8A8", "W4A4"], "methods": ["rtn", "repq"], "method_bits": {"repq": ["W4A4"]}},
           "probes": {"batches": 1, "sample_size": 64}}
    for section, table in over.items():
        raw[section] = {**raw.get(section, {}), **table} if isinstance(table, dict) else table
    return raw


class CountingCell:
    """cell_fn that records (arm-free) calls and optionally fails at the `fail_at`-th call."""

    def __init__(self, fail_at: int | None = None, inner=None):
        self.calls: list[tuple[str, str]] = []
        self.fail_at, self.inner = fail_at, inner

    def __call__(self, model, spec, method, calib, loader, progress, config=None):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((method, spec.name))
        if self.inner is not None:
            return self.inner(model, spec, method, calib, loader, progress, config)
        return fake_outcomes(len(loader.dataset), spec.w_bits)


def fake_outcomes(n: int, w_bits: int) -> torch.Tensor:
    """A recognisable fake cell: the first round((0.25 + 0.01 * w_bits) * n) test examples right."""
    hits = torch.zeros(n, dtype=torch.bool)
    hits[: round((0.25 + 0.01 * w_bits) * n)] = True
    return hits


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = from_dict(raw_config(*tiny))
    counter = CountingCell(inner=experiment.ptq_cell)
    result = run_experiment(cfg, out, progress=False, cell_fn=counter)
    return cfg, out, result, counter


def test_local_model_dir_and_csv_load(tiny, tmp_path):
    model_dir, data = tiny
    bundle, loaders = load_task(ModelConfig(str(model_dir)), DataConfig(str(data), max_length=16), batch_size=8)
    assert bundle.family == "bert" and bundle.modality == "text" and bundle.tokenizer is not None
    assert loaders.num_labels == 2 and bundle.model.classifier.out_features == 2
    assert sum(len(l.dataset) for l in (loaders.train, loaders.val, loaders.test)) == 160
    batch = next(iter(loaders.train))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 16
    # the head follows the data's classes (from a bare encoder, as the pretrained assets are; a saved
    # 2-class *ForSequenceClassification cannot take a 3-class head: models.load has no
    # ignore_mismatched_sizes)
    encoder = make_tiny_model(tmp_path / "encoder", head=False)
    three = make_csv(tmp_path / "three.csv", n=60, classes=3)
    bundle3, loaders3 = load_task(ModelConfig(str(encoder)), DataConfig(str(three)), batch_size=8)
    assert loaders3.num_labels == 3 and bundle3.model.classifier.out_features == 3


def test_results_structure(full_run):
    cfg, out, result, counter = full_run
    assert list(result.arms) == ["adamw", "adamw+s2d", "qat@W4A4"] and result.seeds == [0]
    runs = {r["name"]: r for r in result.runs}
    qat = runs["qat@W4A4"]
    assert qat["qat_bits"] == "W4A4" and 0 <= qat["qat_accuracy"] <= 1 and qat["kind"] == "qat"
    assert unpack_outcomes(qat["qat_correct"]).mean() == pytest.approx(qat["qat_accuracy"])
    for name in ("adamw", "adamw+s2d"):
        arm = runs[name]
        hits = unpack_outcomes(arm["fp_correct"])
        assert hits.size == 16 and hits.mean() == pytest.approx(arm["fp_accuracy"])      # per-example kept
        assert arm["qat_bits"] is None and arm["qat_accuracy"] is None and 0 <= arm["fp_accuracy"] <= 1
        assert arm["train"]["steps"] == 4 and len(arm["train"]["loss_history"]) == 4
        ffn = [p for p in arm["probes"] if p["role"] in ("fc1", "fc2")]
        assert len(ffn) == 4 and all(len(p["pcdr"]) == 3 and p["max_abs"] > 0 for p in ffn)
        assert set(arm["activations"]) == {p["name"] for p in ffn}
        assert all(0 < len(a["sample"]) <= 64 for a in arm["activations"].values())
    # method_bits = {repq = ["W4A4"]}: rtn at both settings, repq only at W4A4, no cells for QAT arms
    got = sorted((c["arm"], c["method"], c["bits"]) for c in result.cells)
    assert got == sorted((a, m, b) for a in ("adamw", "adamw+s2d")
                         for m, b in (("rtn", "W8A8"), ("rtn", "W4A4"), ("repq", "W4A4")))
    assert sorted(counter.calls) == sorted([("rtn", "W8A8"), ("rtn", "W4A4"), ("repq", "W4A4")] * 2)
    assert result.methods == ["repq", "rtn"] and result.fingerprint == cfg.fingerprint()
    assert {"torch", "transformers", "s2d"} <= set(result.versions) and result.machine["cpu_count"] >= 1
    json.dumps(dataclasses.asdict(result))                                   # JSON-serialisable
    for c in result.cells:                                                   # one file per finished cell
        assert json.loads(RunDir(out).cell_path(c["arm"], c["seed"], c["method"], c["bits"]).read_text()) == c
        assert unpack_outcomes(c["correct"]).mean() == pytest.approx(c["accuracy"])


def test_interval_scaled_and_noted(full_run):
    _, _, result, _ = full_run
    # 4 steps, interval 100 -> 1 refresh < min_refreshes 2 -> interval 4 // 2 = 2
    assert result.notes == ["S2D interval scaled 100 -> 2: a 4-step run would refresh only 1 time(s) at "
                            "interval 100; min_refreshes = 2"]
    runs = {r["name"]: r for r in result.runs}
    assert result.arms["adamw+s2d"]["s2d_config"]["interval"] == 2
    assert runs["adamw+s2d"]["train"]["s2d_config"]["interval"] == 2
    assert result.arms["adamw"]["s2d_config"] is None


def test_recorded_accuracies_match_recomputation(full_run, tiny):
    """fp accuracy and one PTQ cell, recomputed from the saved weights without s2d.train.evaluate."""
    from safetensors.torch import load_model
    from transformers import BertForSequenceClassification

    from s2d.quant import QuantConfig, quantize_model

    cfg, out, result, _ = full_run
    _, loaders = load_task(cfg.model, cfg.data, batch_size=16, eval_batch_size=32, seed=0)
    model = BertForSequenceClassification.from_pretrained(str(tiny[0]), num_labels=2)
    load_model(model, str(out / "arms" / "adamw@s0" / "model.safetensors"))
    model.eval()

    def accuracy(m):
        right = total = 0
        with torch.no_grad():
            for b in loaders.test:
                labels = b.pop("labels")
                right += (m(**b).logits.argmax(-1) == labels).sum().item()
                total += len(labels)
        return right / total

    assert accuracy(model) == pytest.approx(next(r for r in result.runs if r["name"] == "adamw")["fp_accuracy"],
                                            abs=1e-9)
    from s2d.data import calibration_batches
    calib = calibration_batches(loaders, num_samples=8, batch_size=8, seed=0)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4), method="rtn", calib=calib, progress=False)
    cell = next(c for c in result.cells if (c["arm"], c["method"], c["bits"]) == ("adamw", "rtn", "W4A4"))
    assert accuracy(model) == pytest.approx(cell["accuracy"], abs=1e-9)


def test_rerun_reuses_everything(full_run, monkeypatch):
    cfg, out, first, _ = full_run

    def no_training(*a, **k):
        raise AssertionError("a finished arm was retrained")

    monkeypatch.setattr(experiment, "finetune", no_training)
    counter = CountingCell()
    again = run_experiment(cfg, out, progress=False, cell_fn=counter)
    assert counter.calls == []
    assert again.arms == first.arms and again.runs == first.runs and again.cells == first.cells


def test_interrupted_run_finishes_only_missing(tiny, tmp_path, monkeypatch):
    raw = raw_config(*tiny, arms={"names": ["adamw", "adamw+s2d"]}, train={"steps": 2, "eval_every": 1},
                     quant={"methods": ["rtn"], "method_bits": {}})
    cfg = from_dict(raw)
    trained: list[str] = []
    real_finetune = experiment.finetune

    def counting_finetune(bundle, loaders, train_cfg, **kw):
        trained.append(kw["s2d_config"] is not None)
        return real_finetune(bundle, loaders, train_cfg, **kw)

    monkeypatch.setattr(experiment, "finetune", counting_finetune)
    first = CountingCell(fail_at=2)                     # dies in adamw's second cell
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False, cell_fn=first)
    assert trained == [False] and first.calls == [("rtn", "W8A8")]
    second = CountingCell()
    res = run_experiment(cfg, tmp_path / "run", progress=False, cell_fn=second)
    assert trained == [False, True]                     # only adamw+s2d is trained now
    assert second.calls == [("rtn", "W4A4"), ("rtn", "W8A8"), ("rtn", "W4A4")]
    assert sorted((c["arm"], c["bits"], c["accuracy"]) for c in res.cells) == sorted(
        (a, f"W{b}A{b}", round((0.25 + 0.01 * b) * 16) / 16) for a in ("adamw", "adamw+s2d") for b in (8, 4))
    third = CountingCell()
    run_experiment(cfg, tmp_path / "run", progress=False, cell_fn=third)
    assert third.calls == [] and trained == [False, True]


def test_other_config_refused(full_run, tiny, tmp_path):
    cfg, out, _, _ = full_run
    other = from_dict(raw_config(*tiny, train={"steps": 5}))
    assert other.fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="holds a run of a different config") as info:
        run_experiment(other, out, progress=False, cell_fn=CountingCell())
    assert "\n" not in str(info.value)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no s2d run"):
        RunDir(tmp_path / "junk").claim(cfg)
    RunDir(tmp_path / "fresh").claim(cfg)                         # new or empty directories are fine
    RunDir(tmp_path / "fresh").claim(cfg)


@pytest.mark.parametrize("bad", ["no_label_column", "empty", "one_class"])
def test_failed_run_does_not_lock_its_folder(tiny, tmp_path, bad):
    """A run that fails on its data leaves --out free: the corrected config then runs in the same folder."""
    model, good = tiny
    data = tmp_path / "data.csv"
    if bad == "no_label_column":
        data.write_text("text,target\nbad movie,0\ngood movie,1\n")
    elif bad == "empty":
        data.write_text("")
    else:
        data.write_text("text,label\n" + "".join(f"movie number {i},1\n" for i in range(30)))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=str(data)) as info:
        run_experiment(from_dict(raw_config(model, data)), out, progress=False, cell_fn=CountingCell())
    assert "\n" not in str(info.value)
    assert not (out / "fingerprint.json").exists()
    fixed = from_dict(raw_config(model, good, arms={"names": ["adamw"]}, train={"steps": 1},
                                 quant={"methods": ["rtn"], "bits": ["W8A8"], "method_bits": {}}))
    res = run_experiment(fixed, out, progress=False, cell_fn=CountingCell())
    assert set(res.arms) == {"adamw"} and (out / "fingerprint.json").exists()


def test_failure_before_any_result_releases_the_claim(tiny, tmp_path, monkeypatch):
    cfg = from_dict(raw_config(*tiny, arms={"names": ["adamw"]}))

    def crash(*a, **k):
        raise RuntimeError("simulated crash in the first arm")

    monkeypatch.setattr(experiment, "finetune", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, tmp_path / "run", progress=False, cell_fn=CountingCell())
    assert not (tmp_path / "run" / "fingerprint.json").exists()
    other = from_dict(raw_config(*tiny, arms={"names": ["adamw"]}, train={"steps": 1}))
    assert RunDir(tmp_path / "run").claim(other)               # any config may use it now


def test_seeds_pair_the_arms_and_extend_a_finished_run(tiny, tmp_path, monkeypatch):
    """Per seed every arm starts from the same head and sees the same data; the test set is the same
    for every seed; adding a seed to a finished run trains only the new (arm, seed) pairs."""
    encoder = make_tiny_model(tmp_path / "encoder", head=False)     # the head is initialised from the seed
    raw = raw_config(encoder, tiny[1], arms={"names": ["adamw", "adamw+s2d"]}, train={"steps": 2, "eval_every": 1},
                     quant={"methods": ["rtn"], "bits": ["W8A8"], "method_bits": {}})
    heads, trained = {}, []
    real_finetune = experiment.finetune

    def spy(bundle, loaders, train_cfg, **kw):
        heads[(kw["s2d_config"] is not None, train_cfg.seed)] = bundle.model.classifier.weight.detach().clone()
        trained.append(train_cfg.seed)
        return real_finetune(bundle, loaders, train_cfg, **kw)

    monkeypatch.setattr(experiment, "finetune", spy)
    raw.pop("seed")
    first = run_experiment(from_dict({**raw, "seeds": [0, 1]}), tmp_path / "run", progress=False,
                           cell_fn=CountingCell())
    assert sorted(trained) == [0, 0, 1, 1] and first.seeds == [0, 1]
    for seed in (0, 1):                                                # paired within a seed
        torch.testing.assert_close(heads[(False, seed)], heads[(True, seed)], rtol=0, atol=0)
    assert not torch.equal(heads[(False, 0)], heads[(False, 1)])      # a new head per seed
    sizes = {r["fp_correct"]["n"] for r in first.runs}
    assert sizes == {16}                                               # one test set for every seed
    more = run_experiment(from_dict({**raw, "seeds": [0, 1, 2]}), tmp_path / "run", progress=False,
                          cell_fn=CountingCell())
    assert sorted(trained) == [0, 0, 1, 1, 2, 2] and len(more.runs) == 6 and len(more.cells) == 6


def test_sensitivity_bits_is_the_mildest_setting_that_hurts():
    runs = [{"name": "adamw", "fp_accuracy": 0.80}]
    cells = [{"arm": "adamw", "method": "rtn", "bits": b, "accuracy": a}
             for b, a in (("W8A8", 0.79), ("W6A6", 0.76), ("W5A5", 0.70), ("W4A4", 0.50))]
    cells.append({"arm": "adamw", "method": "repq", "bits": "W8A8", "accuracy": 0.10})   # another method
    assert experiment.sensitivity_bits(runs, cells, "rtn") == "W5A5"
    assert experiment.sensitivity_bits(runs, cells[:2], "rtn") is None
    assert experiment.sensitivity_bits([{"name": "muon", "fp_accuracy": 0.8}], cells, "rtn") is None


def test_run_with_sensitivity(tiny, tmp_path):
    from s2d.pipeline.report import write_report
    cfg = from_dict(raw_config(*tiny, arms={"names": ["adamw", "adamw+s2d"]}, probes={"sensitivity_examples": 16},
                               quant={"bits": ["W8A8", "W4A4"], "methods": ["rtn"]}))
    out = tmp_path / "run"
    res = run_experiment(cfg, out, progress=False, cell_fn=CountingCell())   # fake cells: every setting hurts
    assert set(res.sensitivity) == {"adamw", "adamw+s2d"}
    rep = res.sensitivity["adamw"]
    assert rep["bits"] == "W8A8" and rep["method"] == "rtn" and rep["examples"] == 16
    assert (out / "sensitivity" / "adamw@s0.json").exists()
    write_report(res, out)
    md = (out / "report.md").read_text()
    assert "## Which quantization sites cost the accuracy" in md and "S2D selects" in md
    assert (out / "figures" / "sensitivity.png").exists()
    again = run_experiment(cfg, out, progress=False, cell_fn=CountingCell())
    assert again.sensitivity == res.sensitivity                     # read back, not recomputed


def test_cd_arm_trains_with_cd_and_every_arm_reports_pair_alignment(tiny, tmp_path):
    from s2d.pipeline.report import write_report
    cfg = from_dict(raw_config(*tiny, arms={"names": ["adamw", "adamw+cd"]},
                               quant={"bits": ["W8A8"], "methods": ["rtn"], "method_bits": {}},
                               cd={"strength": 200.0, "keep_top": 2, "interval": 2}))
    out = tmp_path / "run"
    res = run_experiment(cfg, out, progress=False, cell_fn=CountingCell())
    runs = {r["name"]: r for r in res.runs}
    assert res.arms["adamw+cd"]["cd_config"] == {"strength": 200.0, "keep_top": 2, "interval": 2}
    assert runs["adamw"]["train"]["cd_stats"] is None and len(runs["adamw+cd"]["train"]["cd_stats"]) == 4
    for arm in ("adamw", "adamw+cd"):       # 2 blocks x (value -> output, up -> down), measured for every arm
        assert [p["kind"] for p in runs[arm]["alignment"]] == ["attn", "ffn"] * 2
    for plain, cd in zip(runs["adamw"]["alignment"], runs["adamw+cd"]["alignment"]):
        assert cd["alignment"] < plain["alignment"]
    write_report(res, out)
    md = (out / "report.md").read_text()
    assert "## Pair alignment (Colinearity Decay's measure)" in md and "| adamw+cd | ffn |" in md
