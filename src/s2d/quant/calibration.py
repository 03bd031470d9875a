"""Calibration of a prepared model: weight quantizers from the weights, activation quantizers by
observe -> finalize over calibration batches, padding tokens left out.

Padding: before each forward pass :func:`run_batches` gives every calibrating activation quantizer the
batch's real-token mask (``token_mask``, from its 2-D ``attention_mask``); with the (batch, token) dims
of its input (``token_dims``, set by :func:`calibrate` from the quantizer's role) the quantizer then
observes only real tokens. The mask is cleared after each pass.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from s2d.quant.conv import QuantPatchConv
from s2d.quant.linear import QuantLinear
from s2d.quant.prepare import TOKEN_DIMS, named_quantizers, quantizer_roles
from s2d.quant.quantizers import Quantizer
from s2d.utils import eval_mode, to_device, token_mask

__all__ = ["run_batches", "calibrate_weights", "calibrate"]

logger = logging.getLogger(__name__)


def run_batches(model: nn.Module, batches: Iterable[dict], progress: bool = True, desc: str = "calibrate",
                masked: Sequence[Quantizer] = ()) -> int:
    """Run ``model(**batch)`` (labels dropped) in eval mode without grad; returns the number of batches.

    ``masked``: quantizers whose ``token_mask`` is set to each batch's 2-D ``attention_mask`` (as bool;
    None when the batch has none) for that batch's forward pass, and cleared afterwards.
    """
    device = next(model.parameters()).device
    n = 0
    with eval_mode(model), torch.no_grad():
        try:
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                batch = to_device(batch, device, drop_labels=True)
                real = token_mask(batch)
                for q in masked:
                    q.token_mask = real
                model(**batch)
                for q in masked:
                    q.token_mask = None
                n += 1
        finally:
            for q in masked:
                q.token_mask = None
    return n


def calibrate_weights(model: nn.Module) -> None:
    """Finalize every weight quantizer from its layer's current weight (dynamic ones record it for describe)."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantPatchConv)) and isinstance(m.weight_quantizer, Quantizer):
            wq = m.weight_quantizer
            wq.reset()
            with torch.no_grad():
                wq.observe(m.weight.detach())
            wq.finalize()


def calibrate(model: nn.Module, calib: Iterable[dict], progress: bool = True,
              only: Iterable[str] | None = None) -> None:
    """Calibrate all quantizers: weights from the weights, activations by observe -> finalize over ``calib``.

    ``calib``: iterable of model-input dicts (a "labels" key is dropped). ``only``: restrict the activation
    pass to these quantizer names (e.g. one block at a time). Quantizers that never saw data are left
    uncalibrated with a warning (they raise if used).
    """
    calibrate_weights(model)
    roles = quantizer_roles(model)
    qs = {n: q for n, q in named_quantizers(model).items() if roles[n] != "weight" and q.enabled}
    if only is not None:
        only = set(only)
        qs = {n: q for n, q in qs.items() if n in only}
    for name, q in qs.items():
        q.reset()
        q.calibrating = True
        q.token_dims = TOKEN_DIMS.get(roles[name])
    try:
        n = run_batches(model, calib, progress, masked=list(qs.values()))
    finally:
        for q in qs.values():
            q.calibrating = False
    if n == 0:
        raise ValueError("calibrate: calib yielded no batches")
    for name, q in qs.items():
        if q.num_observed:
            q.finalize()
        else:
            logger.warning("quantizer %s saw no data during calibration", name)
