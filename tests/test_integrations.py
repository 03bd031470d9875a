"""Framework adapters: transformers.Trainer (S2DCallback, CDCallback) and PyTorch Lightning
(S2DLightningCallback, CDLightningCallback)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from s2d.colinearity import CDConfig, ColinearityDecay, Pair, alignment
from s2d.regularizer import S2DConfig, SelectiveSpectralDecay

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from s2d.integrations.hf import CD_STATE_FILE, STATE_FILE, CDCallback, S2DCallback, unwrap_optimizer  # noqa: E402
from s2d.models import colinearity_pairs  # noqa: E402

STEPS = 6
CFG = S2DConfig(strength=1.0, power=2.0, tau=0.5, k_max=2, interval=2)
CD = CDConfig(strength=20.0, keep_top=2, interval=2)


# ----------------------------------------------------------------------------- transformers.Trainer
def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 12) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, 64, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 32).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _trainer(out: Path, callbacks: list, model: nn.Module | None = None):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="steps", save_steps=3,
        logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    return Trainer(model=model or _tiny_bert(), args=args, train_dataset=_Tokens(), callbacks=callbacks)


def _sigma(model: nn.Module, name: str) -> float:
    return float(torch.linalg.matrix_norm(model.get_submodule(name).weight.detach().double(), 2))


def test_unwrap_optimizer():
    from accelerate import Accelerator

    opt = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    assert unwrap_optimizer(opt) is opt
    wrapped = Accelerator(cpu=True).prepare(opt)
    assert wrapped is not opt and unwrap_optimizer(wrapped) is opt
    with pytest.raises(TypeError):
        unwrap_optimizer(object())


@pytest.mark.slow
def test_hf_trainer_refreshes_penalises_checkpoints_and_resumes(tmp_path):
    cb = S2DCallback(CFG)
    with_s2d = _trainer(tmp_path / "s2d", [cb])
    with_s2d.train()
    plain = _trainer(tmp_path / "plain", [])
    plain.train()

    s2d = cb.decay
    assert s2d is not None and s2d.step == STEPS and not s2d._handles  # hooks gone after training
    stats = cb.layer_stats()
    assert {s.refreshed_at for s in stats} == {4}  # refreshes at steps 0, 2, 4 of 0..5
    penalised = [s.name for s in stats if s.k_target is not None]
    assert penalised, "the test must penalise some layer"
    for name in penalised:  # S2D pushed the top singular value down relative to plain AdamW
        assert _sigma(with_s2d.model, name) < _sigma(plain.model, name) - 1e-3
    for step in (3, 6):
        sd = torch.load(tmp_path / "s2d" / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert sd["step"] == step

    # resume from checkpoint-3: S2D state is restored and training ends where the uninterrupted run did
    cb2 = S2DCallback(CFG)
    resumed = _trainer(tmp_path / "s2d", [cb2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "s2d" / "checkpoint-3"))
    assert cb2.decay.step == STEPS
    assert [(s.name, s.k_target, s.refreshed_at) for s in cb2.layer_stats()] == \
        [(s.name, s.k_target, s.refreshed_at) for s in stats]
    for (n, a), b in zip(with_s2d.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


def _pair_alignment(model: nn.Module, pair: Pair) -> float:
    return float(alignment(model.get_submodule(pair.first).weight.detach(), model.get_submodule(pair.second).weight.detach()))


@pytest.mark.slow
def test_hf_trainer_with_cd_lowers_alignment_checkpoints_and_resumes(tmp_path):
    cb = CDCallback(CD, pairs=colinearity_pairs)
    with_cd = _trainer(tmp_path / "cd", [cb])
    with_cd.train()
    plain = _trainer(tmp_path / "plain", [])
    plain.train()
    assert cb.decay.step == STEPS and not cb.decay._handles and len(cb.pair_stats()) == 4
    for pair in cb.decay.pairs:
        assert _pair_alignment(with_cd.model, pair) < _pair_alignment(plain.model, pair)
    assert torch.load(tmp_path / "cd" / "checkpoint-3" / CD_STATE_FILE, weights_only=True)["step"] == 3
    cb2 = CDCallback(CD, pairs=colinearity_pairs)
    resumed = _trainer(tmp_path / "cd", [cb2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "cd" / "checkpoint-3"))
    assert cb2.decay.step == STEPS
    for (n, a), b in zip(with_cd.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


# ----------------------------------------------------------------------------- PyTorch Lightning
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Linear(24, 16), nn.GELU(), nn.Linear(16, 3))


def _regression() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(STEPS):
        x = torch.randn(8, 10, generator=g)
        x[:, 2] *= 6.0
        out.append((x, torch.randn(8, 3, generator=g)))
    return out


def _lightning_fit(pl, callback, data, tmp_path):
    """Fit a LightningModule around ``_mlp()`` on ``data`` with ``callback``; returns (module, trainer)."""

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)

    module = Module()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    return module, trainer


def _manual_loop(data, attach=None):
    """The same steps written by hand: ``_mlp()`` under AdamW, with ``attach(net, opt)``'s regularizer."""
    net = _mlp()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    reg = attach(net, opt) if attach is not None else None
    for x, y in data:
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    return net, reg


@pytest.mark.slow
def test_lightning_callback_matches_manual_loop(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from s2d.integrations.lightning import S2DLightningCallback

    data = _regression()
    cb = S2DLightningCallback(CFG)
    module, trainer = _lightning_fit(pl, cb, data, tmp_path)
    net, ref = _manual_loop(data, lambda n, o: SelectiveSpectralDecay(n, o, CFG))
    plain, _ = _manual_loop(data)

    assert cb.decay.step == STEPS and {s.refreshed_at for s in cb.layer_stats()} == {4}
    assert [s.k_target for s in cb.layer_stats()] == [s.k_target for s in ref.layer_stats()]
    assert any(s.k_target is not None for s in ref.layer_stats())
    for a, b, c in zip(module.net.parameters(), net.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert max(float((b - c).abs().max()) for b, c in zip(net.parameters(), plain.parameters())) > 1e-3
    # the callback's state goes into Lightning checkpoints and comes back
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = [v for k, v in state.items() if "S2DLightningCallback" in k]
    assert saved["s2d"]["step"] == STEPS
    cb2 = S2DLightningCallback(CFG)
    cb2.load_state_dict(copy.deepcopy(saved))
    cb2.on_fit_start(trainer, module)
    assert cb2.decay.step == STEPS
    assert [s.k_target for s in cb2.layer_stats()] == [s.k_target for s in ref.layer_stats()]
    cb2.on_fit_end(trainer, module)


@pytest.mark.slow
def test_cd_lightning_callback_matches_manual_loop(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from s2d.integrations.lightning import CDLightningCallback

    data = _regression()
    cb = CDLightningCallback(CD, pairs=[Pair("net.0", "net.2", "ffn"), Pair("net.2", "net.4", "ffn")])
    module, _ = _lightning_fit(pl, cb, data, tmp_path)
    net, ref = _manual_loop(data, lambda n, o: ColinearityDecay(n, o, CD, [Pair("0", "2", "ffn"), Pair("2", "4", "ffn")]))
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert [s.alignment for s in cb.pair_stats()] == pytest.approx([s.alignment for s in ref.pair_stats()], rel=1e-5)
    assert cb.state_dict()["cd"]["step"] == STEPS
