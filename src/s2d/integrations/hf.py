"""Hugging Face ``transformers.Trainer`` adapter: :class:`S2DCallback`.

    from s2d.integrations.hf import S2DCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[S2DCallback(S2DConfig())])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

The callback attaches :class:`~s2d.regularizer.SelectiveSpectralDecay` to the model and the (unwrapped)
optimizer when training begins, so S2D's optimizer-step hooks follow the Trainer's real optimizer steps
(gradient accumulation, clipping and skipped fp16 steps included). Its state is written next to every
Trainer checkpoint (``checkpoint-N/s2d_state.pt``) and read back when training resumes from one.
Works unchanged under ``torchrun`` / ``accelerate launch``: the refresh is shared across ranks by
:mod:`s2d.regularizer.sharding`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from s2d.integrations.unwrap import unwrap_optimizer
from s2d.regularizer import LayerStats, S2DConfig, SelectiveSpectralDecay
from s2d.utils import save_torch

logger = logging.getLogger(__name__)

__all__ = ["S2DCallback", "STATE_FILE", "unwrap_optimizer"]

STATE_FILE = "s2d_state.pt"


class S2DCallback(TrainerCallback):
    """Apply Selective Spectral Decay inside ``transformers.Trainer``.

    Args:
        config: S2D hyperparameters (``interval`` counts optimizer steps, i.e. ``state.global_step``).
        resume_from: checkpoint directory to read ``s2d_state.pt`` from when resuming; default: the one
            the Trainer resumes from (``args.resume_from_checkpoint`` or ``output_dir/checkpoint-<step>``).
    Attributes:
        decay: the attached :class:`SelectiveSpectralDecay` (None before training starts).
    """

    def __init__(self, config: S2DConfig = S2DConfig(), resume_from: str | os.PathLike | None = None) -> None:
        self.config = config
        self.resume_from = resume_from
        self.decay: SelectiveSpectralDecay | None = None

    # ------------------------------------------------------------------ lifecycle
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: object = None, **kwargs: object) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("S2DCallback: the Trainer passed no model/optimizer to on_train_begin")
        if self.decay is not None:  # a second trainer.train() call: start from fresh hooks
            self.decay.remove()
        self.decay = SelectiveSpectralDecay(model, unwrap_optimizer(optimizer), self.config)
        if state.global_step > 0:
            self._resume(args, state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: object) -> None:
        if self.decay is not None:
            self.decay.remove()  # the model leaves training without hooks; stats stay readable

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: object) -> None:
        if self.decay is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            logger.warning("S2DCallback: checkpoint folder %s not found; S2D state not saved", folder)
            return
        save_torch(folder / STATE_FILE, self.decay.state_dict())

    # ------------------------------------------------------------------ helpers
    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.decay is not None
        candidates = [self.resume_from]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for folder in candidates:
            if folder is not None and (Path(folder) / STATE_FILE).is_file():
                sd = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
                self.decay.load_state_dict(sd)
                logger.info("S2DCallback: resumed S2D state (step %d) from %s", self.decay.step, folder)
                return
        logger.warning("S2DCallback: resuming at step %d without a saved S2D state; refreshing now",
                       state.global_step)
        self.decay.step = state.global_step
        self.decay.refresh_now()

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer stats of the last refresh (still available after training ended)."""
        return self.decay.layer_stats() if self.decay is not None else []
