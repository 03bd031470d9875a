"""Colinearity Decay as optimizer hooks: :class:`ColinearityDecay` (docs/colinearity.md).

After every optimizer step each pair's weights take the decoupled step
``W -= lr · strength · S`` with ``S = ‖W‖²_F · ∂R/∂W`` (:func:`~s2d.colinearity.penalty.pair_steps`), in
an optimizer step *post*-hook; ``lr`` is the learning rate of the weight's parameter group, so CD
follows the schedule like AdamW's decoupled weight decay does. With ``keep_top = k > 0`` the step
first loses its component along each weight's top-k singular pairs (recomputed every ``interval``
steps), so CD turns the directions of the large singular values instead of shrinking them.

The attachment contract is :class:`~s2d.regularizer.SelectiveSpectralDecay`'s: the training loop stays
unchanged, a step that never runs (a GradScaler skip) is invisible, a weight whose ``.grad`` is None
at step time is left alone, and :meth:`state_dict` / :meth:`load_state_dict` / :meth:`remove` /
:meth:`refresh_now` / :meth:`pair_stats` behave the same way. Under DDP every rank applies the same
step to the same replicated weights; FSDP2-sharded weights are refused.

Depends on torch only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from s2d.colinearity.config import CDConfig, Pair
from s2d.colinearity.penalty import (
    alignment_ratio, effective_first, first_block, hold_top_singular_, pair_steps, top_alignment,
)
from s2d.spectral import spectra, top_k

logger = logging.getLogger(__name__)

__all__ = ["ColinearityDecay", "PairStats"]

Pairs = Sequence[Pair] | Callable[[nn.Module], Sequence[Pair]]


@dataclass
class PairStats:
    """One pair at its last CD step (alignment) and its last refresh (top gains)."""
    first: str                    # module applied first
    second: str                   # module applied second
    kind: str                     # "attn" or "ffn"
    alignment: float              # R·d_mid before the last step (1 = chance; see penalty.alignment_ratio)
    top_alignment: float          # ‖BA‖₂ / (‖A‖₂‖B‖₂) at the last refresh
    sigma_first: float            # σ_max of the first weight's block at the last refresh
    sigma_second: float           # σ_max of the second weight at the last refresh
    refreshed_at: int             # optimizer step of the last refresh


class ColinearityDecay:
    """Attach Colinearity Decay to the ``pairs`` of ``model`` trained by ``optimizer``.

    pairs: a list of :class:`Pair`, or a function ``model -> pairs`` (e.g.
    :func:`s2d.models.colinearity_pairs`, which reads them from the model's block layout).

    Attributes:
        step: optimizer steps seen (steps that actually ran).
        pairs: the pairs CD acts on.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: CDConfig = CDConfig(),
                 pairs: Pairs = ()) -> None:
        self.config = config
        self.optimizer = optimizer
        self.pairs = list(pairs(model) if callable(pairs) else pairs)
        modules = dict(model.named_modules())
        groups = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self._weights: dict[str, Tensor] = {}
        self._groups: dict[str, int] = {}      # param-group index (load_state_dict replaces the group dicts)
        for pair in self.pairs:
            for name in (pair.first, pair.second):
                self._bind(name, modules, groups)
        self.step = 0
        self._force = False
        self._factors: dict[str, tuple[Tensor, Tensor]] = {}   # block name -> (U_k, V_k) of its weight block
        self._stats: dict[tuple[str, str], PairStats] = {}
        self._handles = [optimizer.register_step_post_hook(self._post_step)]
        if not self.pairs:
            logger.warning("CD: no pairs given (or none found in the model's block layout); CD does nothing")
        logger.info("CD attached to %d pairs (%s)", len(self.pairs), config)

    def _bind(self, name: str, modules: Mapping[str, nn.Module], groups: Mapping[int, int]) -> None:
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"ColinearityDecay: pair module {name!r} is not a module with a 2-D weight in the model")
        if isinstance(weight, DTensor):
            raise ValueError(f"ColinearityDecay: {name}.weight is an FSDP2-sharded DTensor; CD needs whole weights")
        if id(weight) not in groups:
            raise ValueError(f"ColinearityDecay: {name}.weight is not in the optimizer")
        self._weights[name], self._groups[name] = weight, groups[id(weight)]

    # ------------------------------------------------------------------ the step
    def refresh_now(self) -> None:
        """Recompute the held top singular pairs at the next optimizer step."""
        self._force = True

    def _blocks(self) -> dict[str, Tensor]:
        """Every weight block CD moves, keyed ``"module"`` or ``"module[start:stop]"``."""
        out = {}
        for pair in self.pairs:
            out[_block_key(pair)] = first_block(self._weights[pair.first], pair).detach()
            out[pair.second] = self._weights[pair.second].detach()
        return out

    def _refresh(self) -> None:
        blocks = self._blocks()
        specs = dict(zip(blocks, spectra(list(blocks.values()))))
        # copies, so the full spectra of every weight are not kept alive through views
        self._factors = {k: (f.U.clone(), f.V.clone()) for k, f in
                         ((k, top_k(s, self.config.keep_top)) for k, s in specs.items())} if self.config.keep_top > 0 else {}
        for pair in self.pairs:
            a, b = blocks[_block_key(pair)], blocks[pair.second]
            old = self._stats.get((pair.first, pair.second))
            self._stats[(pair.first, pair.second)] = PairStats(
                pair.first, pair.second, pair.kind, old.alignment if old else float("nan"),
                top_alignment(effective_first(a, pair), b), float(specs[_block_key(pair)].S[0]),
                float(specs[pair.second].S[0]), self.step)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._force or self.step % self.config.interval == 0:
            self._refresh()
            self._force = False
        if self.config.strength > 0:
            with torch.no_grad():
                for pair in self.pairs:
                    self._apply(pair)
        self.step += 1

    def _apply(self, pair: Pair) -> None:
        w_first, w_second = self._weights[pair.first], self._weights[pair.second]
        r, step_first, step_second = pair_steps(w_first, w_second, pair)
        stats = self._stats[(pair.first, pair.second)]
        stats.alignment = alignment_ratio(r, w_second.shape[1])
        moves = ((pair.first, _block_key(pair), first_block(w_first, pair), step_first),
                 (pair.second, pair.second, w_second, step_second))
        for name, key, target, step in moves:
            lr = float(self.optimizer.param_groups[self._groups[name]]["lr"])
            if self._weights[name].grad is None or lr == 0.0 or not torch.isfinite(step).all():
                continue
            if key in self._factors:
                u, v = self._factors[key]
                hold_top_singular_(step, u.to(step.device, step.dtype), v.to(step.device, step.dtype))
            target.sub_(step.to(target.dtype), alpha=lr * self.config.strength)

    # ------------------------------------------------------------------ inspection / persistence
    def pair_stats(self) -> list[PairStats]:
        """Stats of every pair refreshed so far, in pair order (copies: later steps do not change them)."""
        return [replace(self._stats[(p.first, p.second)]) for p in self.pairs if (p.first, p.second) in self._stats]

    def state_dict(self) -> dict:
        """Everything needed to resume: step, the refresh flag, the held factors, the stats and the config."""
        return {"step": self.step, "force": self._force, "config": asdict(self.config),
                "factors": {k: {"U": u.clone(), "V": v.clone()} for k, (u, v) in self._factors.items()},
                "stats": {f"{a}->{b}": asdict(s) for (a, b), s in self._stats.items()}}

    def load_state_dict(self, sd: Mapping, strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; a state saved under another CDConfig is refused (strict) or warned."""
        now = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        diff = [k for k in sorted(sd.get("config", {})) if k in now and sd["config"][k] != now[k]]
        if diff:
            msg = "CD load_state_dict: the state was saved under another CDConfig (" + ", ".join(
                f"{k}={sd['config'][k]!r}, now {now[k]!r}" for k in diff) + ")"
            if strict:
                raise ValueError(msg + "; pass strict=False to load it anyway")
            logger.warning(msg)
        keys = {_block_key(p) for p in self.pairs} | {p.second for p in self.pairs}
        self.step, self._force = int(sd["step"]), bool(sd["force"])
        device = next(iter(self._weights.values())).device if self._weights else None
        self._factors = {k: (f["U"].to(device), f["V"].to(device)) for k, f in sd["factors"].items() if k in keys}
        known = {f"{p.first}->{p.second}": (p.first, p.second) for p in self.pairs}
        self._stats = {known[k]: PairStats(**s) for k, s in sd["stats"].items() if k in known}
        unknown = sorted(set(sd["stats"]) - set(known))
        if unknown:
            logger.warning("CD load_state_dict: ignoring unknown pairs %s", unknown)
        if len(self._stats) < len(self.pairs):
            self._force = True          # a pair the state does not know: refresh at the next step

    def remove(self) -> None:
        """Detach the hook and drop the held factors; the model and optimizer are left as they are."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._factors.clear()


def _block_key(pair: Pair) -> str:
    return pair.first if pair.rows is None else f"{pair.first}[{pair.rows[0]}:{pair.rows[1]}]"
