"""Fine-tuning loop on Hugging Face Accelerate: AdamW or Muon, optional S2D, optional QAT.

The same code runs on one CPU, one GPU, or several processes (`accelerate launch` / `torchrun`).
Steps are *optimizer* steps; one step consumes `grad_accum` micro-batches. Data order is a pure
function of (seed, epoch) and the torch RNG (dropout) is reseeded from (seed, step) before every
step, so a run resumed from a checkpoint sees exactly the batches and dropout masks an
uninterrupted run would have seen.

While training we record, every `eval_every` steps, the max |activation| of every FFN Linear on a
fixed probe batch (the paper's Fig. 1: worst-layer max |a| over training steps) for every arm, with
or without S2D, so the arms are compared with one and the same measurement.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning run.

    Exactly one of `steps` (optimizer steps) and `epochs` (passes over the train loader) is set.
    `warmup` is the fraction of steps with a linear learning-rate ramp; `eval_every` is also the
    period (in steps) of the activation probe; `save_every` = 0 saves only the final checkpoint.
    """
    steps: int | None = None
    epochs: float | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    schedule: str = "linear"
    batch_size: int = 32
    eval_batch_size: int = 64
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int | None = 4
    save_every: int = 0
    max_grad_norm: float = 1.0
    muon_lr: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: set exactly one of steps and epochs, got "
                             f"steps={self.steps}, epochs={self.epochs}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"TrainConfig.steps must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs!r}")
        _positive("lr", self.lr)
        if self.muon_lr is not None:
            _positive("muon_lr", self.muon_lr)
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"TrainConfig.warmup must be in [0, 1), got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"TrainConfig.eval_batches must be an integer >= 1 or None, got {self.eval_batches!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"TrainConfig.save_every must be an integer >= 0, got {self.save_every!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run given the train loader's length (micro-batches per epoch)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value!r}")


@dataclass
class TrainResult:
    """What a run did. `loss_history` rows are [step, loss]; `probe_history` rows hold the probe of
    the FFN Linears at a step: {"step", "worst_layer", "worst_max_abs", "max_abs": {name: value},
    "val_accuracy" (or None)}. `s2d_stats` are `LayerStats` dicts at the end (None without S2D)."""
    optimizer: str
    steps: int
    final_loss: float
    loss_history: list[list[float]] = field(default_factory=list)
    probe_history: list[dict[str, Any]] = field(default_factory=list)
    s2d_stats: list[dict[str, Any]] | None = None
    s2d_config: dict[str, Any] | None = None
    qat: dict[str, Any] | None = None
    resumed_from: int = 0
    wall_s: float = 0.0


# --------------------------------------------------------------------------- model helpers

_FFN_FALLBACK = re.compile(r"(intermediate\.dense|(?<!attention\.)output\.dense|fc1|fc2|mlp\.|ffn|"
                           r"gate_proj|up_proj|down_proj)")


def ffn_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The FFN Linears (fc1/fc2 roles) of a transformer, by dotted name, in module order.

    Uses `s2d.models.linear_roles` when it knows the model; otherwise falls back to common names.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    try:
        from s2d.models import linear_roles
        roles = linear_roles(model)
        chosen = {n: m for n, m in linears.items() if roles.get(n) in ("fc1", "fc2")}
        if chosen:
            return chosen
    except Exception as err:  # unknown architecture: use the name heuristic below
        logger.debug("linear_roles failed (%s); using FFN name heuristic", err)
    return {n: m for n, m in linears.items() if _FFN_FALLBACK.search(n)}


