"""The S2D regularizer (torch only), one concept per module, imports flowing down this list:

* :mod:`~s2d.regularizer.config` — :class:`S2DConfig`, the hyperparameters;
* :mod:`~s2d.regularizer.refresh` — the refresh as a pure function and its data types;
* :mod:`~s2d.regularizer.sharding` — the refresh across ``torch.distributed`` ranks (DDP, FSDP2);
* :mod:`~s2d.regularizer.relative` — the relative update (a share of each selected σ per interval);
* :mod:`~s2d.regularizer.guard` — :class:`DecayGuard`, the relative update's held-out back-off;
* :mod:`~s2d.regularizer.worker` — :class:`BackgroundTask`, the asynchronous refresh's thread;
* :mod:`~s2d.regularizer.hooks` — :class:`SelectiveSpectralDecay`, the optimizer hooks.
"""
from s2d.regularizer.config import S2DConfig
from s2d.regularizer.hooks import SelectiveSpectralDecay
from s2d.regularizer.refresh import ActivationPeak, LayerRefresh, LayerStats, compute_refresh

__all__ = ["S2DConfig", "SelectiveSpectralDecay", "LayerStats", "ActivationPeak", "LayerRefresh", "compute_refresh"]
