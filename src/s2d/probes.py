"""Outlier probes: activation statistics of chosen modules, joined with their weight spectra.

``capture_activations`` runs batches through a model with forward hooks and keeps, per module,
streaming statistics of its output (or input) values a: max |a|, Pearson kurtosis, p99/p99.9 of |a|
(exact in practice, see :func:`capture_activations`) and a uniform random sample of a for violin plots.  ``spectral_table`` adds σ_max, the PCDR curve of
each layer's largest |output| entry and k_target, computed by the same code as the S2D refresh.
``pair_alignments`` measures every (value -> output, up -> down) pair's alignment, Colinearity Decay's
quantity (:mod:`s2d.colinearity.penalty`), for any model, trained with CD or not.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2d.colinearity import PAIR_KINDS, alignment, alignment_ratio, top_alignment
from s2d.colinearity.penalty import effective_first, first_block
from s2d.models import colinearity_pairs, linear_roles
from s2d.regularizer import ActivationPeak, S2DConfig, compute_refresh
from s2d.regularizer.refresh import find_peak, reduce_peaks
from s2d.utils import eval_mode, real_tokens, to_device, token_mask

logger = logging.getLogger(__name__)

__all__ = ["ActivationStats", "LayerReport", "PeakLocation", "PairAlignment", "InputMoments", "capture_activations",
           "spectral_table", "peak_locations", "pair_alignments", "input_moments", "quantile_from_top"]

_TAIL = 0.02   # fraction of the largest |a| kept (2x what p99 needs, slack for later batches)


@dataclass
class ActivationStats:
    """Statistics of every value a of one module's output (or input) over all batches.

    max_abs: max |a|.  kurtosis: Pearson kurtosis E[(a-μ)^4]/σ^4 (3 for a Gaussian; not excess).
    p99, p999: 99th / 99.9th percentiles of |a| (exact, linear interpolation as ``torch.quantile``).
    count: number of values.  sample: up to ``sample_size`` values of a drawn uniformly without
    replacement (seeded), for violin plots.
    """

    name: str
    max_abs: float
    kurtosis: float
    p99: float
    p999: float
    count: int
    sample: list[float]


@dataclass
class LayerReport:
    """One row of the spectral table: weight spectrum, PCDR of the largest activation, outlier stats.

    pcdr: [PCDR_1..PCDR_k_max] of the largest |output| entry; k_target: smallest k <= k_max with
    PCDR_k >= tau (None = healthy); role: from :func:`s2d.models.linear_roles` ("linear" for a 2-D-weight
    module that is not an ``nn.Linear``).
    """

    name: str
    shape: tuple[int, int]
    sigma_max: float
    pcdr: list[float]
    k_target: int | None
    max_abs: float
    kurtosis: float
    p99: float
    p999: float
    role: str


@dataclass
class _Accumulator:
    """Streaming moments (Chan et al. merge), the top tail of |a|, and a priority-key reservoir."""

    sample_size: int
    generator: torch.Generator
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    max_abs: float = 0.0
    floor: float = -math.inf          # largest |a| ever dropped from the tail buffer
    top: Tensor = field(default_factory=lambda: torch.empty(0))
    keys: Tensor = field(default_factory=lambda: torch.empty(0))
    values: Tensor = field(default_factory=lambda: torch.empty(0))

    def update(self, a: Tensor) -> None:
        a = a.detach().reshape(-1).double().cpu()
        if a.numel() == 0:
            return
        self._moments(a)
        mag = a.abs()
        self.max_abs = max(self.max_abs, float(mag.max()))
        keep = min(math.ceil(_TAIL * self.n) + 2, self.n)
        merged = torch.cat([self.top.double(), mag]) if self.top.numel() else mag
        if merged.numel() > keep:
            part = merged.topk(keep + 1).values
            self.floor = max(self.floor, float(part[-1]))
            merged = part[:keep]
        self.top = merged.sort(descending=True).values
        if self.sample_size == 0:
            return
        keys = torch.rand(a.numel(), generator=self.generator, dtype=torch.float64)
        keys, values = torch.cat([self.keys, keys]), torch.cat([self.values.double(), a])
        if keys.numel() > self.sample_size:
            idx = keys.topk(self.sample_size, largest=False).indices
            keys, values = keys[idx], values[idx]
        self.keys, self.values = keys, values

    def _moments(self, a: Tensor) -> None:
        nb = a.numel()
        mb = float(a.mean())
        d = a - mb
        b2, b3, b4 = float(d.pow(2).sum()), float(d.pow(3).sum()), float(d.pow(4).sum())
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        a2, a3 = self.m2, self.m3
        self.m4 += b4 + delta**4 * na * nb * (na**2 - na * nb + nb**2) / n**3 \
            + 6 * delta**2 * (na**2 * b2 + nb**2 * a2) / n**2 + 4 * delta * (na * b3 - nb * a3) / n
        self.m3 += b3 + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * b2 - nb * a2) / n
        self.m2 += b2 + delta**2 * na * nb / n
        self.mean += delta * nb / n
        self.n = n

    def quantile(self, q: float) -> float:
        """Exact when the tail buffer provably holds the needed order statistics; else from the sample."""
        need = self.n - math.floor(q * (self.n - 1))      # how many of the largest values q needs
        if need <= self.top.numel() and float(self.top[need - 1]) >= self.floor:
            return quantile_from_top(self.top, self.n, q)
        if self.values.numel():
            logger.debug("p%g of |a| estimated from a %d-value sample", 100 * q, self.values.numel())
            return float(torch.quantile(self.values.abs(), q))
        return math.nan

    def result(self, name: str) -> ActivationStats:
        kurt = self.n * self.m4 / self.m2**2 if self.m2 > 0 else math.nan
        return ActivationStats(name, self.max_abs, kurt, self.quantile(0.99), self.quantile(0.999),
                               self.n, self.values.float().tolist())


def quantile_from_top(top: Tensor, n: int, q: float) -> float:
    """q-quantile (linear interpolation, as ``torch.quantile``) of n values given their largest ones, descending."""
    if n == 0:
        return math.nan
    pos = q * (n - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    hi = min(lo + 1, n - 1)
    a, b = n - 1 - lo, n - 1 - hi           # ascending index -> descending index
    if a >= top.numel():
        raise ValueError(f"quantile_from_top: need the top {a + 1} values, have {top.numel()}")
    return float(top[a] + frac * (top[b] - top[a]))


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _run(model: nn.Module, batches: Iterable, hooks: dict[str, nn.Module],
         make_hook: Callable[[str], Callable], progress: bool, desc: str, current: dict) -> None:
    """Run batches (dicts -> model(**batch), labels dropped) in eval mode, no grad, with forward hooks;
    ``current["mask"]`` holds the running batch's real-token mask (None for images / tensors)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    handles = [m.register_forward_hook(make_hook(name)) for name, m in hooks.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                if isinstance(batch, Mapping):
                    batch = to_device(batch, device, drop_labels=True)
                    current["mask"], current["batch"] = token_mask(batch), batch
                    model(**batch)
                else:
                    current["mask"], current["batch"] = None, None
                    model(batch.to(device))
    finally:
        for h in handles:
            h.remove()


