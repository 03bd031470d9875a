"""S2D hyperparameters: :class:`S2DConfig` (paper section 4, Algorithm 1). Depends on nothing but torch."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["S2DConfig", "Include", "SELECTIONS", "UPDATES"]

# Which modules S2D targets: None = every nn.Linear; a predicate (name, module) -> bool; fnmatch patterns.
Include = Callable[[str, nn.Module], bool] | Sequence[str] | None
SELECTIONS = ("pcdr", "all")
UPDATES = ("coupled", "decoupled", "relative")


@dataclass(frozen=True)
class S2DConfig:
    """S2D hyperparameters; the defaults are the paper's (λ=5e-4, n=2, τ=0.95, K_max=3, every 100 steps).

    The penalty on a selected layer is G = strength · U_k diag(σ_k^power) V_kᵀ, the gradient of
    strength/(power+1) Σ_{r<=k} σ_r^(power+1) (``update`` "coupled" or "decoupled"). With
    ``update="relative"`` there is no λ: each selected σ_r loses ``fraction`` of its value per refresh
    interval, whatever the optimizer, the learning rate or the scale of σ (docs/s2d-modes.md).
    The guard fields apply only when a guard loss is attached (``SelectiveSpectralDecay(guard=...)``).
    """

    strength: float = 5e-4      # λ >= 0: scale of the penalty
    power: float = 2.0          # n > 0 (the paper: n > 1, warned otherwise): the penalty acts on σ^(n+1)
    tau: float = 0.95           # PCDR threshold in (0, 1]: k_target = smallest k with PCDR_k >= tau
    k_max: int = 3              # most singular directions penalised per layer, >= 1
    interval: int = 100         # optimizer steps between refreshes (spectrum + selection), >= 1
    selection: str = "pcdr"     # "pcdr" (paper) or "all" (ablation: top k_max of every layer)
    update: str = "coupled"     # "coupled": G added to the gradient; "decoupled": W -= lr·G after the step;
    #                             "relative": the selected σ_r shrink by `fraction` per interval (no lr, no λ)
    fraction: float = 0.5       # update="relative": share of each selected σ_r removed per refresh interval,
    #                             in (0, 1) (0.5: halved every interval while the layer stays selected)
    guard_tolerance: float = 0.02  # guard: largest rise of the guard loss (its units, e.g. nats) that one
    #                             layer's trial decay of one interval may cause before that layer backs off
    guard_backoffs: int = 2     # guard: halvings of a layer's fraction before its decay stops for good
    include: Include = None     # target modules (see ``Include``), over modules with a 2-D ``weight``
    async_lead: int = 0         # start each refresh but the first this many steps early, in the
    #                             background (0 = synchronous; 0 <= async_lead < interval)
    threads: int | None = 1     # CPU intra-op threads of the spectral pass (1: robust when other work
    #                             shares the cores, see s2d.spectral.spectra; None: the caller's)

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"S2DConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        if not _real(self.strength) or not (math.isfinite(self.strength) and self.strength >= 0):
            raise bad("strength", "a finite number >= 0")
        if not _real(self.power) or not (math.isfinite(self.power) and self.power > 0):
            raise bad("power", "a finite number > 0")
        if self.power <= 1:
            warnings.warn(f"S2DConfig.power={self.power}: the paper's Definition 1 needs n > 1 (the penalty "
                          "acts on sigma^(n+1)); n <= 1 decays the large singular values no faster than "
                          "the small ones", UserWarning, stacklevel=3)
        if not _real(self.tau) or not 0 < self.tau <= 1:
            raise bad("tau", "in (0, 1]")
        if not _int(self.k_max) or self.k_max < 1:
            raise bad("k_max", "an integer >= 1")
        if not _int(self.interval) or self.interval < 1:
            raise bad("interval", "an integer >= 1")
        if not _int(self.async_lead) or not 0 <= self.async_lead < self.interval:
            raise bad("async_lead", f"an integer in [0, interval={self.interval})")
        if self.threads is not None and (not _int(self.threads) or self.threads < 1):
            raise bad("threads", "None or an integer >= 1")
        if not _real(self.fraction) or not 0 < self.fraction < 1:
            raise bad("fraction", "in (0, 1)")
        if not _real(self.guard_tolerance) or not (math.isfinite(self.guard_tolerance) and self.guard_tolerance >= 0):
            raise bad("guard_tolerance", "a finite number >= 0")
        if not _int(self.guard_backoffs) or self.guard_backoffs < 0:
            raise bad("guard_backoffs", "an integer >= 0")
        if self.selection not in SELECTIONS:
            raise bad("selection", "one of 'pcdr', 'all'")
        if self.update not in UPDATES:
            raise bad("update", "one of 'coupled', 'decoupled', 'relative'")
        inc = self.include
        if isinstance(inc, str):
            object.__setattr__(self, "include", (inc,))
        elif inc is not None and not callable(inc):
            if not all(isinstance(p, str) for p in inc):
                raise bad("include", "None, a callable (name, module) -> bool, or a sequence of fnmatch patterns")
            object.__setattr__(self, "include", tuple(inc))

    @property
    def active(self) -> bool:
        """Whether a selected layer is decayed at all (strength > 0, or the relative update)."""
        return self.update == "relative" or self.strength > 0


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
