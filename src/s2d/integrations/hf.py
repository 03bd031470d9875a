"""Hugging Face ``transformers.Trainer`` adapters: :class:`S2DCallback` and :class:`CDCallback`.

    from s2d.integrations.hf import CDCallback, S2DCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[S2DCallback(S2DConfig())])
    trainer = Trainer(..., callbacks=[CDCallback(CDConfig(), pairs=colinearity_pairs)])   # s2d.models
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

Each callback attaches its regularizer (:class:`~s2d.regularizer.SelectiveSpectralDecay`,
:class:`~s2d.colinearity.ColinearityDecay`) to the model and the (unwrapped) optimizer when training
begins, so the regularizer's optimizer-step hooks follow the Trainer's real optimizer steps (gradient
accumulation, clipping and skipped fp16 steps included). Its state is written next to every Trainer
checkpoint (``checkpoint-N/s2d_state.pt`` or ``cd_state.pt``) and read back when training resumes
from one. Works unchanged under ``torchrun`` / ``accelerate launch``: S2D's refresh is shared across
ranks by :mod:`s2d.regularizer.sharding`, and CD's step is the same on every replica.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from s2d.colinearity import CDConfig, ColinearityDecay, PairStats
from s2d.colinearity.hooks import Pairs
from s2d.integrations.unwrap import unwrap_optimizer
from s2d.regularizer import LayerStats, S2DConfig, SelectiveSpectralDecay
from s2d.utils import save_torch

logger = logging.getLogger(__name__)

__all__ = ["S2DCallback", "CDCallback", "STATE_FILE", "CD_STATE_FILE", "unwrap_optimizer"]

STATE_FILE = "s2d_state.pt"
CD_STATE_FILE = "cd_state.pt"


class _RegularizerCallback(TrainerCallback):
    """Attach a regularizer at ``on_train_begin``, save its state with checkpoints, resume it."""

    state_file = ""

    def __init__(self, resume_from: str | os.PathLike | None = None) -> None:
        self.resume_from = resume_from
        self.decay: SelectiveSpectralDecay | ColinearityDecay | None = None

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SelectiveSpectralDecay | ColinearityDecay:
        raise NotImplementedError

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: object = None, **kwargs: object) -> None:
        if model is None or optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model/optimizer to on_train_begin")
        if self.decay is not None:  # a second trainer.train() call: start from fresh hooks
            self.decay.remove()
        self.decay = self._attach(model, unwrap_optimizer(optimizer))
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
            logger.warning("%s: checkpoint folder %s not found; state not saved", type(self).__name__, folder)
            return
        save_torch(folder / self.state_file, self.decay.state_dict())

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        assert self.decay is not None
        candidates = [self.resume_from]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for folder in candidates:
            if folder is not None and (Path(folder) / self.state_file).is_file():
                sd = torch.load(Path(folder) / self.state_file, map_location="cpu", weights_only=True)
                self.decay.load_state_dict(sd)
                logger.info("%s: resumed its state (step %d) from %s", type(self).__name__, self.decay.step, folder)
                return
        logger.warning("%s: resuming at step %d without a saved state; refreshing now", type(self).__name__,
                       state.global_step)
        self.decay.step = state.global_step
        self.decay.refresh_now()


class S2DCallback(_RegularizerCallback):
    """Apply Selective Spectral Decay inside ``transformers.Trainer``.

    Args:
        config: S2D hyperparameters (``interval`` counts optimizer steps, i.e. ``state.global_step``).
        resume_from: checkpoint directory to read ``s2d_state.pt`` from when resuming; default: the one
            the Trainer resumes from (``args.resume_from_checkpoint`` or ``output_dir/checkpoint-<step>``).
    Attributes:
        decay: the attached :class:`SelectiveSpectralDecay` (None before training starts).
    """

    state_file = STATE_FILE

    def __init__(self, config: S2DConfig = S2DConfig(), resume_from: str | os.PathLike | None = None) -> None:
        super().__init__(resume_from)
        self.config = config

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SelectiveSpectralDecay:
        return SelectiveSpectralDecay(model, optimizer, self.config)

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer stats of the last refresh (still available after training ended)."""
        return self.decay.layer_stats() if self.decay is not None else []


class CDCallback(_RegularizerCallback):
    """Apply Colinearity Decay inside ``transformers.Trainer``.

    Args:
        config: CD hyperparameters.
        pairs: the pairs, or a function ``model -> pairs`` such as :func:`s2d.models.colinearity_pairs`.
        resume_from: checkpoint directory to read ``cd_state.pt`` from when resuming (as for S2DCallback).
    Attributes:
        decay: the attached :class:`ColinearityDecay` (None before training starts).
    """

    state_file = CD_STATE_FILE

    def __init__(self, config: CDConfig = CDConfig(), pairs: Pairs = (),
                 resume_from: str | os.PathLike | None = None) -> None:
        super().__init__(resume_from)
        self.config, self.pairs = config, pairs

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> ColinearityDecay:
        return ColinearityDecay(model, optimizer, self.config, self.pairs)

    def pair_stats(self) -> list[PairStats]:
        """Per-pair stats (still available after training ended)."""
        return self.decay.pair_stats() if self.decay is not None else []
