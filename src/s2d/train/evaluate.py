"""Evaluation during and after fine-tuning: top-1 accuracy, causal LMs' held-out text NLL, and the
activation probe."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.utils import eval_mode, model_device, real_tokens, to_device, token_mask

__all__ = ["Outcomes", "evaluate", "evaluate_examples", "evaluate_outcomes", "held_out_loss", "probe_max_abs"]


@torch.no_grad()
def probe_max_abs(model: nn.Module, batch: Mapping[str, torch.Tensor],
                  modules: Mapping[str, nn.Module]) -> dict[str, float]:
    """max |output| of each module on one forward of ``batch`` (eval mode, no grad; padding tokens left out)."""
    out: dict[str, float] = {}
    handles = []
    mask = token_mask(batch)
    for name, mod in modules.items():
        def hook(_m, _i, y, name=name):
            out[name] = float(real_tokens(y.detach(), mask).abs().max())
        handles.append(mod.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
    return out


@dataclass
class Outcomes:
    """Per-example results of one evaluation, in loader order, on the CPU."""
    correct: torch.Tensor                 # (N,) bool: top-1 of ``logits`` equals the label
    nll: torch.Tensor | None = None       # (N,) float: the model's ``text_nll`` (causal LMs), nats/token
    pred: torch.Tensor | None = None      # (N,) long: top-1 class (agreement between two models)

    @property
    def perplexity(self) -> float | None:
        """exp of the mean per-example text NLL (causal LMs; None without ``nll``)."""
        return None if self.nll is None else math.exp(float(self.nll.double().mean()))


@torch.no_grad()
def evaluate_outcomes(model: nn.Module, loader: Iterable[dict], progress: bool = True,
                      max_batches: int | None = None) -> Outcomes:
    """Per-example correctness of ``model(**batch).logits`` top-1 against ``batch["labels"]``, and the
    per-example text NLL where the model returns ``text_nll`` (:class:`s2d.models.CausalLMClassifier`).
    Under torch.distributed every process scores the whole loader."""
    device = model_device(model)
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    hits, nlls, preds = [], [], []
    with eval_mode(model):
        for i, batch in enumerate(tqdm(loader, total=n, desc="eval", disable=not progress, leave=False)):
            if i >= n:
                break
            batch = to_device(batch, device)
            labels = batch.pop("labels")
            out = model(**batch)
            pred = out.logits.argmax(-1)
            hits.append((pred == labels).cpu())
            preds.append(pred.cpu())
            if getattr(out, "text_nll", None) is not None:
                nlls.append(out.text_nll.float().cpu())
    correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return Outcomes(correct, torch.cat(nlls) if nlls and len(nlls) == len(hits) else None,
                    torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long))


def evaluate_examples(model: nn.Module, loader: Iterable[dict], progress: bool = True,
                      max_batches: int | None = None) -> torch.Tensor:
    """Per-example correctness (N,) bool, in loader order (:func:`evaluate_outcomes`)."""
    return evaluate_outcomes(model, loader, progress, max_batches).correct


def evaluate(model: nn.Module, loader: Iterable[dict], progress: bool = True, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] (the mean of :func:`evaluate_examples`); counts are summed over the
    processes when torch.distributed is initialised (a loader sharded by accelerate)."""
    hits = evaluate_examples(model, loader, progress, max_batches)
    counts = torch.tensor([int(hits.sum()), hits.numel()], device=model_device(model))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return float(counts[0]) / max(1, int(counts[1]))


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[dict]) -> float:
    """The model's own loss (``model(**batch).loss``, labels included) averaged over ``batches`` weighted by
    their sizes, in eval mode: the guard loss of S2D's relative update during fine-tuning."""
    total, n = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            size = len(batch["labels"])
            total += float(model(**batch).loss) * size
            n += size
    return total / max(1, n)
