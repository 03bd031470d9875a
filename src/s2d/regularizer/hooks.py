"""Selective Spectral Decay (paper section 4, Algorithm 1) as optimizer hooks: :class:`SelectiveSpectralDecay`.

Every ``interval`` optimizer steps (the first at step 0) each target layer is *refreshed*
(:mod:`s2d.regularizer.refresh`) and its top-k factors U_k, σ_k, V_k are cached.  At every optimizer step
the penalty G = strength · U_k diag(σ_k^power) V_kᵀ  (= ∂/∂W strength/(power+1) Σ_{r<=k} σ_r^(power+1))
is applied:

* ``update="coupled"``: G is added to the weight's gradient in a step *pre*-hook (the optimizer's own
  normalisation, e.g. AdamW's, applies to it);
* ``update="decoupled"``: the weight moves by -lr_group · G in a step *post*-hook;
* ``update="relative"``: no G; in the post-hook each selected direction loses the share c of its current
  weight that removes ``fraction`` of σ_r per interval (:mod:`s2d.regularizer.relative`). An optional
  guard loss (:mod:`s2d.regularizer.guard`) reviews every refresh and backs off, then stops, a layer
  whose decay raises it.

``async_lead=L > 0`` starts every refresh but the first ``L`` steps before it is due: the weights and
activation peaks of that step are snapshot on the training thread, the spectral work runs on a worker
thread (a side CUDA stream on GPU) while training goes on, and the factors are installed at the due
step (they are ``L`` steps stale; paper appendix G.2).  Under ``torch.distributed`` every rank
decomposes only its share of the layers and the factors are broadcast; all
collectives run on the training thread, in the same order on every rank (:mod:`s2d.regularizer.sharding`).  Under
``optimizer.step(closure)`` the closure is wrapped, so the refresh and the penalty follow the
forward/backward pass it runs.

Step bookkeeping: the step counter advances in the post-hook, so a step that never runs (a GradScaler
skipping an inf/NaN step never calls ``optimizer.step``) neither advances S2D nor consumes a refresh;
the refresh runs in the pre-hook of the next step that does run, on the pre-update weights.
A weight whose ``.grad`` is None at step time is left alone: the optimizer does not update it, and S2D
does not penalise it either (no gradient is invented for it).

The refresh is a pure function (:func:`~s2d.regularizer.refresh.compute_refresh`) and
:meth:`SelectiveSpectralDecay.install` makes its result current, so the spectral work can be sharded
across ranks (each computes a share, factors are broadcast, every rank installs) or run
asynchronously a few steps early.

Depends on torch only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, replace

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from s2d.regularizer.config import S2DConfig
from s2d.regularizer.guard import DecayGuard
from s2d.regularizer.refresh import (
    ActivationPeak, LayerRefresh, LayerStats, compute_refresh, find_peak, find_targets, log_refresh, reduce_peaks,
)
from s2d.regularizer.relative import per_step_rate, relative_decay_
from s2d.regularizer.sharding import ShardedRefresh, add_low_rank_
from s2d.regularizer.worker import BackgroundTask
from s2d.spectral import Spectrum
from s2d.utils import token_mask

logger = logging.getLogger(__name__)

__all__ = ["SelectiveSpectralDecay"]


class SelectiveSpectralDecay:
    """Attach S2D to ``model`` trained by ``optimizer``; the training loop stays unchanged.

    guard: with ``update="relative"``, a function returning a held-out loss of the current model
    (called without gradients, e.g. the task loss on a fixed validation batch); every refresh then
    tries each selected layer's decay against it (:class:`~s2d.regularizer.guard.DecayGuard`).

    Attributes:
        step: optimizer steps seen (steps that actually ran).
        guard: the :class:`DecayGuard` (None without a guard loss).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: S2DConfig = S2DConfig(), guard: Callable[[], float] | None = None) -> None:
        if guard is not None and config.update != "relative":
            raise ValueError(f"SelectiveSpectralDecay: guard needs S2DConfig.update='relative', got {config.update!r}")
        self.config = config
        self.guard = DecayGuard(guard, config.guard_tolerance, config.guard_backoffs) if guard else None
        self.optimizer = optimizer
        groups = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.targets: dict[str, nn.Module] = {}
        for name, m in find_targets(model, config.include).items():
            if id(m.weight) in groups:
                self.targets[name] = m
            else:
                logger.warning("S2D: %s.weight is not in the optimizer; not a target", name)
        # param-group *indices*: optimizer.load_state_dict replaces the group dicts (and their "lr")
        self._groups = {name: groups[id(m.weight)] for name, m in self.targets.items()}
        self.step = 0
        self._armed = True          # step 0 is a refresh step
        self._force = False
        self._peaks: dict[str, list[ActivationPeak]] = {}
        self._factors: dict[str, Spectrum] = {}
        self._penalty: dict[str, tuple[Tensor, Tensor]] = {}   # (U_k·strength·σ_k^power, V_k) in weight dtype;
        #                                                        relative: (U_k, V_k)
        self._rates: dict[str, float] = {}    # relative: per-step shrink of each penalised layer
        self._stats: dict[str, LayerStats] = {}
        first = next(iter(self.targets.values()), None)
        self._task = BackgroundTask(first.weight.device if first is not None else "cpu")
        self._pending_plan: ShardedRefresh | None = None
        self._mask: Tensor | None = None       # real tokens of the current text batch (padding excluded)
        self._warned: set[str] = set()          # layers already reported non-finite
        self._handles = [m.register_forward_hook(self._make_hook(name)) for name, m in self.targets.items()]
        self._handles.append(model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))
        logger.info("S2D attached to %d layers (%s)", len(self.targets), config)

    # ------------------------------------------------------------------ capture
    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._armed and torch.is_grad_enabled():
            self._mask = token_mask(kwargs)

    def _make_hook(self, name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not self._armed or not torch.is_grad_enabled():
                return
            if module.weight.grad is None and self._peaks.get(name):
                # gradients were reset since these peaks were recorded, yet no optimizer step ran in
                # between: that step was skipped (a GradScaler overflow), so its peaks are stale
                self._peaks[name].clear()
            peak = find_peak(module.weight.shape, args[0] if args else None, output, self._mask)
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
            self._forget(name)
            if res.factors is not None:
                self._set_factors(name, res.factors)
            if res.stats.reason and res.stats.reason.startswith("non-finite"):
                self._warn_nonfinite(name, res.stats.reason)
        if self.guard is not None:
            self._review(results)
        log_refresh(results, self.step, {n: self._stats[n].k_target for n in results if n in self._penalty})

    def _review(self, results: Mapping[str, LayerRefresh]) -> None:
        """The guard tries the new factors; stopped layers lose them, backed-off layers decay slower."""
        names = [n for n in results if n in self._penalty]
        self.guard.review({n: self.targets[n].weight for n in names}, {n: self._penalty[n] for n in names},
                          self.config.fraction, self.step)
        for name in names:
            if name in self.guard.stopped:
                self._forget(name)
                self._stats[name] = replace(self._stats[name], k_target=None, reason=(
                    f"guard: one interval of decay raised the guard loss by {self.guard.stopped[name]:.4g}"))
            else:
                self._rates[name] = self._rate(name)

    def _forget(self, name: str) -> None:
        self._factors.pop(name, None)
        self._penalty.pop(name, None)

    def _rate(self, name: str) -> float:
        scale = self.guard.scale(name) if self.guard is not None else 1.0
        return per_step_rate(self.config.fraction * scale, self.config.interval)

    def _warn_nonfinite(self, name: str, reason: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("S2D: %s has a %s at step %d; it gets no penalty until a refresh finds it finite "
                           "(warned once per layer)", name, reason, self.step)

    def _drop_nonfinite(self) -> None:
        """Drop the cached penalty of every penalised layer whose weight is no longer finite.

        Only the weights are read: a non-finite gradient makes the weight non-finite at this step's
        update, so the next step drops the layer; reading the gradients too doubled the cost, which is
        one pass over the penalised weights per step (``benchmarks/bench_overhead.py --selection all``).

        One device sync per step, and only while some layer is penalised. FSDP2-sharded weights are
        left to the next refresh (each rank would see only its own shard).
        """
        names = [n for n in self._penalty if not isinstance(self.targets[n].weight, DTensor)]
        if not names:
            return
        with torch.no_grad():
            ok = torch.stack([torch.isfinite(self.targets[n].weight).all() for n in names])
        for name, fine in zip(names, ok.tolist()):
            if not fine:
                self._forget(name)
                stats = self._stats.get(name)
                if stats is not None:
                    self._stats[name] = replace(stats, k_target=None, skipped=True,
                                                reason="non-finite weight")
                self._warn_nonfinite(name, "non-finite weight")

    def _set_factors(self, name: str, f: Spectrum) -> None:
        w = self.targets[name].weight
        self._factors[name] = f
        if self.config.update == "relative":
            self._penalty[name] = (f.U.to(device=w.device, dtype=w.dtype), f.V.to(device=w.device, dtype=w.dtype))
            self._rates[name] = self._rate(name)
            return
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

    def _wrap_closure(self, closure: Callable[[], object]) -> Callable[[], object]:
        calls = 0

        def wrapped():  # LBFGS-style optimizers may call it several times: refresh once, penalise each time
            nonlocal calls
            loss = closure()
            if calls == 0:
                self._schedule()
                self._armed = False
                self._drop_nonfinite()
            calls += 1
            self._add_coupled_penalty()
            return loss
        return wrapped

    def _before_update(self) -> None:
        self._schedule()
        self._armed = False
        self._drop_nonfinite()
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
        if self.config.update == "relative":
            for name, (u, v) in self._penalty.items():
                w = self.targets[name].weight
                if w.grad is not None:
                    relative_decay_(w, u, v, self._rates[name])
        elif self.config.update == "decoupled":
            with torch.no_grad():
                for name, (left, v) in self._penalty.items():
                    w = self.targets[name].weight
                    lr = float(self.optimizer.param_groups[self._groups[name]]["lr"])
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
            "guard": self.guard.state_dict() if self.guard is not None else None,
        }

    def load_state_dict(self, sd: Mapping, strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; layers unknown to this model are ignored with a warning.

        A state saved under another config (strength, interval, ...) is refused with a ValueError, or,
        with ``strict=False``, loaded with a warning.
        """
        self._check_config(sd.get("config") or {}, strict)
        unknown = (set(sd["factors"]) | set(sd["stats"])) - set(self.targets)
        if unknown:
            logger.warning("S2D load_state_dict: ignoring unknown layers %s", sorted(unknown))
        self.step = int(sd["step"])
        self._armed, self._force = bool(sd["armed"]), bool(sd["force"])
        self._factors.clear()
        self._penalty.clear()
        if self.guard is not None and sd.get("guard"):
            self.guard.load_state_dict(sd["guard"])
        for n, f in sd["factors"].items():
            if n in self.targets:
                self._set_factors(n, Spectrum(U=f["U"], S=f["S"], V=f["V"]))
        self._stats = {n: LayerStats(**{**s, "shape": tuple(s["shape"])}) for n, s in sd["stats"].items()
                       if n in self.targets}
        self._peaks = {n: [ActivationPeak(p["max_abs"], p["x"], p["neuron"]) for p in ps]
                       for n, ps in sd.get("peaks", {}).items() if n in self.targets}
        if self.config.async_lead and self.step % self.config.interval == 0:
            self._armed = True   # the early refresh for this step was not saved: redo it synchronously

    def _check_config(self, saved: Mapping, strict: bool) -> None:
        now = {f.name: getattr(self.config, f.name) for f in fields(self.config) if f.name != "include"}
        diff = [k for k in sorted(saved) if k in now and saved[k] != now[k]]
        if not diff:
            return
        msg = ("S2D load_state_dict: the state was saved under another S2DConfig ("
               + ", ".join(f"{k}={saved[k]!r}, now {now[k]!r}" for k in diff) + ")")
        if strict:
            raise ValueError(msg + "; pass strict=False to load it anyway")
        logger.warning(msg)

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