def _capture(model: nn.Module, batches: Iterable, modules: Mapping[str, nn.Module] | None, where: str,
             sample_size: int, progress: bool, seed: int, peaks: dict[str, list[ActivationPeak]] | None = None,
             ) -> tuple[dict[str, ActivationStats], dict[str, nn.Module]]:
    """Statistics of ``modules``' outputs (or inputs); ``peaks`` also collects their activation peaks."""
    if where not in ("output", "input"):
        raise ValueError(f"capture_activations: where must be 'output' or 'input', got {where!r}")
    if sample_size < 0:
        raise ValueError(f"capture_activations: sample_size must be >= 0, got {sample_size}")
    modules = dict(_linear_modules(model) if modules is None else modules)
    gen = torch.Generator().manual_seed(seed)
    accs = {name: _Accumulator(sample_size, gen) for name in modules}
    current: dict = {"mask": None}

    def make(name):
        def hook(module, args, output):
            a = output if where == "output" else (args[0] if args else None)
            if isinstance(a, Tensor) and a.is_floating_point():
                accs[name].update(real_tokens(a, current["mask"]))     # padding positions left out
            w = getattr(module, "weight", None)
            if peaks is not None and isinstance(w, Tensor) and w.dim() == 2:
                p = find_peak(w.shape, args[0] if args else None, output, current["mask"])
                if p is not None:
                    peaks.setdefault(name, []).append(p)
        return hook

    _run(model, batches, modules, make, progress, "activations", current)
    return {name: acc.result(name) for name, acc in accs.items() if acc.n > 0}, modules


