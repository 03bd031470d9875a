"""s2d.train on a tiny BertForSequenceClassification with synthetic token data.

Checks: config validation, lr schedule against its closed form, loss falls, the activation probe
equals a direct forward, Muon owns exactly the hidden Linear weights, and a checkpoint+resume run
reproduces an uninterrupted run bit for bit (same data order, RNG, optimizer and scheduler state).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from s2d.colinearity import CDConfig
from s2d.models import ffn_modules
from s2d.regularizer import S2DConfig
from s2d.train import TrainConfig, evaluate, finetune
from s2d.train.evaluate import probe_max_abs
from s2d.train.optim import build_optimizers, lr_lambda


class TokenTask(Dataset):
    """Label = whether the sequence holds token 5 (else token 4) at a random position: easy for a tiny BERT."""

    def __init__(self, n: int, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 30, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(0, length, (n,), generator=g)
        self.ids[torch.arange(n), pos] = 4 + self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bundle(seed: int = 0) -> SimpleNamespace:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return SimpleNamespace(model=BertForSequenceClassification(cfg), modality="text", family="bert",
                           name="tiny-bert", tokenizer=None, num_labels=2)


def tiny_loaders(n_train: int = 128, batch: int = 16) -> SimpleNamespace:
    return SimpleNamespace(train=DataLoader(TokenTask(n_train, seed=1), batch_size=batch, shuffle=True),
                           val=DataLoader(TokenTask(64, seed=2), batch_size=32),
                           test=DataLoader(TokenTask(64, seed=3), batch_size=32), num_labels=2,
                           label_names=["no", "yes"])


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one of steps and epochs"),
    ({"steps": 3, "epochs": 1.0}, "exactly one of steps and epochs"),
    ({"steps": 0}, "TrainConfig.steps"),
    ({"steps": 3, "lr": -1.0}, "TrainConfig.lr"),
    ({"steps": 3, "warmup": 1.0}, "TrainConfig.warmup"),
    ({"steps": 3, "schedule": "step"}, "TrainConfig.schedule"),
    ({"steps": 3, "grad_accum": 0}, "TrainConfig.grad_accum"),
    ({"steps": 3, "max_grad_norm": -1.0}, "TrainConfig.max_grad_norm"),
])
def test_train_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_total_steps_from_epochs():
    assert TrainConfig(epochs=2.0, grad_accum=2).total_steps(batches_per_epoch=7) == 7  # ceil(14 / 2)
    assert TrainConfig(steps=11).total_steps(batches_per_epoch=3) == 11


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_closed_form(schedule):
    total, cfg = 20, TrainConfig(steps=20, warmup=0.2, schedule=schedule)
    fn = lr_lambda(cfg, total)
    warm = 4
    for s in range(total):
        if s < warm:
            expect = (s + 1) / (warm + 1)
        else:
            frac = (s - warm) / (total - warm)
            expect = {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[schedule]
        assert fn(s) == pytest.approx(expect)


def test_probe_matches_direct_forward():
    bundle = tiny_bundle()
    mods = ffn_modules(bundle.model)
    assert set(mods) == {f"bert.encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("intermediate", "output")}
    batch = next(iter(tiny_loaders().val))
    got = probe_max_abs(bundle.model, batch, mods)
    # independent: recompute layer 0 FFN by hand from the hidden states
    bundle.model.eval()
    with torch.no_grad():
        hs = bundle.model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               output_hidden_states=True).hidden_states
        layer = bundle.model.bert.encoder.layer[0]
        attn = layer.attention(hs[0])[0]          # all-ones mask == no mask
        inter = layer.intermediate.dense(attn)
        out = layer.output.dense(layer.intermediate.intermediate_act_fn(inter))
    assert got["bert.encoder.layer.0.intermediate.dense"] == pytest.approx(float(inter.abs().max()), rel=1e-5)
    assert got["bert.encoder.layer.0.output.dense"] == pytest.approx(float(out.abs().max()), rel=1e-5)


def test_muon_owns_hidden_linear_weights_only():
    model = tiny_bundle().model
    muon, adamw = build_optimizers(model, "muon", TrainConfig(steps=1))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    linear_w = {id(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == linear_w
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.classifier.weight) in adam_ids
    assert id(model.bert.embeddings.word_embeddings.weight) in adam_ids
    assert adam_ids | linear_w == {id(p) for p in model.parameters()} and not adam_ids & linear_w


@pytest.mark.parametrize("optimizer, loss_ratio, min_acc", [("adamw", 0.3, 0.9), ("muon", 0.85, 0.0)])
def test_loss_falls_and_accuracy(optimizer, loss_ratio, min_acc):
    bundle, loaders = tiny_bundle(), tiny_loaders()
    cfg = TrainConfig(steps=80, lr=3e-3, warmup=0.1, eval_every=40, log_every=20, seed=0)
    res = finetune(bundle, loaders, cfg, optimizer=optimizer, progress=False)
    first = sum(l for _, l in res.loss_history[:5]) / 5
    last = sum(l for _, l in res.loss_history[-5:]) / 5
    assert last < loss_ratio * first
    assert [r["step"] for r in res.probe_history] == [0, 40, 80]
    assert all(r["worst_max_abs"] == max(r["max_abs"].values()) for r in res.probe_history)
    # evaluate() agrees with a hand count
    model = bundle.model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in loaders.test:
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            correct += int((pred == b["labels"]).sum())
            total += len(b["labels"])
    assert evaluate(model, loaders.test, progress=False) == pytest.approx(correct / total)
    assert correct / total >= min_acc


@pytest.mark.parametrize("cd,s2d", [(None, None), (CDConfig(strength=20.0, keep_top=2, interval=3), None),
                                    (None, S2DConfig(strength=1.0, update="decoupled", selection="all", interval=3))])
def test_resume_equals_uninterrupted(tmp_path, cd, s2d):
    """Also with a decoupled regularizer: its step reads the lr the scheduler sets after the resume
    (optimizer.load_state_dict replaces the param-group dicts)."""
    cfg = TrainConfig(steps=12, lr=2e-3, save_every=5, eval_every=4, grad_accum=2, seed=3)
    ref_bundle = tiny_bundle()
    ref = finetune(ref_bundle, tiny_loaders(n_train=80), cfg, progress=False, cd_config=cd, s2d_config=s2d)

    class Stop(Exception):
        pass

    def stop_at_7(step, _res):
        if step == 7:
            raise Stop

    bundle = tiny_bundle()
    with pytest.raises(Stop):
        finetune(bundle, tiny_loaders(n_train=80), cfg, out_dir=tmp_path, progress=False, callback=stop_at_7,
                 cd_config=cd, s2d_config=s2d)
    assert (tmp_path / "latest").read_text() == "ckpt-0000005"
    resumed_bundle = tiny_bundle(seed=99)        # different init: everything must come from the checkpoint
    res = finetune(resumed_bundle, tiny_loaders(n_train=80), cfg, out_dir=tmp_path, progress=False, cd_config=cd,
                   s2d_config=s2d)
    assert res.resumed_from == 5
    assert (res.cd_stats is None) == (cd is None) and res.cd_stats == ref.cd_stats
    assert [s for s, _ in res.loss_history] == list(range(1, 13))
    torch.testing.assert_close(torch.tensor(res.loss_history), torch.tensor(ref.loss_history))
    for (n, a), (_, b) in zip(ref_bundle.model.state_dict().items(), resumed_bundle.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
