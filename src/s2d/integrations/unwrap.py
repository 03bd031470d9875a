"""The torch optimizer inside a framework's wrapper, which S2D's step hooks attach to."""
from __future__ import annotations

import torch

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"S2D needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer
