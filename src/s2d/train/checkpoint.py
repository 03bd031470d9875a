"""Training checkpoints: ``ckpt-<step>/`` (model.safetensors + state.pt) behind an atomic ``latest`` pointer."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from s2d.colinearity import ColinearityDecay
from s2d.regularizer import SelectiveSpectralDecay
from s2d.utils import write_text

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "checkpoint_state"]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none (or it is incomplete)."""
    pointer = out_dir / "latest"
    if not pointer.exists():
        return None
    path = out_dir / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def save_checkpoint(out_dir: Path, model: nn.Module, state: dict) -> None:
    """Write ckpt-<step>/ (model.safetensors + state.pt), atomically repoint ``latest``, drop older ones."""
    name = f"ckpt-{state['step']:07d}"
    tmp = out_dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = out_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text(out_dir / "latest", name)
    for old in out_dir.glob("ckpt-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_state(step: int, optimizers: list, schedulers: list[LRScheduler],
                     decay: SelectiveSpectralDecay | None, history: dict, cd: ColinearityDecay | None = None) -> dict:
    """Everything but the weights: step, optimizer / scheduler / S2D / CD state and the run's history
    (``history``: loss_history, probe_history, final_loss, wall_s of the :class:`TrainResult`)."""
    return {
        "step": step,
        "optimizers": [o.optimizer.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "s2d": decay.state_dict() if decay is not None else None,
        "cd": cd.state_dict() if cd is not None else None,
        **history,
    }


def load_checkpoint(path: Path, model: nn.Module, optimizers: list, schedulers: list[LRScheduler],
                    decay: SelectiveSpectralDecay | None, cd: ColinearityDecay | None = None) -> dict:
    """Restore weights, optimizer, scheduler, S2D and CD state in place; returns the saved state dict."""
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    state = torch.load(path / "state.pt", weights_only=True)
    for opt, sd in zip(optimizers, state["optimizers"]):
        opt.optimizer.load_state_dict(sd)
    for sched, sd in zip(schedulers, state["schedulers"]):
        sched.load_state_dict(sd)
    if decay is not None and state["s2d"] is not None:
        decay.load_state_dict(state["s2d"])
    if cd is not None and state.get("cd") is not None:
        cd.load_state_dict(state["cd"])
    return state