@dataclass
class InputMoments:
    """First and second moments of one module's inputs x (d_in,), over every token (padding excluded)."""
    n: int                     # input vectors seen
    mean: Tensor               # (d_in,) float64: E[x]
    second: Tensor             # (d_in, d_in) float64: E[x xᵀ]


def input_moments(model: nn.Module, batches: Iterable, modules: Mapping[str, nn.Module],
                  progress: bool = False) -> dict[str, InputMoments]:
    """E[x] and E[x xᵀ] of each module's first input over ``batches`` (one pass, float64 sums).

    Memory is d_in² float64 per module: pass one block's Linears at a time for a large model.
    """
    sums: dict[str, list] = {name: [0, None, None] for name in modules}
    current: dict = {"mask": None}

    def make(name):
        def hook(module, args, output):
            x = args[0] if args else None
            if not (isinstance(x, Tensor) and x.is_floating_point()):
                return
            x = real_tokens(x, current["mask"]).reshape(-1, x.shape[-1]).double()
            acc = sums[name]
            acc[0] += x.shape[0]
            acc[1] = x.sum(0) if acc[1] is None else acc[1] + x.sum(0)
            acc[2] = x.T @ x if acc[2] is None else acc[2].addmm_(x.T, x)
        return hook

    _run(model, batches, dict(modules), make, progress, "input moments", current)
    return {name: InputMoments(n, s1 / n, s2 / n) for name, (n, s1, s2) in sums.items() if n > 0}


def capture_activations(model: nn.Module, batches: Iterable[dict], modules: Mapping[str, nn.Module] | None = None,
                        where: str = "output", sample_size: int = 4096, progress: bool = True,
                        seed: int = 0) -> dict[str, ActivationStats]:
    """Activation statistics of ``modules`` (default: every nn.Linear) over ``batches``.

    Args:
        batches: dicts passed as ``model(**batch)`` ("labels" is dropped) or tensors passed as ``model(x)``.
        where: "output" (the module's output) or "input" (its first positional input).
        sample_size: size of the uniform sample kept per module for violin plots.
    Returns:
        module name -> :class:`ActivationStats` (modules that never produced a float tensor are absent).
    Percentiles: exact, from the largest 2% of |a| kept per module (8 bytes per kept value), whenever
    that buffer provably holds the needed order statistics (always for a stream whose batches are
    alike); otherwise (e.g. a few huge batches followed by many tiny ones) estimated from the sample
    (nan if ``sample_size`` is 0).
    The model runs in eval mode under ``torch.no_grad``; its train/eval flags are restored after.
    Text batches with a 2-D ``attention_mask``: padding positions are left out of every statistic.
    """
    stats, _ = _capture(model, batches, modules, where, sample_size, progress, seed)
    return stats


def spectral_table(model: nn.Module, batches: Iterable[dict], modules: Mapping[str, nn.Module] | None = None,
                   k_max: int = 3, tau: float = 0.95, progress: bool = True) -> list[LayerReport]:
    """Per 2-D-weight module: σ_max, PCDR_1..k_max of its largest |output| entry, k_target, outlier stats.

    PCDR and k_target come from :func:`s2d.regularizer.refresh.compute_refresh` (the S2D refresh code) on the largest
    |output| entry over all batches.  Values are nan (pcdr empty) where they cannot be computed, e.g. a
    module whose forward never ran or whose weight is non-finite.
    """
    cfg = S2DConfig(tau=tau, k_max=k_max)
    peaks: dict[str, list[ActivationPeak]] = {}
    stats, modules = _capture(model, batches, modules, "output", 4096, progress, 0, peaks)
    weights = {n: m.weight.detach() for n, m in modules.items()
               if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2}
    refreshed = compute_refresh(weights, {n: reduce_peaks(peaks.get(n, [])) for n in weights}, cfg, step=0)
    roles = linear_roles(model)
    rows = []
    for name in weights:
        r, a = refreshed[name].stats, stats.get(name)
        rows.append(LayerReport(
            name=name, shape=r.shape, sigma_max=r.sigma_max, pcdr=r.pcdr, k_target=r.k_target,
            max_abs=a.max_abs if a else math.nan, kurtosis=a.kurtosis if a else math.nan,
            p99=a.p99 if a else math.nan, p999=a.p999 if a else math.nan, role=roles.get(name, "linear")))
    return rows


