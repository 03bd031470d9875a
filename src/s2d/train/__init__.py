"""Fine-tuning: config, optimizers, checkpoints, evaluation and the loop, imports flowing down this list.

* :mod:`~s2d.train.config` — :class:`TrainConfig`;
* :mod:`~s2d.train.optim` — AdamW / Muon and the LR schedule;
* :mod:`~s2d.train.checkpoint` — atomic, resumable checkpoints;
* :mod:`~s2d.train.evaluate` — accuracy and the activation probe;
* :mod:`~s2d.train.loop` — :func:`finetune` (with optional S2D and QAT) -> :class:`TrainResult`;
* :mod:`~s2d.train.condition` — :func:`condition`: S2D under self-distillation, for a trained model.
"""
from s2d.train.condition import ConditionResult, condition
from s2d.train.config import ConditionConfig, TrainConfig
from s2d.train.evaluate import Outcomes, evaluate, evaluate_examples, evaluate_outcomes
from s2d.train.loop import TrainingDiverged, TrainResult, finetune

__all__ = ["TrainConfig", "ConditionConfig", "ConditionResult", "condition", "TrainResult", "TrainingDiverged", "Outcomes", "evaluate", "evaluate_examples", "evaluate_outcomes", "finetune"]
