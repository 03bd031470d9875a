"""The fine-tuning loop on Hugging Face Accelerate: AdamW or Muon, optional S2D or CD, optional QAT.

The same code runs on one CPU, one GPU, or several processes (``accelerate launch`` / ``torchrun``).
Steps are *optimizer* steps; one step consumes ``grad_accum`` micro-batches. Data order is a pure
function of (seed, epoch) and the torch RNG (dropout) is reseeded from (seed, step) before every
step, so a run resumed from a checkpoint sees exactly the batches and dropout masks an
uninterrupted run would have seen.

While training we record, every ``eval_every`` steps, the max |activation| of every FFN Linear on a
fixed probe batch (the paper's Fig. 1: worst-layer max |a| over training steps) for every arm, with
or without S2D, so the arms are compared with one and the same measurement.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from s2d.colinearity import CDConfig, ColinearityDecay
from s2d.data import Loaders
from s2d.models import ModelBundle, colinearity_pairs, ffn_modules
from s2d.quant import QuantConfig
from s2d.quant.qat import prepare_qat
from s2d.regularizer import S2DConfig, SelectiveSpectralDecay
from s2d.train.checkpoint import checkpoint_state, latest_checkpoint, load_checkpoint, save_checkpoint
from s2d.train.config import TrainConfig
from s2d.train.evaluate import evaluate, held_out_loss, probe_max_abs
from s2d.train.optim import build_optimizers, lr_lambda
from s2d.utils import jsonable, to_device

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "TrainingDiverged", "finetune"]


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``TrainConfig.max_bad_steps`` steps; no checkpoint holds that state."""


@dataclass
class TrainResult:
    """What a run did (JSON-serialisable through :func:`s2d.utils.jsonable`)."""
    optimizer: str                                            # "adamw" or "muon"
    steps: int                                                # optimizer steps of the run
    final_loss: float                                         # loss of the last step
    loss_history: list[list[float]] = field(default_factory=list)   # rows [step, loss]
    probe_history: list[dict] = field(default_factory=list)  # rows {"step", "worst_layer", "worst_max_abs",
    #                                                           "max_abs": {name: value}, "val_accuracy" or None}
    s2d_stats: list[dict] | None = None                       # LayerStats dicts at the end (None without S2D)
    s2d_guard: list[dict] | None = None                       # DecayGuard.history (None without a guard)
    s2d_config: dict | None = None                            # the S2DConfig used
    cd_stats: list[dict] | None = None                        # PairStats dicts at the end (None without CD)
    cd_config: dict | None = None                             # the CDConfig used
    qat: dict | None = None                                   # the QuantConfig of QAT
    resumed_from: int = 0                                     # step of the checkpoint resumed from (0: none)
    wall_s: float = 0.0                                       # seconds, summed over resumed invocations


@dataclass
class _Session:
    """The prepared pieces of one run."""
    accelerator: Accelerator
    model: nn.Module                 # as prepared by accelerate (may be a DDP wrapper)
    raw: nn.Module                   # the unwrapped model
    optimizers: list                 # accelerate-wrapped optimizers (Muon first under "muon")
    schedulers: list
    train_loader: DataLoader
    val_loader: DataLoader
    decay: SelectiveSpectralDecay | None
    cd: ColinearityDecay | None      # Colinearity Decay (None: off)
    total: int                       # optimizer steps of the run


