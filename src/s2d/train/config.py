"""Fine-tuning hyperparameters: :class:`TrainConfig`; conditioning by self-distillation: :class:`ConditionConfig`."""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TrainConfig", "ConditionConfig", "SCHEDULES", "OPTIMIZERS"]

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one fine-tuning run. Exactly one of ``steps`` and ``epochs`` is set."""
    steps: int | None = None           # optimizer steps (each of grad_accum micro-batches)
    epochs: float | None = None        # or: passes over the train loader
    lr: float = 5e-5                   # peak learning rate (AdamW; Muon too unless muon_lr is set)
    weight_decay: float = 0.01         # AdamW/Muon weight decay (none on biases and norms)
    warmup: float = 0.1                # fraction of the steps with a linear learning-rate ramp, in [0, 1)
    schedule: str = "linear"           # after warmup: "linear" / "cosine" decay to 0, or "constant"
    batch_size: int = 32               # training micro-batch size
    eval_batch_size: int = 64          # evaluation batch size
    grad_accum: int = 1                # micro-batches per optimizer step
    seed: int = 0                      # data order, dropout, head initialisation
    log_every: int = 10                # steps between progress lines
    eval_every: int = 50               # steps between validation evals and activation probes
    eval_batches: int | None = 4       # validation batches per eval (None: the whole split)
    save_every: int = 0                # steps between checkpoints (0: only the final one)
    max_grad_norm: float = 1.0         # gradient clipping norm (0: no clipping)
    muon_lr: float | None = None       # Muon's learning rate when it differs from lr
    max_bad_steps: int = 5             # stop (TrainingDiverged) after this many consecutive non-finite
    #                                    losses, keeping the last good checkpoint (0: never stop)

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: set exactly one of steps and epochs, got "
                             f"steps={self.steps}, epochs={self.epochs}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"TrainConfig.steps must be an integer >= 1, got {self.steps!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"TrainConfig.epochs must be > 0, got {self.epochs!r}")
        _positive("lr", self.lr)
        if self.muon_lr is not None:
            _positive("muon_lr", self.muon_lr)
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"TrainConfig.warmup must be in [0, 1), got {self.warmup!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"TrainConfig.eval_batches must be an integer >= 1 or None, got {self.eval_batches!r}")
        if not isinstance(self.max_bad_steps, int) or self.max_bad_steps < 0:
            raise ValueError(f"TrainConfig.max_bad_steps must be an integer >= 0, got {self.max_bad_steps!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"TrainConfig.save_every must be an integer >= 0, got {self.save_every!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"TrainConfig.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm!r}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run given the train loader's length (micro-batches per epoch)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / self.grad_accum))


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class ConditionConfig:
    """Hyperparameters of :func:`s2d.train.condition.condition` (S2D under self-distillation, no labels);
    the batch size is the loader's."""
    steps: int = 60                    # optimizer steps on unlabeled training inputs
    lr: float = 2e-5                   # AdamW learning rate (constant: the teacher does not move)
    temperature: float = 1.0           # softmax temperature of teacher and student in the KL
    max_grad_norm: float = 1.0         # gradient clipping norm (0: no clipping)
    guard_examples: int = 128          # held-out inputs of the guard (KL to the teacher); 0: no guard
    seed: int = 0                      # data order

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("guard_examples", 0), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ConditionConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ConditionConfig.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0):
            raise ValueError(f"ConditionConfig.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