@dataclass
class PeakLocation:
    """Where a module's largest |output| sits in the probe batches (the "massive activation")."""
    name: str                  # module name
    max_abs: float             # |a| of the entry
    batch: int                 # index of the batch
    example: int               # row in that batch
    token: int | None          # sequence position (None for a (B, C) output)
    channel: int               # output feature
    token_id: int | None       # the input id at that position (text batches with input_ids)


def peak_locations(model: nn.Module, batches: Iterable[dict], modules: Mapping[str, nn.Module] | None = None,
                   progress: bool = True) -> dict[str, PeakLocation]:
    """For each module (default: every nn.Linear), the position of its largest |output| entry over
    ``batches``: batch, example, token, channel and input id. Padding positions are left out."""
    modules = dict(_linear_modules(model) if modules is None else modules)
    found: dict[str, PeakLocation] = {}
    current: dict = {"mask": None, "batch": None, "index": -1}

    def make(name):
        def hook(module, args, output):
            if not (isinstance(output, Tensor) and output.is_floating_point() and output.dim() in (2, 3)):
                return
            a = output.detach().abs().float()
            if a.dim() == 3 and current["mask"] is not None and tuple(current["mask"].shape) == tuple(a.shape[:2]):
                a = a.masked_fill(~current["mask"][..., None].to(a.device), -1.0)
            flat = int(a.argmax())
            value = float(a.reshape(-1)[flat])
            if name in found and found[name].max_abs >= value:
                return
            *pos, channel = torch.unravel_index(torch.tensor(flat), a.shape)
            ids = (current["batch"] or {}).get("input_ids")
            token = int(pos[1]) if a.dim() == 3 else None
            token_id = int(ids[int(pos[0]), token]) if token is not None and isinstance(ids, Tensor) else None
            found[name] = PeakLocation(name, value, current["index"], int(pos[0]), token, int(channel), token_id)
        return hook

    def counted(items):
        for i, b in enumerate(items):
            current["index"] = i
            yield b

    _run(model, counted(batches), modules, make, progress, "peaks", current)
    return found


@dataclass
class PairAlignment:
    """One ordered pair of a block (``s2d.models.colinearity_pairs``): how aligned it is, and its gains."""
    first: str                 # the Linear applied first (attention value, FFN up)
    second: str                # the Linear applied second (attention output, FFN down)
    kind: str                  # "attn" or "ffn"
    alignment: float           # R·d_mid (s2d.colinearity.alignment_ratio): 1 = chance orientation
    top_alignment: float       # ‖BA‖₂ / (‖A‖₂‖B‖₂) in [0, 1]: 1 = the two top directions aligned
    sigma_first: float         # σ_max of the first weight (its rows that feed the second)
    sigma_second: float        # σ_max of the second weight


def pair_alignments(model: nn.Module, kinds: tuple[str, ...] = PAIR_KINDS) -> list[PairAlignment]:
    """Alignment and σ_max of every pair of the model's block layout (empty when no layout matches)."""
    modules = dict(model.named_modules())
    out = []
    for p in colinearity_pairs(model, kinds):
        block = first_block(modules[p.first].weight.detach().float(), p)
        b = modules[p.second].weight.detach().float()
        a = effective_first(block, p)
        if b.shape[1] != a.shape[0]:     # a layout this rule does not know: report, never fail the run
            logger.warning("pair_alignments: %s feeds %d values but %s reads %d; skipped", p.first, a.shape[0],
                           p.second, b.shape[1])
            continue
        out.append(PairAlignment(p.first, p.second, p.kind, alignment_ratio(alignment(a, b), b.shape[1]),
                                 top_alignment(a, b), float(torch.linalg.matrix_norm(block, ord=2)),
                                 float(torch.linalg.matrix_norm(b, ord=2))))
    return out