def head_names(model: nn.Module) -> set[str]:
    """Names of classifier-head Linears (kept on AdamW under Muon, like embeddings)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        from s2d.models import linear_roles
        roles = linear_roles(model)
        heads = {n for n in names if roles.get(n) == "head"}
        if heads:
            return heads
    except Exception as err:
        logger.debug("linear_roles failed (%s); using head name heuristic", err)
    heads = {n for n in names if re.search(r"(classifier|score|lm_head|(^|\.)head)(\.|$)", n)}
    return heads or ({names[-1]} if names else set())


@torch.no_grad()
def probe_max_abs(model: nn.Module, batch: Mapping[str, torch.Tensor],
                  modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """max |output| of each module on one forward of `batch` (eval mode, no grad)."""
    out: dict[str, float] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m, _i, y, name=name):
            out[name] = float(y.detach().abs().max())
        handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, progress: bool = True, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `model(**batch).logits` against `batch["labels"]`.

    Counts are summed over processes when torch.distributed is initialised.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = torch.zeros((), dtype=torch.long, device=device)
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    for i, batch in enumerate(tqdm(loader, total=n, desc="eval", disable=not progress, leave=False)):
        if i >= n:
            break
        batch = _to_device(batch, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        correct += (logits.argmax(-1) == labels).sum()
        total += labels.numel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(correct) / max(1, int(total))


# --------------------------------------------------------------------------- optimizers

def build_optimizers(model: nn.Module, name: str, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW on everything, or Muon on 2-D hidden Linear weights + AdamW on the rest.

    Returns the optimizers; under "muon" the first one (Muon) owns the hidden Linear weights.
    Biases and LayerNorm parameters get no weight decay in AdamW.
    Muon uses `adjust_lr_fn="match_rms_adamw"` so the same lr is sensible for both.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_ids: set[int] = set()
    if name == "muon":
        heads = head_names(model)
        for mname, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mname not in heads and mod.weight.requires_grad:
                muon_ids.add(id(mod.weight))
    decay = [p for n, p in params if id(p) not in muon_ids and p.ndim >= 2]
    no_decay = [p for n, p in params if id(p) not in muon_ids and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if muon_ids:
        muon_params = [p for _, p in params if id(p) in muon_ids]
        optimizers.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr or cfg.lr,
                                           weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    if groups:
        optimizers.append(torch.optim.AdamW(groups, lr=cfg.lr))
    return optimizers


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warmup, then cosine/linear decay to 0, or constant."""
    warm = int(round(cfg.warmup * total))

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return fn


# --------------------------------------------------------------------------- checkpoints

def _latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def _save_checkpoint(out_dir: Path, model: nn.Module, state: dict[str, Any]) -> None:
    """Write ckpt-<step>/ (model.safetensors + state.pt), then atomically repoint `latest`."""
    from safetensors.torch import save_model

    name = f"ckpt-{state['step']:07d}"
    tmp = out_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = out_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ptmp = out_dir / "latest.tmp"
    ptmp.write_text(name)
    os.replace(ptmp, out_dir / "latest")
    for old in out_dir.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the loop

def _micro_batches(loader: Any, accelerator: Any, start: int) -> Iterator[dict[str, Any]]:
    """Endless stream of micro-batches starting at global micro-batch index `start`."""
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