def finetune(bundle: ModelBundle, loaders: Loaders, train_cfg: TrainConfig, *, optimizer: str = "adamw",
             s2d_config: S2DConfig | None = None, qat: QuantConfig | None = None,
             qat_calib: list[dict] | None = None, out_dir: Path | str | None = None, progress: bool = True,
             callback: Callable[[int, TrainResult], None] | None = None,
             guard_batches: list[dict] | None = None, cd_config: CDConfig | None = None) -> TrainResult:
    """Fine-tune ``bundle.model`` in place on ``loaders.train``; returns the :class:`TrainResult`.

    s2d_config: attach :class:`SelectiveSpectralDecay` to the optimizer owning the hidden Linear
    weights. qat: fake-quant training (:func:`s2d.quant.qat.prepare_qat`; the model is left prepared,
    call ``convert_qat`` to freeze; ``qat_calib`` batches initialise its activation ranges, otherwise
    the first training batch does). out_dir: checkpoints go there, and a run with a checkpoint there
    resumes from it. callback(step, result) is called after every optimizer step. guard_batches: held-out
    labelled batches whose loss guards S2D's relative update (:class:`s2d.regularizer.guard.DecayGuard`;
    ignored for the other updates). cd_config: attach :class:`~s2d.colinearity.ColinearityDecay` to the
    pairs of the model's block layout (:func:`s2d.models.colinearity_pairs`).
    """
    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=train_cfg.seed),
                              step_scheduler_with_optimizer=False)
    if qat is not None:
        bundle.model = prepare_qat(bundle.model, qat, calib=qat_calib, progress=progress)
    run = _prepare(accelerator, bundle.model, loaders, train_cfg, optimizer, s2d_config, guard_batches, cd_config)
    result = TrainResult(optimizer=optimizer, steps=run.total, final_loss=float("nan"),
                         s2d_config=jsonable(s2d_config), qat=jsonable(qat), cd_config=jsonable(cd_config))
    out = Path(out_dir) if out_dir is not None else None
    start = _resume(run, out, result) if out is not None else 0
    probe = _Probe(run, loaders, train_cfg, result)
    if start == 0:
        probe.record(0, with_eval=False)
    _train(run, train_cfg, start, probe, result, out, callback, progress, optimizer)
    if run.decay is not None:
        result.s2d_stats = [jsonable(s) for s in run.decay.layer_stats()]
        result.s2d_guard = list(run.decay.guard.history) if run.decay.guard is not None else None
        run.decay.remove()
    if run.cd is not None:
        result.cd_stats = [jsonable(s) for s in run.cd.pair_stats()]
        run.cd.remove()
    result.wall_s = result.wall_s + time.perf_counter() - t0
    bundle.model = run.raw
    return result


def _prepare(accelerator: Accelerator, model: nn.Module, loaders: Loaders, cfg: TrainConfig, optimizer: str,
             s2d_config: S2DConfig | None, guard_batches: list[dict] | None = None,
             cd_config: CDConfig | None = None) -> _Session:
    """Optimizers, accelerate wrapping, LR schedulers, S2D and CD for ``model`` (in training mode)."""
    model.train()
    optimizers = build_optimizers(model, optimizer, cfg)
    prepared = accelerator.prepare(model, *optimizers, loaders.train, loaders.val)
    model, optimizers, train_loader, val_loader = prepared[0], list(prepared[1:-2]), prepared[-2], prepared[-1]
    raw = accelerator.unwrap_model(model)
    total = cfg.total_steps(len(train_loader))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o.optimizer, lr_lambda(cfg, total)) for o in optimizers]
    decay = None
    if s2d_config is not None:
        decay = SelectiveSpectralDecay(raw, optimizers[0].optimizer, s2d_config,
                                       guard=_guard_loss(raw, guard_batches, accelerator.device, s2d_config))
    cd = ColinearityDecay(raw, optimizers[0].optimizer, cd_config, colinearity_pairs) if cd_config else None
    return _Session(accelerator, model, raw, optimizers, schedulers, train_loader, val_loader, decay, cd, total)


def _guard_loss(model: nn.Module, batches: list[dict] | None, device: torch.device,
                s2d_config: S2DConfig) -> Callable[[], float] | None:
    """The held-out loss that guards the relative update (None: no batches, or another update)."""
    if s2d_config.update != "relative" or not batches:
        return None
    # without "text_mask" a causal LM scores only its answer token: the guard needs the loss, not the perplexity
    held = [to_device({k: v for k, v in b.items() if k != "text_mask"}, device) for b in batches]
    return lambda: held_out_loss(model, held)


