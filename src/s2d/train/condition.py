"""Conditioning a model that is already trained, without labels: S2D under self-distillation.

The model to condition is the *student*, and a frozen copy of it is the *teacher*. On unlabeled inputs
the student minimises KL(teacher ‖ student) between their output distributions (a classifier's class
logits; a causal LM's next-token logits at every real token) while S2D decays the selected singular
directions. The student runs in eval mode (no dropout), so at step 0 the loss and its gradient are
exactly 0: the decay moves the weights and the distillation pulls the function back to the teacher.
The guard is the same KL on held-out inputs; it stops a layer whose decay the student cannot absorb.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from s2d.models import CausalLMClassifier, head_names
from s2d.regularizer import S2DConfig, SelectiveSpectralDecay
from s2d.train.config import ConditionConfig
from s2d.utils import eval_mode, jsonable, to_device

__all__ = ["AllBut", "ConditionResult", "condition", "distill_logits", "held_out_kl", "kl_to_teacher", "teacher_logits"]


@dataclass
class ConditionResult:
    """What one conditioning run did (JSON-serialisable through :func:`s2d.utils.jsonable`)."""
    steps: int                                                     # optimizer steps
    final_loss: float                                              # KL of the last step, nats
    loss_history: list[list[float]] = field(default_factory=list)  # rows [step, KL to the teacher in nats]
    s2d_stats: list[dict] = field(default_factory=list)            # LayerStats dicts at the end
    s2d_config: dict | None = None                                 # the S2DConfig used
    guard_history: list[dict] = field(default_factory=list)        # DecayGuard.history (empty: no guard)
    stopped: dict[str, float] = field(default_factory=dict)        # layers the guard stopped -> their cost
    wall_s: float = 0.0                                            # seconds


@dataclass(frozen=True)
class AllBut:
    """An ``S2DConfig.include`` predicate: every nn.Linear except the named modules."""
    names: tuple[str, ...]     # module names left out (the heads)

    def __call__(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and name not in self.names


def distill_logits(model: nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """(N, V) logits whose softmax the student matches: a classifier's (B, C) class logits, or a causal
    LM's (:class:`CausalLMClassifier`) next-token logits at its N real tokens."""
    if isinstance(model, CausalLMClassifier):
        mask = inputs["attention_mask"]
        return model.lm(input_ids=inputs["input_ids"], attention_mask=mask).logits[mask.bool()]
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def kl_to_teacher(teacher: Tensor, student: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over rows of KL(softmax(teacher/T) ‖ softmax(student/T)) · T², in nats (0-d)."""
    t = (teacher.float() / temperature).log_softmax(-1)
    s = (student.float() / temperature).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2


@torch.no_grad()
def held_out_kl(student: nn.Module, teacher: nn.Module | list[Tensor], batches: list[dict],
                temperature: float = 1.0) -> float:
    """KL(teacher ‖ student) in nats per row, averaged over ``batches`` weighted by their rows (eval mode).

    teacher: the teacher model, or its :func:`distill_logits` of each batch, computed once (the guard
    asks many times and the teacher does not change).
    """
    total, rows = 0.0, 0
    with eval_mode(student):
        for i, batch in enumerate(batches):
            t = teacher[i] if isinstance(teacher, list) else teacher_logits(teacher, [batch])[0]
            total += float(kl_to_teacher(t, distill_logits(student, batch), temperature)) * len(t)
            rows += len(t)
    return total / max(1, rows)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, batches: list[dict]) -> list[Tensor]:
    """:func:`distill_logits` of ``teacher`` on each batch, in eval mode."""
    with eval_mode(teacher):
        return [distill_logits(teacher, b) for b in batches]


def _unlabeled(loader: Iterable[dict], device: torch.device, seed: int) -> Iterator[dict]:
    """Endless stream of the loader's batches without their labels, on ``device``.

    A shuffling DataLoader is re-created with a generator seeded from ``seed``, so the order does not
    depend on how often the caller's loader was iterated before (a resumed run conditions as an
    uninterrupted one).
    """
    if isinstance(loader, DataLoader) and not isinstance(loader.sampler, SequentialSampler):
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, collate_fn=loader.collate_fn,
                            generator=torch.Generator().manual_seed(seed))
    while True:
        for batch in loader:
            yield to_device(batch, device, drop_labels=True)


def condition(model: nn.Module, loader: Iterable[dict], cfg: ConditionConfig, s2d_config: S2DConfig,
              guard_batches: list[dict] | None = None, progress: bool = True) -> ConditionResult:
    """Condition ``model`` in place for ``cfg.steps`` steps on ``loader``'s inputs (labels are ignored).

    s2d_config: the S2D attached to the student (the relative update is the one meant for this; its
    interval should let it refresh several times in ``cfg.steps``). With ``include=None`` it targets
    every Linear but the classifier / LM head (:func:`s2d.models.head_names`): the head is not
    quantized, so its outliers cost nothing, and decaying it would change the outputs directly.
    guard_batches: held-out batches of the guard (None or empty: no guard; needs ``update="relative"``).
    Returns a :class:`ConditionResult`; the model is left in eval mode.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    held = [to_device(b, device, drop_labels=True) for b in guard_batches or []]
    targets = teacher_logits(teacher, held)
    guard = (lambda: held_out_kl(model, targets, held, cfg.temperature)) if held else None
    if s2d_config.include is None:
        s2d_config = replace(s2d_config, include=AllBut(tuple(sorted(head_names(model)))))
    decay = SelectiveSpectralDecay(model, optimizer, s2d_config, guard=guard)
    result = ConditionResult(steps=cfg.steps, final_loss=float("nan"), s2d_config=jsonable(s2d_config))
    stream = _unlabeled(loader, device, cfg.seed)
    for step in tqdm(range(cfg.steps), desc="condition", disable=not progress):
        inputs = next(stream)
        with torch.no_grad():
            target = distill_logits(teacher, inputs)
        loss = kl_to_teacher(target, distill_logits(model, inputs), cfg.temperature)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.loss_history.append([step + 1, float(loss.detach())])
    result.final_loss = result.loss_history[-1][1]
    result.s2d_stats = [jsonable(s) for s in decay.layer_stats()]
    if decay.guard is not None:
        result.guard_history, result.stopped = list(decay.guard.history), dict(decay.guard.stopped)
    decay.remove()
    result.wall_s = time.perf_counter() - t0
    return result
