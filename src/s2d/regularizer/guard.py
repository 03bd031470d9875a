"""The guard of the relative update: :class:`DecayGuard` backs off, then stops, the decay of a layer
whose decay raises a held-out loss (docs/s2d-modes.md). Depends on torch only.

At every refresh each layer the refresh selected is *tried*: its weight takes one whole interval of
decay at once (its selected σ_r -> (1 - f)·σ_r, f = fraction · scale), the guard loss is evaluated,
and the weight is restored exactly. A layer whose trial raised the loss by more than ``tolerance``
has its scale halved and is tried again; once it has been halved ``backoffs`` times and still costs
too much, it is *stopped*: it gets no decay for the rest of training. A lowered scale stays lowered.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from s2d.regularizer.relative import relative_decay_
from s2d.regularizer.sharding import is_distributed

__all__ = ["DecayGuard"]


class DecayGuard:
    """Per-layer back-off of the relative decay, judged by ``loss()`` (a float, lower is better).

    ``loss`` is called with gradients disabled; it should put the model in eval mode and score a fixed
    held-out batch. Under torch.distributed each rank's value is averaged over the ranks, so every
    rank takes the same decisions.
    """

    def __init__(self, loss: Callable[[], float], tolerance: float, backoffs: int) -> None:
        self.loss = loss
        self.tolerance = tolerance
        self.backoffs = backoffs
        self.halvings: dict[str, int] = {}       # layer -> times its fraction was halved
        self.stopped: dict[str, float] = {}      # layer -> rise of the guard loss that stopped it
        self.history: list[dict] = []           # one row per review: {"step", "loss", "layers": {...}}

    def scale(self, name: str) -> float:
        """The layer's share of ``fraction`` (1, 1/2, 1/4, ...); 0 once stopped."""
        return 0.0 if name in self.stopped else 0.5 ** self.halvings.get(name, 0)

    @torch.no_grad()
    def review(self, weights: Mapping[str, Tensor], directions: Mapping[str, tuple[Tensor, Tensor]],
               fraction: float, step: int) -> None:
        """Try one interval of decay on each layer of ``directions`` (name -> (U (m, k), V (n, k))).

        weights: name -> the layer's (m, n) weight, modified and restored in place. Updates
        ``halvings`` / ``stopped`` and appends a row to ``history``.
        """
        todo = [n for n in directions if n not in self.stopped]
        if not todo:
            return
        device = next(iter(weights.values())).device
        base = self._mean(self.loss(), device)
        if not math.isfinite(base):        # nothing can be judged against a broken model
            return
        row: dict = {"step": step, "loss": base, "layers": {}}
        for name in todo:
            while True:
                cost = self._trial(weights[name], *directions[name], fraction * self.scale(name), device) - base
                if cost <= self.tolerance:
                    break
                if self.halvings.get(name, 0) >= self.backoffs:
                    self.stopped[name] = cost
                    break
                self.halvings[name] = self.halvings.get(name, 0) + 1
            row["layers"][name] = {"cost": cost, "scale": self.scale(name), "stopped": name in self.stopped}
        self.history.append(row)

    def _trial(self, weight: Tensor, u: Tensor, v: Tensor, f: float, device: torch.device) -> float:
        """The guard loss with one interval of decay (share ``f``) applied to ``weight``, then undone."""
        saved = weight.detach().clone()
        relative_decay_(weight, u, v, f)
        try:
            return self._mean(self.loss(), device)
        finally:
            weight.copy_(saved)

    @staticmethod
    def _mean(value: float, device: torch.device) -> float:
        value = float(value)
        if not math.isfinite(value):
            return math.inf
        if is_distributed():
            t = torch.tensor([value], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            value = float(t) / torch.distributed.get_world_size()
        return value

    def state_dict(self) -> dict:
        return {"halvings": dict(self.halvings), "stopped": dict(self.stopped), "history": list(self.history)}

    def load_state_dict(self, sd: Mapping) -> None:
        self.halvings = {str(k): int(v) for k, v in sd.get("halvings", {}).items()}
        self.stopped = {str(k): float(v) for k, v in sd.get("stopped", {}).items()}
        self.history = list(sd.get("history", []))
