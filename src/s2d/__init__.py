"""s2d — Selective Spectral Decay for quantization-friendly transformers.

Public API (stable):

    from s2d import S2DConfig, SelectiveSpectralDecay, pcdr_curve
    from s2d import CDConfig, ColinearityDecay      # the competing regularizer (docs/colinearity.md)
"""
from s2d.colinearity import CDConfig, ColinearityDecay, Pair
from s2d.regularizer import LayerStats, S2DConfig, SelectiveSpectralDecay
from s2d.spectral import Spectrum, pcdr_curve, select_rank, spectrum, spectra, top_k

__all__ = [
    "S2DConfig",
    "SelectiveSpectralDecay",
    "LayerStats",
    "CDConfig",
    "ColinearityDecay",
    "Pair",
    "Spectrum",
    "pcdr_curve",
    "select_rank",
    "spectrum",
    "spectra",
    "top_k",
]
__version__ = "0.1.0"
