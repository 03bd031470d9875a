"""The S2D refresh as a pure function: weights + activation peaks -> factors to penalise + stats.

Every ``interval`` steps each target layer is *refreshed*: its spectrum is computed, the PCDR curve
of the layer's largest |output| entry on that step is evaluated, and k_target = the smallest
k <= k_max with PCDR_k >= tau is chosen (``selection="all"``: k = k_max for every layer). Only the
top-k factors U_k, σ_k, V_k are kept. :func:`compute_refresh` touches no module, so the work can run
on another rank (:mod:`s2d.regularizer.sharding`) or a worker thread (:mod:`s2d.regularizer.worker`);
:mod:`s2d.probes` calls it too, so the diagnostic and the regularizer never disagree.

Depends on torch only.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from s2d.regularizer.config import Include, S2DConfig
from s2d.spectral import Spectrum, pcdr_curve, select_rank, spectra, top_k
from s2d.utils import real_tokens

logger = logging.getLogger(__name__)

__all__ = ["LayerStats", "ActivationPeak", "LayerRefresh", "compute_refresh", "find_peak", "find_targets",
           "log_refresh", "reduce_peaks"]


@dataclass
class LayerStats:
    """What the last refresh found for one layer (JSON-serialisable via ``dataclasses.asdict``)."""

    name: str                  # module name
    shape: tuple[int, int]     # weight shape (m, n)
    sigma_max: float           # largest singular value (nan for a non-finite weight)
    pcdr: list[float]          # [PCDR_1..PCDR_k_max] of the largest activation (empty: none captured)
    k_target: int | None       # components penalised until the next refresh (None: healthy / skipped)
    max_activation: float      # largest |output| seen on the refresh step (nan: none)
    skipped: bool              # the layer could not be refreshed (see ``reason``)
    reason: str | None         # why it was skipped, or why the guard does not decay it
    refreshed_at: int          # optimizer step of the refresh


@dataclass
class ActivationPeak:
    """The largest |output| entry of a layer on the forward passes of one step (0-d tensors but ``x``)."""

    max_abs: Tensor            # |A_i|, the entry's magnitude
    x: Tensor                  # (n,) input row x_j that produced it
    neuron: Tensor             # output index i


@dataclass
class LayerRefresh:
    """Result of refreshing one layer."""

    name: str                  # module name
    factors: Spectrum | None   # top-k U_k, σ_k, V_k to penalise (None: no penalty)
    stats: LayerStats          # what the refresh found


def find_peak(weight_shape: Sequence[int], x: object, output: object,
              token_mask: Tensor | None = None) -> ActivationPeak | None:
    """The largest |output| entry of one forward call of a layer with an (m, n) weight, without a sync.

    x: the layer input (..., n); output: (..., m); token_mask: (B, T) real tokens of a text batch
    (padding positions are left out when x and output are (B, T, ...)). Returns None when they are not
    tensors of matching shapes (e.g. integer inputs, or a module whose forward is not W x) or no token
    is real. NaN/Inf propagate to the max.
    """
    m, n = int(weight_shape[0]), int(weight_shape[1])
    if not (isinstance(x, Tensor) and isinstance(output, Tensor) and x.is_floating_point()
            and x.shape[-1] == n and output.shape[-1] == m and output.numel() > 0
            and x.numel() // n == output.numel() // m):
        return None
    with torch.no_grad():
        if x.shape[:-1] == output.shape[:-1]:
            x, output = real_tokens(x.detach(), token_mask), real_tokens(output.detach(), token_mask)
            if output.numel() == 0:
                return None
        flat = output.detach().reshape(-1).abs()
        idx = flat.argmax()
        row = x.detach().reshape(-1, n)[idx // m]
        return ActivationPeak(flat[idx].clone(), row.clone(), idx % m)


def reduce_peaks(peaks: Sequence[ActivationPeak]) -> ActivationPeak | None:
    """The peak with the largest |value| over micro-batches; a non-finite one wins (and gets flagged)."""
    if not peaks:
        return None
    vals = torch.stack([p.max_abs.float() for p in peaks])
    vals = torch.where(torch.isfinite(vals), vals, torch.full_like(vals, math.inf))
    return peaks[int(vals.argmax())]


def _nan_stats(name: str, shape: tuple[int, int], step: int, reason: str, peak_value: float) -> LayerStats:
    return LayerStats(name, shape, math.nan, [], None, peak_value, True, reason, step)


def compute_refresh(
    weights: Mapping[str, Tensor],
    peaks: Mapping[str, ActivationPeak | None],
    config: S2DConfig,
    step: int,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, LayerRefresh]:
    """Refresh the given layers from their weights and activation peaks; touches no module.

    Args:
        weights: layer name -> (m, n) weight (read only).
        peaks: layer name -> largest-activation peak of the refresh step (missing/None = not captured).
        config: S2D hyperparameters.  step: optimizer step stamped into the stats.
    Returns:
        layer name -> :class:`LayerRefresh`.  Layers with a non-finite weight or activation, or (for
        ``selection="pcdr"``) no captured activation -- e.g. ``nn.MultiheadAttention.out_proj``, whose
        forward is never called -- are skipped (factors None, ``stats.skipped`` with a reason).
    """
    out: dict[str, LayerRefresh] = {}
    ready: list[str] = []
    for name, w in weights.items():
        shape = (int(w.shape[0]), int(w.shape[1]))
        peak = peaks.get(name)
        value = float(peak.max_abs) if peak is not None else math.nan
        reason = None
        if not bool(torch.isfinite(w).all()):
            reason = "non-finite weight"
        elif peak is not None and not (math.isfinite(value) and bool(torch.isfinite(peak.x).all())):
            reason = "non-finite activation"
        if reason is None:
            ready.append(name)
        else:
            out[name] = LayerRefresh(name, None, _nan_stats(name, shape, step, reason, value))
    for name, spectrum in zip(ready, _safe_spectra([weights[n] for n in ready], compute_dtype, config.threads)):
        out[name] = _refresh_layer(name, weights[name], spectrum, peaks.get(name), config, step)
    return out


def _safe_spectra(ws: list[Tensor], compute_dtype: torch.dtype | None,
                  threads: int | None) -> list[Spectrum | None]:
    try:
        return spectra(ws, compute_dtype=compute_dtype, threads=threads)
    except (RuntimeError, ValueError):  # eigensolver failure in a batch: retry layer by layer
        res: list[Spectrum | None] = []
        for w in ws:
            try:
                res.append(spectra([w], compute_dtype=compute_dtype, threads=threads)[0])
            except (RuntimeError, ValueError) as err:
                logger.warning("S2D: spectrum failed for a %s weight: %s", tuple(w.shape), err)
                res.append(None)
        return res


def _refresh_layer(name: str, w: Tensor, sv: Spectrum | None, peak: ActivationPeak | None,
                   config: S2DConfig, step: int) -> LayerRefresh:
    """PCDR selection and top-k factors of one layer whose spectrum ``sv`` is known (None: failed)."""
    shape = (int(w.shape[0]), int(w.shape[1]))
    value = float(peak.max_abs) if peak is not None else math.nan
    if sv is None:
        return LayerRefresh(name, None, _nan_stats(name, shape, step, "spectrum failed", value))
    pcdr: list[float] = []
    k: int | None = min(config.k_max, sv.rank)
    reason = None
    if peak is not None:
        curve = pcdr_curve(w, peak.x, int(peak.neuron), spectrum=sv)
        pcdr = [float(c) for c in curve[: config.k_max]]
        if config.selection == "pcdr":
            # PCDR_rank is 1 for any activation: only a proper subspace (k < rank) can single out an outlier
            k = select_rank(curve, config.tau, min(config.k_max, sv.rank - 1)) if sv.rank > 1 else None
    elif config.selection == "pcdr":
        k, reason = None, "no activation captured"
    factors = top_k(sv, k) if k is not None and config.active else None
    if factors is not None and config.update != "relative" and not _penalty_finite(factors, config, w.dtype):
        factors, k, reason = None, None, "penalty overflows the weight dtype"
    stats = LayerStats(name, shape, float(sv.S[0]), pcdr, k, value, reason is not None, reason, step)
    return LayerRefresh(name, factors, stats)


def log_refresh(results: Mapping[str, LayerRefresh], step: int, penalised: Mapping[str, int | None]) -> None:
    """Log one refresh: layers penalised (name -> k, after any guard), skipped, the worst max |a|."""
    skipped = [n for n, r in results.items() if r.stats.skipped]
    vals = [(r.stats.max_activation, n) for n, r in results.items() if not math.isnan(r.stats.max_activation)]
    worst = max(vals) if vals else (math.nan, "-")
    logger.info("S2D refresh @ step %d: %d/%d layers penalised, %d skipped, worst max|a| %.4g (%s)",
                step, len(penalised), len(results), len(skipped), worst[0], worst[1])
    logger.debug("S2D k_target per layer: %s; skipped: %s", dict(penalised), skipped)


def _penalty_finite(f: Spectrum, config: S2DConfig, dtype: torch.dtype) -> bool:
    """||G||_2 = strength·σ_1^power bounds every entry of G; it must fit the weight dtype."""
    bound = config.strength * float(f.S[0]) ** config.power
    return math.isfinite(bound) and bound < torch.finfo(dtype).max / 4


def find_targets(model: nn.Module, include: Include = None) -> dict[str, nn.Module]:
    """Modules S2D acts on: every nn.Linear (include=None) or the 2-D-weight modules ``include`` accepts.

    Modules whose weight does not require grad are left out; a weight shared by several modules is
    targeted once (under its first name).
    """
    seen: set[int] = set()
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or not w.requires_grad or id(w) in seen:
            continue
        if include is None:
            ok = isinstance(m, nn.Linear)
        elif callable(include):
            ok = bool(include(name, m))
        else:
            ok = any(fnmatch.fnmatchcase(name, p) for p in include)
        if ok:
            seen.add(id(w))
            out[name] = m
    return out
