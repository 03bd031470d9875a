"""Colinearity Decay hyperparameters and pair descriptions: :class:`CDConfig`, :class:`Pair`. Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CDConfig", "Pair", "PAIR_KINDS"]

PAIR_KINDS = ("attn", "ffn")   # value -> attention output projection; FFN up -> down


@dataclass(frozen=True)
class CDConfig:
    """Colinearity Decay (CD) hyperparameters (docs/colinearity.md).

    Every optimizer step, each pair's weights move by ``-lr · strength · ‖W‖²_F · ∂R/∂W`` after the
    optimizer's own update (decoupled, like AdamW's weight decay, and in the same units: ``strength``
    is dimensionless). R is the pair's alignment, scale-invariant, so the plain step (``keep_top=0``)
    leaves ‖W‖_F unchanged to first order. With ``keep_top > 0`` the step instead leaves each weight's
    top singular values unchanged to first order: CD turns their directions rather than shrinking
    them (the singular values below the top ``keep_top`` may still grow).
    """

    strength: float = 1.0   # λ >= 0: decoupled step = lr · λ · ‖W‖²_F · ∂R/∂W (weight-decay units)
    keep_top: int = 4       # top singular values of each weight held fixed to first order (0: plain ∂R/∂W)
    interval: int = 50      # optimizer steps between recomputations of those top singular pairs, >= 1

    def __post_init__(self) -> None:
        checks = {
            "strength": (_number(self.strength) and math.isfinite(self.strength) and self.strength >= 0,
                         "a finite number >= 0"),
            "keep_top": (_count(self.keep_top) and self.keep_top >= 0, "an integer >= 0"),
            "interval": (_count(self.interval) and self.interval >= 1, "an integer >= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"CDConfig.{name} must be {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Pair:
    """An ordered pair of Linears in one block: ``first``'s output feeds ``second``'s input.

    The pair's map is B·A with A the (effective) first weight (d_mid, d_in) and B the second (d_out, d_mid).
    """

    first: str                          # module applied first (A): attention value, or FFN up
    second: str                         # module applied second (B): attention output, or FFN down
    kind: str = "attn"                  # one of PAIR_KINDS (for reports)
    rows: tuple[int, int] | None = None   # rows [start, stop) of first's weight that feed second
    #                                       (a fused qkv Linear: its v rows); None: all rows
    head_dim: int = 0                   # grouped-query attention: rows per kv head of first (0: none)
    kv_repeat: int = 1                  # grouped-query attention: query heads each kv head feeds

    def __post_init__(self) -> None:
        if self.kind not in PAIR_KINDS:
            raise ValueError(f"Pair.kind must be one of {', '.join(PAIR_KINDS)}, got {self.kind!r}")
        if self.rows is not None and not (len(self.rows) == 2 and 0 <= self.rows[0] < self.rows[1]):
            raise ValueError(f"Pair.rows must be (start, stop) with 0 <= start < stop, got {self.rows!r}")
        if self.kv_repeat < 1 or (self.kv_repeat > 1 and self.head_dim < 1):
            raise ValueError(f"Pair: kv_repeat={self.kv_repeat} needs kv_repeat >= 1 and, above 1, head_dim >= 1")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
