"""Selective Spectral Decay (paper section 4, Algorithm 1) as optimizer hooks.

Every ``interval`` optimizer steps (the first at step 0) each target layer is *refreshed*: its spectrum
is computed, the PCDR curve of the layer's largest |output| entry on that step's forward pass(es) is
evaluated, and k_target = the smallest k <= k_max with PCDR_k >= tau is chosen (``selection="all"``:
k = k_max for every layer).  Only the top-k factors U_k, σ_k, V_k are cached.  At every optimizer step
the penalty G = strength · U_k diag(σ_k^power) V_kᵀ  (= ∂/∂W strength/(power+1) Σ_{r<=k} σ_r^(power+1))
is applied:

* ``update="coupled"``: G is added to the weight's gradient in a step *pre*-hook (the optimizer's own
  normalisation, e.g. AdamW's, applies to it);
* ``update="decoupled"``: the weight moves by -lr_group · G in a step *post*-hook.

``async_lead=L > 0`` starts every refresh but the first ``L`` steps before it is due: the weights and
activation peaks of that step are snapshot on the training thread, the spectral work runs on a worker
thread (a side CUDA stream on GPU) while training goes on, and the factors are installed at the due
step (they are ``L`` steps stale; paper appendix G.2).  Under ``torch.distributed`` every rank
decomposes only its share of the layers and the factors are broadcast (:mod:`s2d.distributed`); all
collectives run on the training thread, in the same order on every rank.  Under
``optimizer.step(closure)`` the closure is wrapped, so the refresh and the penalty follow the
forward/backward pass it runs.

Step bookkeeping: the step counter advances in the post-hook, so a step that never runs (a GradScaler
skipping an inf/NaN step never calls ``optimizer.step``) neither advances S2D nor consumes a refresh;
the refresh runs in the pre-hook of the next step that does run, on the pre-update weights.
A weight whose ``.grad`` is None at step time is left alone: the optimizer does not update it, and S2D
does not penalise it either (no gradient is invented for it).

The refresh is split into a pure function, :func:`compute_refresh` (weights + activation peaks ->
factors and stats for a given list of layers), and :meth:`SelectiveSpectralDecay.install`, so the
spectral work can be sharded across ranks (each computes a share, factors are broadcast, every rank
installs) or run asynchronously a few steps early.

Depends on torch only.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from s2d.distributed import BackgroundTask, ShardedRefresh, add_low_rank_
from s2d.spectral import Spectrum, pcdr_curve, select_rank, spectra, top_k

logger = logging.getLogger(__name__)

__all__ = [
    "S2DConfig", "LayerStats", "ActivationPeak", "LayerRefresh", "SelectiveSpectralDecay",
    "compute_refresh", "find_peak", "find_targets", "reduce_peaks",
]

Include = Callable[[str, nn.Module], bool] | Sequence[str] | None


@dataclass(frozen=True)
class S2DConfig:
    """S2D hyperparameters (paper defaults: λ=5e-4, n=2, τ=0.95, K_max=3, refresh every 100 steps).

    strength: λ >= 0.  power: n > 0 (the penalty acts on σ^(n+1)).  tau: PCDR threshold in (0, 1].
    k_max: max components penalised per layer, >= 1.  interval: optimizer steps between refreshes, >= 1.
    selection: "pcdr" (paper) or "all" (ablation: top k_max of every layer).  update: "coupled" (add G to
    the gradient) or "decoupled" (W -= lr·G after the step).  include: None = every nn.Linear; a callable
    (name, module) -> bool or a sequence of fnmatch patterns on module names, over modules with a 2-D
    ``weight`` parameter.  async_lead: start each refresh but the first this many steps early, in the
    background (0 = synchronous; 0 <= async_lead < interval).
    """

    strength: float = 5e-4
    power: float = 2.0
    tau: float = 0.95
    k_max: int = 3
    interval: int = 100
    selection: str = "pcdr"
    update: str = "coupled"
    include: Include = None
    async_lead: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"S2DConfig.{field} must be {allowed}, got {getattr(self, field)!r}")

        if not _real(self.strength) or not (math.isfinite(self.strength) and self.strength >= 0):
            raise bad("strength", "a finite number >= 0")
        if not _real(self.power) or not (math.isfinite(self.power) and self.power > 0):
            raise bad("power", "a finite number > 0")
        if not _real(self.tau) or not 0 < self.tau <= 1:
            raise bad("tau", "in (0, 1]")
        if not _int(self.k_max) or self.k_max < 1:
            raise bad("k_max", "an integer >= 1")
        if not _int(self.interval) or self.interval < 1:
            raise bad("interval", "an integer >= 1")
        if not _int(self.async_lead) or not 0 <= self.async_lead < self.interval:
            raise bad("async_lead", f"an integer in [0, interval={self.interval})")
        if self.selection not in ("pcdr", "all"):
            raise bad("selection", "one of 'pcdr', 'all'")
        if self.update not in ("coupled", "decoupled"):
            raise bad("update", "one of 'coupled', 'decoupled'")
        inc = self.include
        if isinstance(inc, str):
            object.__setattr__(self, "include", (inc,))
        elif inc is not None and not callable(inc):
            if not all(isinstance(p, str) for p in inc):
                raise bad("include", "None, a callable (name, module) -> bool, or a sequence of fnmatch patterns")
            object.__setattr__(self, "include", tuple(inc))


def _real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class LayerStats:
    """What the last refresh found for one layer (JSON-serialisable via ``dataclasses.asdict``).

    sigma_max: largest singular value (nan for a non-finite weight).  pcdr: [PCDR_1..PCDR_k_max] of the
    largest activation (empty when none was captured).  k_target: components penalised until the next refresh
    (None = healthy / skipped).  max_activation: largest |output| seen on the refresh step (nan when none).
    reason: why the layer was skipped.  refreshed_at: optimizer step of that refresh.
    """

    name: str
    shape: tuple[int, int]
    sigma_max: float
    pcdr: list[float]
    k_target: int | None
    max_activation: float
    skipped: bool
    reason: str | None
    refreshed_at: int


@dataclass
class ActivationPeak:
    """The largest |output| entry of a layer: its value, input row x_j (n,) and neuron i (0-d tensors)."""

    max_abs: Tensor
    x: Tensor
    neuron: Tensor


@dataclass
class LayerRefresh:
    """Result of refreshing one layer: the factors to penalise (None = no penalty) and its stats."""

    name: str
    factors: Spectrum | None
    stats: LayerStats


def find_peak(weight_shape: Sequence[int], x: object, output: object) -> ActivationPeak | None:
    """The largest |output| entry of one forward call of a layer with an (m, n) weight, without a sync.

    x: the layer input (..., n); output: (..., m).  Returns None when they are not tensors of matching
    shapes (e.g. integer inputs, or a module whose forward is not W x).  NaN/Inf propagate to the max.
    """
    m, n = int(weight_shape[0]), int(weight_shape[1])
    if not (isinstance(x, Tensor) and isinstance(output, Tensor) and x.is_floating_point()
            and x.shape[-1] == n and output.shape[-1] == m and output.numel() > 0
            and x.numel() // n == output.numel() // m):
        return None
    with torch.no_grad():
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
    for name, spec in zip(ready, _safe_spectra([weights[n] for n in ready], compute_dtype)):
        out[name] = _refresh_layer(name, weights[name], spec, peaks.get(name), config, step)
    return out


def _safe_spectra(ws: list[Tensor], compute_dtype: torch.dtype | None) -> list[Spectrum | None]:
    try:
        return spectra(ws, compute_dtype=compute_dtype)
    except (RuntimeError, ValueError):  # eigensolver failure in a batch: retry layer by layer
        res: list[Spectrum | None] = []
        for w in ws:
            try:
                res.append(spectra([w], compute_dtype=compute_dtype)[0])
            except (RuntimeError, ValueError) as err:
                logger.warning("S2D: spectrum failed for a %s weight: %s", tuple(w.shape), err)
                res.append(None)
        return res


def _refresh_layer(name: str, w: Tensor, spec: Spectrum | None, peak: ActivationPeak | None,
                   config: S2DConfig, step: int) -> LayerRefresh:
    shape = (int(w.shape[0]), int(w.shape[1]))
    value = float(peak.max_abs) if peak is not None else math.nan
    if spec is None:
        return LayerRefresh(name, None, _nan_stats(name, shape, step, "spectrum failed", value))
    pcdr: list[float] = []
    k: int | None = min(config.k_max, spec.rank)
    reason = None
    if peak is not None:
        curve = pcdr_curve(w, peak.x, int(peak.neuron), spec=spec)
        pcdr = [float(c) for c in curve[: config.k_max]]
        if config.selection == "pcdr":
            # PCDR_rank is 1 for any activation: only a proper subspace (k < rank) can single out an outlier
            k = select_rank(curve, config.tau, min(config.k_max, spec.rank - 1)) if spec.rank > 1 else None
    elif config.selection == "pcdr":
        k, reason = None, "no activation captured"
    factors = top_k(spec, k) if k is not None and config.strength > 0 else None
    if factors is not None and not _penalty_finite(factors, config, w.dtype):
        factors, k, reason = None, None, "penalty overflows the weight dtype"
    stats = LayerStats(name, shape, float(spec.S[0]), pcdr, k, value, reason is not None, reason, step)
    return LayerRefresh(name, factors, stats)


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


class SelectiveSpectralDecay:
    """Attach S2D to ``model`` trained by ``optimizer``; the training loop stays unchanged.

    Attributes:
        step: optimizer steps seen (steps that actually ran).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: S2DConfig = S2DConfig()) -> None:
        self.config = config
        self.optimizer = optimizer
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.targets: dict[str, nn.Module] = {}
        for name, m in find_targets(model, config.include).items():
            if id(m.weight) in groups:
                self.targets[name] = m
            else:
                logger.warning("S2D: %s.weight is not in the optimizer; not a target", name)
        self._groups = {name: groups[id(m.weight)] for name, m in self.targets.items()}
        self.step = 0
        self._armed = True          # step 0 is a refresh step
        self._force = False
        self._peaks: dict[str, list[ActivationPeak]] = {}
        self._factors: dict[str, Spectrum] = {}
        self._penalty: dict[str, tuple[Tensor, Tensor]] = {}   # (U_k·strength·σ_k^power, V_k) in weight dtype
        self._stats: dict[str, LayerStats] = {}
        first = next(iter(self.targets.values()), None)
        self._task = BackgroundTask(first.weight.device if first is not None else "cpu")
        self._pending_plan: ShardedRefresh | None = None
        self._handles = [m.register_forward_hook(self._make_hook(name)) for name, m in self.targets.items()]
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        logger.info("S2D attached to %d layers (%s)", len(self.targets), config)

    # ------------------------------------------------------------------ capture
    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self._armed or not torch.is_grad_enabled():
                return
            peak = find_peak(module.weight.shape, args[0] if args else None, output)
            if peak is not None:
                self._peaks.setdefault(name, []).append(peak)
        return hook

    # ------------------------------------------------------------------ refresh
    def refresh_now(self) -> None:
        """Force a synchronous refresh at the next optimizer step (activations from the forwards before
        it); a pending early (async) refresh is discarded."""
        self._force = True
        self._armed = True

    def gather_peaks(self) -> dict[str, ActivationPeak | None]:
        """Per target, the largest activation captured since the last refresh (None if none)."""
        return {name: reduce_peaks(self._peaks.get(name, [])) for name in self.targets}

    def install(self, results: Mapping[str, LayerRefresh]) -> None:
        """Make ``results`` the cached factors/stats of their layers (others keep theirs)."""
        for name, res in results.items():
            self._stats[name] = res.stats
            self._factors.pop(name, None)
            self._penalty.pop(name, None)
            if res.factors is not None:
                self._set_factors(name, res.factors)
        self._log_refresh(results)

    def _set_factors(self, name: str, f: Spectrum) -> None:
        w = self.targets[name].weight
        self._factors[name] = f
        scale = self.config.strength * f.S.double().pow(self.config.power)
        left = (f.U.double() * scale).to(device=w.device, dtype=w.dtype)
        self._penalty[name] = (left, f.V.to(device=w.device, dtype=w.dtype))

    def _plan(self) -> ShardedRefresh:
        """Which rank decomposes which layer (everything on this process when not distributed)."""
        return ShardedRefresh(list(self.targets), [tuple(m.weight.shape) for m in self.targets.values()])

    def _snapshot(self, clone: bool) -> tuple[ShardedRefresh, dict[str, Tensor], dict[str, ActivationPeak | None]]:
        plan = self._plan()
        weights, peaks = plan.snapshot({n: m.weight for n, m in self.targets.items()}, self.gather_peaks(),
                                       clone=clone)
        self._peaks.clear()
        return plan, weights, peaks

    def _refresh_sync(self) -> None:
        plan, weights, peaks = self._snapshot(clone=False)
        self.install(plan.share(compute_refresh(weights, peaks, self.config, self.step)))

    def _start_async(self) -> None:
        plan, weights, peaks = self._snapshot(clone=True)
        self._pending_plan = plan
        self._task.submit(compute_refresh, weights, peaks, self.config, self.step)

    def _finish_async(self) -> None:
        plan, self._pending_plan = self._pending_plan, None
        self.install(plan.share(self._task.result()))

    def _is_start(self, step: int) -> bool:
        lead = self.config.async_lead
        return lead > 0 and step > 0 and (step + lead) % self.config.interval == 0

    def _schedule(self) -> None:
        """Run the refresh work due at this step (before the update)."""
        due = self.step % self.config.interval == 0
        if self._force:
            if self._task.pending:
                self._task.result()      # discarded: the forced refresh supersedes it
                self._pending_plan = None
            self._refresh_sync()
            self._force = False
        elif due and self._task.pending:
            self._finish_async()
        elif due:
            self._refresh_sync()
        elif self._is_start(self.step):
            self._start_async()
        self._peaks.clear()

    def _log_refresh(self, results: Mapping[str, LayerRefresh]) -> None:
        picked = {n: r.stats.k_target for n, r in results.items() if r.factors is not None}
        skipped = [n for n, r in results.items() if r.stats.skipped]
        vals = [(r.stats.max_activation, n) for n, r in results.items() if not math.isnan(r.stats.max_activation)]
        worst = max(vals) if vals else (math.nan, "-")
        logger.info("S2D refresh @ step %d: %d/%d layers penalised, %d skipped, worst max|a| %.4g (%s)",
                    self.step, len(picked), len(results), len(skipped), worst[0], worst[1])
        logger.debug("S2D k_target per layer: %s; skipped: %s", picked, skipped)

    # ------------------------------------------------------------------ optimizer hooks
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
        # args = (optimizer, *step_args): a closure is step's first argument, or the keyword
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):  # forward/backward run inside step(): act after them
            wrapped = self._wrap_closure(closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self._before_update()
        return None

    def _wrap_closure(self, closure: Callable) -> Callable:
        calls = 0

        def wrapped():  # LBFGS-style optimizers may call it several times: refresh once, penalise each time
            nonlocal calls
            loss = closure()
            if calls == 0:
                self._schedule()
                self._armed = False
            calls += 1
            self._add_coupled_penalty()
            return loss
        return wrapped

    def _before_update(self) -> None:
        self._schedule()
        self._armed = False
        self._add_coupled_penalty()

    def _add_coupled_penalty(self) -> None:
        if self.config.update != "coupled":
            return
        with torch.no_grad():
            for name, (left, v) in self._penalty.items():
                g = self.targets[name].weight.grad
                if g is not None:
                    add_low_rank_(g, left, v)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self.config.update == "decoupled":
            with torch.no_grad():
                for name, (left, v) in self._penalty.items():
                    w = self.targets[name].weight
                    lr = float(self._groups[name]["lr"])
                    if w.grad is not None and lr != 0.0:
                        add_low_rank_(w, left, v, alpha=-lr)
        self.step += 1
        due = self.step % self.config.interval == 0
        self._armed = self._force or (due and not self._task.pending) or self._is_start(self.step)

    # ------------------------------------------------------------------ inspection / persistence
    def layer_stats(self) -> list[LayerStats]:
        """Stats of every target layer refreshed so far, in module order."""
        return [self._stats[n] for n in self.targets if n in self._stats]

    def factors(self) -> dict[str, Spectrum]:
        """The cached top-k factors of the penalised layers (name -> Spectrum with k columns)."""
        return dict(self._factors)

    def state_dict(self) -> dict:
        """Everything needed to resume: step, schedule flags, cached factors, stats, pending peaks.

        A pending early (async) refresh is not saved: a run resumed before its due step refreshes
        synchronously at the due step instead (so with ``async_lead > 0`` the resumed factors are fresh,
        not ``async_lead`` steps stale).
        """
        cfg = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "include"}
        return {
            "step": self.step, "armed": self._armed, "force": self._force, "config": cfg,
            "factors": {n: {"U": f.U.clone(), "S": f.S.clone(), "V": f.V.clone()} for n, f in self._factors.items()},
            "stats": {n: asdict(s) for n, s in self._stats.items()},
            "peaks": {n: [{"max_abs": p.max_abs.clone(), "x": p.x.clone(), "neuron": p.neuron.clone()} for p in ps]
                      for n, ps in self._peaks.items()},
        }

    def load_state_dict(self, sd: Mapping) -> None:
        """Restore a :meth:`state_dict`; layers unknown to this model are ignored with a warning."""
        unknown = (set(sd["factors"]) | set(sd["stats"])) - set(self.targets)
        if unknown:
            logger.warning("S2D load_state_dict: ignoring unknown layers %s", sorted(unknown))
        self.step = int(sd["step"])
        self._armed, self._force = bool(sd["armed"]), bool(sd["force"])
        self._factors.clear()
        self._penalty.clear()
        for n, f in sd["factors"].items():
            if n in self.targets:
                self._set_factors(n, Spectrum(U=f["U"], S=f["S"], V=f["V"]))
        self._stats = {n: LayerStats(**{**s, "shape": tuple(s["shape"])}) for n, s in sd["stats"].items()
                       if n in self.targets}
        self._peaks = {n: [ActivationPeak(p["max_abs"], p["x"], p["neuron"]) for p in ps]
                       for n, ps in sd.get("peaks", {}).items() if n in self.targets}
        if self.config.async_lead and self.step % self.config.interval == 0:
            self._armed = True   # the early refresh for this step was not saved: redo it synchronously

    def remove(self) -> None:
        """Detach every hook and drop the cached factors; the model and optimizer are left as they are."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._task.pending:
            self._task.result()
            self._pending_plan = None
        self._factors.clear()
        self._penalty.clear()
        self._peaks.clear()
