"""PyTorch Lightning adapters: :class:`S2DLightningCallback` and :class:`CDLightningCallback`
(need ``pip install lightning``).

    from s2d.integrations.lightning import CDLightningCallback, S2DLightningCallback
    trainer = lightning.pytorch.Trainer(callbacks=[S2DLightningCallback(S2DConfig())], ...)
    trainer = lightning.pytorch.Trainer(callbacks=[CDLightningCallback(CDConfig(), pairs=colinearity_pairs)])
    trainer.fit(module, datamodule)

When fitting starts the callback attaches its regularizer to the LightningModule and its (first)
optimizer; the regularizer's state travels inside Lightning checkpoints through the callback's
``state_dict`` / ``load_state_dict``. A pairs function is called on the LightningModule, so the pair
names carry its attribute prefix. Lightning (``lightning`` or the older ``pytorch_lightning``) is
imported when this module is, not by ``import s2d``.
"""
from __future__ import annotations

import logging
try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the legacy package name
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "s2d.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from err
import torch
from torch import nn

from s2d.colinearity import CDConfig, ColinearityDecay, PairStats
from s2d.colinearity.hooks import Pairs
from s2d.integrations.unwrap import unwrap_optimizer
from s2d.regularizer import LayerStats, S2DConfig, SelectiveSpectralDecay

logger = logging.getLogger(__name__)

__all__ = ["S2DLightningCallback", "CDLightningCallback"]


class _RegularizerLightningCallback(pl.Callback):
    """Attach a regularizer at ``on_fit_start``; its state is the callback's checkpoint state."""

    _entry = ""  # the key of the regularizer state in the callback state (not pl.Callback.state_key)

    def __init__(self, optimizer_index: int = 0) -> None:
        super().__init__()
        self.optimizer_index = optimizer_index
        self.decay: SelectiveSpectralDecay | ColinearityDecay | None = None
        self._pending: dict | None = None

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SelectiveSpectralDecay | ColinearityDecay:
        raise NotImplementedError

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is not None:
            self.decay.remove()
        self.decay = self._attach(pl_module, unwrap_optimizer(trainer.optimizers[self.optimizer_index]))
        if self._pending is not None:  # checkpoint restored before the hooks existed
            self.decay.load_state_dict(self._pending)
            self._pending = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is not None:
            self.decay.remove()

    def state_dict(self) -> dict[str, dict]:
        return {self._entry: self.decay.state_dict()} if self.decay is not None else {}

    def load_state_dict(self, state_dict: dict[str, dict]) -> None:
        sd = state_dict.get(self._entry)
        if sd is None:
            return
        if self.decay is not None:
            self.decay.load_state_dict(sd)
        else:
            self._pending = sd


class S2DLightningCallback(_RegularizerLightningCallback):
    """Apply Selective Spectral Decay inside ``lightning.pytorch.Trainer.fit``.

    Args:
        config: S2D hyperparameters (``interval`` counts optimizer steps).
        optimizer_index: which of ``trainer.optimizers`` S2D hooks (default the first).
    Attributes:
        decay: the attached :class:`SelectiveSpectralDecay` (None before fitting starts).
    """

    _entry = "s2d"

    def __init__(self, config: S2DConfig = S2DConfig(), optimizer_index: int = 0) -> None:
        super().__init__(optimizer_index)
        self.config = config

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SelectiveSpectralDecay:
        return SelectiveSpectralDecay(model, optimizer, self.config)

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer stats of the last refresh (still available after fitting ended)."""
        return self.decay.layer_stats() if self.decay is not None else []


class CDLightningCallback(_RegularizerLightningCallback):
    """Apply Colinearity Decay inside ``lightning.pytorch.Trainer.fit``.

    Args:
        config: CD hyperparameters.
        pairs: the pairs, or a function ``module -> pairs`` such as :func:`s2d.models.colinearity_pairs`.
        optimizer_index: which of ``trainer.optimizers`` CD hooks (default the first).
    Attributes:
        decay: the attached :class:`ColinearityDecay` (None before fitting starts).
    """

    _entry = "cd"

    def __init__(self, config: CDConfig = CDConfig(), pairs: Pairs = (), optimizer_index: int = 0) -> None:
        super().__init__(optimizer_index)
        self.config, self.pairs = config, pairs

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> ColinearityDecay:
        return ColinearityDecay(model, optimizer, self.config, self.pairs)

    def pair_stats(self) -> list[PairStats]:
        """Per-pair stats (still available after fitting ended)."""
        return self.decay.pair_stats() if self.decay is not None else []