def _resume(run: _Session, out: Path, result: TrainResult) -> int:
    """Load the latest checkpoint in ``out`` into the run; returns the step to continue from (0: none)."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return 0
    state = load_checkpoint(ckpt, run.raw, run.optimizers, run.schedulers, run.decay, run.cd)
    result.loss_history = [list(r) for r in state["loss_history"]]
    result.probe_history = list(state["probe_history"])
    result.final_loss = float(state["final_loss"])
    result.wall_s = float(state["wall_s"])
    result.resumed_from = int(state["step"])
    logger.info("resuming from %s (step %d of %d)", ckpt, result.resumed_from, run.total)
    return result.resumed_from


class _Probe:
    """max |a| of the FFN Linears on a fixed validation batch (+ validation accuracy) at given steps."""

    def __init__(self, run: _Session, loaders: Loaders, cfg: TrainConfig, result: TrainResult) -> None:
        self.run, self.cfg, self.result = run, cfg, result
        self.modules = ffn_modules(run.raw)
        self.batch = to_device(next(iter(loaders.val)), run.accelerator.device) if self.modules else None

    def record(self, step: int, with_eval: bool) -> None:
        row: dict = {"step": step, "val_accuracy": None}
        if self.batch is not None:
            values = probe_max_abs(self.run.raw, self.batch, self.modules)
            worst = max(values, key=values.get)
            row.update(worst_layer=worst, worst_max_abs=values[worst], max_abs=values)
        if with_eval:
            row["val_accuracy"] = evaluate(self.run.model, self.run.val_loader, progress=False,
                                           max_batches=self.cfg.eval_batches)
        self.result.probe_history.append(row)


def _train(run: _Session, cfg: TrainConfig, start: int, probe: _Probe, result: TrainResult, out: Path | None,
           callback: Callable[[int, TrainResult], None] | None, progress: bool, optimizer: str) -> None:
    """Steps ``start .. total``: step, schedule, probe, log, checkpoint, callback."""
    acc, total = run.accelerator, run.total
    stream = _micro_batches(run.train_loader, acc, start * cfg.grad_accum)
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train[{optimizer}]",
               disable=not progress or not acc.is_main_process)
    window: list[float] = []
    bad = 0                                           # consecutive non-finite losses
    for step in bar:
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout etc.: a function of (seed, step)
        loss = _train_step(run.model, run.optimizers, stream, acc, cfg)
        for sched in run.schedulers:
            sched.step()
        result.loss_history.append([step + 1, loss])
        result.final_loss = loss
        window.append(loss)
        done = step + 1
        bad = 0 if math.isfinite(loss) else bad + 1
        if cfg.max_bad_steps and bad >= cfg.max_bad_steps:
            bar.close()
            raise TrainingDiverged(_diverged_message(result, bad, out))
        if done % cfg.eval_every == 0 or done == total:
            probe.record(done, with_eval=True)
        if done % cfg.log_every == 0 or done == total:
            _log_progress(bar, done, total, window, result, run)
            window = []
        if out is not None and acc.is_main_process and bad == 0 and (   # never save a non-finite state
                done == total or (cfg.save_every and done % cfg.save_every == 0)):
            history = {k: getattr(result, k) for k in ("loss_history", "probe_history", "final_loss", "wall_s")}
            save_checkpoint(out, run.raw, checkpoint_state(done, run.optimizers, run.schedulers, run.decay, history,
                                                             run.cd))
        if callback is not None:
            callback(done, result)
    bar.close()


def _diverged_message(result: TrainResult, bad: int, out: Path | None) -> str:
    good = [(int(s), v) for s, v in result.loss_history if math.isfinite(v)]
    last = f"the last finite loss was {good[-1][1]:.4g} at step {good[-1][0]}" if good else "no step had a finite loss"
    ckpt = latest_checkpoint(out) if out is not None else None
    kept = f"; the last good checkpoint is {ckpt}" if ckpt is not None else "; no checkpoint was saved"
    return (f"training diverged: the loss was non-finite for {bad} consecutive steps "
            f"(train.max_bad_steps = {bad}); {last}{kept}. Lower train.lr or train.max_grad_norm")


def _micro_batches(loader: DataLoader, accelerator: Accelerator, start: int) -> Iterator[dict]:
    """Endless stream of micro-batches starting at global micro-batch index ``start``."""
    per_epoch = len(loader)
    epoch, offset = divmod(start, per_epoch)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, offset) if offset else loader
        if offset and hasattr(it, "set_epoch"):
            it.set_epoch(epoch)
        yield from it
        epoch, offset = epoch + 1, 0


def _train_step(model: nn.Module, optimizers: list, stream: Iterator[dict], accelerator: Accelerator,
                cfg: TrainConfig) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean micro-batch loss."""
    total_loss = 0.0
    for micro in range(cfg.grad_accum):
        batch = next(stream)
        last = micro == cfg.grad_accum - 1
        with accelerator.no_sync(model) if not last else nullcontext():
            loss = model(**batch).loss
            accelerator.backward(loss / cfg.grad_accum)
        total_loss += float(loss.detach()) / cfg.grad_accum
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total_loss


def _log_progress(bar: tqdm, done: int, total: int, window: list[float], result: TrainResult,
                  run: _Session) -> None:
    mean = sum(window) / max(1, len(window))
    last = result.probe_history[-1] if result.probe_history else {}
    post = {"loss": f"{mean:.4f}", "lr": f"{run.schedulers[0].get_last_lr()[0]:.2e}"}
    if last.get("worst_max_abs") is not None:
        post["max|a|"] = f"{last['worst_max_abs']:.1f}"
    if last.get("val_accuracy") is not None:
        post["val_acc"] = f"{last['val_accuracy']:.3f}"
    if run.decay is not None:
        post["s2d_layers"] = sum(1 for s in run.decay.layer_stats() if s.k_target is not None and not s.skipped)
    bar.set_postfix(post)
    logger.info("step %d/%d %s", done, total, " ".join(f"{k}={v}" for k, v in post.items()))
