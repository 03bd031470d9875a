"""Adapters that plug :class:`s2d.SelectiveSpectralDecay` into training frameworks.

* :mod:`s2d.integrations.hf` — ``S2DCallback`` for ``transformers.Trainer``.
* :mod:`s2d.integrations.lightning` — ``S2DLightningCallback`` for PyTorch Lightning (optional
  dependency: ``pip install lightning``).

Each is imported on demand, so ``import s2d`` pulls in neither framework.
"""
__all__ = ["hf", "lightning"]
