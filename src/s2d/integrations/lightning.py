"""PyTorch Lightning adapter: :class:`S2DLightningCallback` (needs ``pip install lightning``).

    from s2d.integrations.lightning import S2DLightningCallback
    trainer = lightning.pytorch.Trainer(callbacks=[S2DLightningCallback(S2DConfig())], ...)
    trainer.fit(module, datamodule)

When fitting starts the callback attaches :class:`~s2d.regularizer.SelectiveSpectralDecay` to the
LightningModule and its (first) optimizer; S2D's state travels inside Lightning checkpoints through
the callback's ``state_dict`` / ``load_state_dict``. Lightning (``lightning`` or the older
``pytorch_lightning``) is imported when this module is, not by ``import s2d``.
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

from s2d.integrations.unwrap import unwrap_optimizer
from s2d.regularizer import LayerStats, S2DConfig, SelectiveSpectralDecay

logger = logging.getLogger(__name__)

__all__ = ["S2DLightningCallback"]


class S2DLightningCallback(pl.Callback):
    """Apply Selective Spectral Decay inside ``lightning.pytorch.Trainer.fit``.

    Args:
        config: S2D hyperparameters (``interval`` counts optimizer steps).
        optimizer_index: which of ``trainer.optimizers`` S2D hooks (default the first).
    Attributes:
        decay: the attached :class:`SelectiveSpectralDecay` (None before fitting starts).
    """

    def __init__(self, config: S2DConfig = S2DConfig(), optimizer_index: int = 0) -> None:
        super().__init__()
        self.config = config
        self.optimizer_index = optimizer_index
        self.decay: SelectiveSpectralDecay | None = None
        self._pending: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is not None:
            self.decay.remove()
        optimizer = unwrap_optimizer(trainer.optimizers[self.optimizer_index])
        self.decay = SelectiveSpectralDecay(pl_module, optimizer, self.config)
        if self._pending is not None:  # checkpoint restored before the hooks existed
            self.decay.load_state_dict(self._pending)
            self._pending = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is not None:
            self.decay.remove()

    def state_dict(self) -> dict[str, dict]:
        return {"s2d": self.decay.state_dict()} if self.decay is not None else {}

    def load_state_dict(self, state_dict: dict[str, dict]) -> None:
        sd = state_dict.get("s2d")
        if sd is None:
            return
        if self.decay is not None:
            self.decay.load_state_dict(sd)
        else:
            self._pending = sd

    def layer_stats(self) -> list[LayerStats]:
        """Per-layer stats of the last refresh (still available after fitting ended)."""
        return self.decay.layer_stats() if self.decay is not None else []