def finetune(bundle: Any, loaders: Any, train_cfg: TrainConfig, *, optimizer: str = "adamw",
             s2d: Any = None, qat: Any = None, qat_calib: list[dict] | None = None,
             out_dir: Path | str | None = None, progress: bool = True,
             callback: Callable[[int, TrainResult], None] | None = None) -> TrainResult:
    """Fine-tune `bundle.model` in place on `loaders.train`; returns the `TrainResult`.

    s2d: an `S2DConfig` (attaches `SelectiveSpectralDecay` to the optimizer owning the hidden Linear
    weights). qat: a `QuantSpec` (fake-quant training via `s2d.quant.qat.prepare_qat`; the model is
    left prepared, call `convert_qat` to freeze; `qat_calib` batches initialise its activation ranges,
    otherwise the first training batch does). out_dir: checkpoints go to out_dir and a run with
    a checkpoint there resumes from it. callback(step, result) is called after every optimizer step.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                        data_seed=train_cfg.seed),
                              step_scheduler_with_optimizer=False)
    model = bundle.model
    if qat is not None:
        from s2d.quant.qat import prepare_qat
        model = prepare_qat(model, qat, calib=qat_calib, progress=progress)
        bundle.model = model
    model.train()
    optimizers = build_optimizers(model, optimizer, train_cfg)
    prepared = accelerator.prepare(model, *optimizers, loaders.train, loaders.val)
    model, optimizers, train_loader, val_loader = prepared[0], list(prepared[1:-2]), prepared[-2], prepared[-1]
    raw = accelerator.unwrap_model(model)
    total = train_cfg.total_steps(len(train_loader))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o.optimizer, lr_lambda(train_cfg, total)) for o in optimizers]

    decay = None
    if s2d is not None:
        from s2d.decay import SelectiveSpectralDecay
        decay = SelectiveSpectralDecay(raw, optimizers[0].optimizer, s2d)

    result = TrainResult(optimizer=optimizer, steps=total, final_loss=float("nan"),
                         s2d_config=_jsonable(s2d), qat=_jsonable(qat))
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    ckpt = _latest_checkpoint(out) if out is not None else None
    if ckpt is not None:
        start = _load_checkpoint(ckpt, raw, optimizers, schedulers, decay, result)
        logger.info("resuming from %s (step %d of %d)", ckpt, start, total)

    probe_mods = ffn_modules(raw)
    probe_batch = _to_device(next(iter(loaders.val)), accelerator.device) if probe_mods else None

    def record_probe(step: int, with_eval: bool) -> None:
        row: dict[str, Any] = {"step": step, "val_accuracy": None}
        if probe_batch is not None:
            values = probe_max_abs(raw, probe_batch, probe_mods)
            worst = max(values, key=values.get)
            row.update(worst_layer=worst, worst_max_abs=values[worst], max_abs=values)
        if with_eval:
            row["val_accuracy"] = evaluate(model, val_loader, progress=False, max_batches=train_cfg.eval_batches)
        result.probe_history.append(row)

    if start == 0:
        record_probe(0, with_eval=False)
    stream = _micro_batches(train_loader, accelerator, start * train_cfg.grad_accum)
    bar = tqdm(range(start, total), initial=start, total=total, desc=f"train[{optimizer}]",
               disable=not progress or not accelerator.is_main_process)
    window: list[float] = []
    for step in bar:
        torch.manual_seed(train_cfg.seed * 1_000_003 + step)  # dropout etc.: a function of (seed, step)
        loss = _train_step(model, optimizers, stream, accelerator, train_cfg)
        for sched in schedulers:
            sched.step()
        result.loss_history.append([step + 1, loss])
        result.final_loss = loss
        window.append(loss)
        done = step + 1
        if done % train_cfg.eval_every == 0 or done == total:
            record_probe(done, with_eval=True)
        if done % train_cfg.log_every == 0 or done == total:
            _log_progress(bar, done, total, window, result, decay, schedulers)
            window = []
        if out is not None and accelerator.is_main_process and (
                done == total or (train_cfg.save_every and done % train_cfg.save_every == 0)):
            _save_checkpoint(out, raw, _checkpoint_state(done, optimizers, schedulers, decay, result))
        if callback is not None:
            callback(done, result)
    bar.close()
    if decay is not None:
        result.s2d_stats = [_jsonable(s) for s in decay.layer_stats()]
        decay.remove()
    result.wall_s = result.wall_s + time.perf_counter() - t0
    bundle.model = raw
    return result


def _train_step(model: nn.Module, optimizers: list, stream: Iterator, accelerator: Any, cfg: TrainConfig) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the mean micro-batch loss."""
    total_loss = 0.0
    for micro in range(cfg.grad_accum):
        batch = next(stream)
        last = micro == cfg.grad_accum - 1
        ctx = accelerator.no_sync(model) if not last else _nullcontext()
        with ctx:
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


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def _log_progress(bar: Any, done: int, total: int, window: list[float], result: TrainResult,
                  decay: Any, schedulers: list) -> None:
    mean = sum(window) / max(1, len(window))
    last = result.probe_history[-1] if result.probe_history else {}
    post = {"loss": f"{mean:.4f}", "lr": f"{schedulers[0].get_last_lr()[0]:.2e}"}
    if last.get("worst_max_abs") is not None:
        post["max|a|"] = f"{last['worst_max_abs']:.1f}"
    if last.get("val_accuracy") is not None:
        post["val_acc"] = f"{last['val_accuracy']:.3f}"
    if decay is not None:
        stats = decay.layer_stats()
        post["s2d_layers"] = sum(1 for s in stats if s.k_target is not None and not s.skipped)
    bar.set_postfix(post)
    logger.info("step %d/%d %s", done, total, " ".join(f"{k}={v}" for k, v in post.items()))


def _checkpoint_state(step: int, optimizers: list, schedulers: list, decay: Any, result: TrainResult) -> dict:
    return {
        "step": step,
        "optimizers": [o.optimizer.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "s2d": decay.state_dict() if decay is not None else None,
        "loss_history": result.loss_history,
        "probe_history": result.probe_history,
        "final_loss": result.final_loss,
        "wall_s": result.wall_s,
    }


def _load_checkpoint(path: Path, model: nn.Module, optimizers: list, schedulers: list, decay: Any,
                     result: TrainResult) -> int:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    state = torch.load(path / "state.pt", weights_only=True)
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.optimizer.load_state_dict(sd)
    for sched, sd in zip(schedulers, state["schedulers"]):
        sched.load_state_dict(sd)
    if decay is not None and state["s2d"] is not None:
        decay.load_state_dict(state["s2d"])
    result.loss_history = [list(r) for r in state["loss_history"]]
    result.probe_history = list(state["probe_history"])
    result.final_loss = float(state["final_loss"])
    result.wall_s = float(state["wall_s"])
    result.resumed_from = int(state["step"])
    return int(state["step"])


def _jsonable(obj: Any) -> Any:
    """dataclass -> dict with callables/tuples made JSON-friendly; None stays None."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if torch.is_tensor(obj):
        return obj.tolist()
    return repr(obj)
