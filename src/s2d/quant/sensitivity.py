"""Per-site quantization sensitivity: which quantizer of a model costs the accuracy.

A *site* is one quantizer of a model quantized by a PTQ method: a Linear's input or weight, or one
attention matmul input (q, k, softmax probabilities, v). Two views per site, both on the same model
and calibration:

* **alone**: only this site quantized, every other one in float. The damage is the mean over
  examples of KL(p_float ‖ p_site) of the output class distribution (softmax of ``logits``), on the
  calibration batches and on held-out batches, with the argmax agreement with float and the
  accuracy where the batches have labels.
* **all but**: every site quantized except this one. ``recovered`` is the accuracy this gains over
  the fully quantized model, and ``kl_recovered`` the KL it removes; run for the ``recover_top``
  sites that rank highest in the alone view (every site costs one more pass per site otherwise).

Sites are ranked by the held-out KL of the alone view. Each site costs one pass over the held-out
and one over the calibration examples, re-batched into few large batches (``batch_size``): MiniLM's
100 sites take about 2 s each for 256 held-out sentences on 2 cores (docs/quantization.md).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from s2d.quant.api import quantize_model
from s2d.quant.config import QuantConfig
from s2d.quant.prepare import list_quantizers, named_quantizers, set_quantization
from s2d.utils import eval_mode, to_device

__all__ = ["SiteSensitivity", "SensitivityReport", "site_sensitivity", "merge_batches", "first_examples"]


@dataclass
class SiteSensitivity:
    """The damage of one quantization site (KL in nats, accuracies and agreement in [0, 1])."""
    site: str                      # quantizer name, e.g. "bert.encoder.layer.0.output.dense.input_quantizer"
    module: str                    # the module it belongs to (a Linear or an attention module)
    role: str                      # input | weight | attn_q | attn_k | attn_probs | attn_v | other
    range: list[float] | None      # the calibrated [lo, hi] of the values it quantizes
    kl: float                      # alone, held-out: mean KL(p_float || p_quantized)
    kl_calib: float                # alone, calibration batches
    agreement: float               # alone, held-out: argmax equal to float's
    accuracy: float | None         # alone, held-out accuracy (None without labels)
    recovered: float | None        # all but this site: accuracy - fully quantized accuracy (None: not run)
    kl_recovered: float | None     # all but this site: KL(fully quantized) - KL(all but this) (None: not run)


@dataclass
class SensitivityReport:
    """Every site of one model at one setting, ranked by ``kl`` (largest damage first)."""
    bits: str                      # e.g. "W4A4"
    method: str                    # the PTQ method that calibrated the sites
    examples: int                  # held-out examples scored per pass
    float_accuracy: float | None   # held-out accuracy in float
    quant_accuracy: float | None   # held-out accuracy, every site quantized
    quant_kl: float                # held-out KL of the fully quantized model
    sites: list[SiteSensitivity] = field(default_factory=list)


def merge_batches(batches: Iterable[dict], batch_size: int) -> list[dict]:
    """Re-batch dict batches into batches of ``batch_size`` examples (2-D text tensors padded on the
    right with 0 to the longest row; other tensors concatenated)."""
    rows: list[dict] = []
    for b in batches:
        n = len(next(iter(b.values())))
        rows += [{k: v[i] for k, v in b.items()} for i in range(n)]
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s: s + batch_size]
        out.append({k: _stack([r[k] for r in chunk]) for k in chunk[0]})
    return out


def first_examples(batches: Iterable[dict], n: int) -> list[dict]:
    """The first ``n`` examples of ``batches`` as one batch (fewer if the batches hold fewer); reads
    only as many batches as it needs (a DataLoader is not run to its end)."""
    taken, count = [], 0
    for b in batches:
        taken.append(b)
        count += len(next(iter(b.values())))
        if count >= n:
            break
    return merge_batches(taken, n)[:1]


def _stack(items: list[Tensor]) -> Tensor:
    if items[0].dim() == 1 and items[0].dtype in (torch.long, torch.int, torch.bool):   # token rows
        width = max(len(t) for t in items)
        return torch.stack([F.pad(t, (0, width - len(t))) for t in items])
    return torch.stack(items)


@torch.no_grad()
def _log_probs(model: nn.Module, batches: list[dict]) -> tuple[Tensor, Tensor | None]:
    """(log softmax of the logits (N, C), labels (N,) or None) over ``batches``."""
    device = next(model.parameters()).device
    outs, labels = [], []
    for b in batches:
        b = to_device(b, device)
        y = b.pop("labels", None)
        outs.append(model(**b).logits.float().log_softmax(-1).cpu())
        if y is not None:
            labels.append(y.cpu())
    return torch.cat(outs), (torch.cat(labels) if len(labels) == len(outs) else None)


def _scores(logp: Tensor, ref: Tensor, labels: Tensor | None) -> tuple[float, float, float | None]:
    """(mean KL(ref || logp), argmax agreement, accuracy or None)."""
    kl = max(0.0, float((ref.exp() * (ref - logp)).sum(-1).mean()))   # >= 0 up to float rounding
    agree = float((logp.argmax(-1) == ref.argmax(-1)).float().mean())
    acc = float((logp.argmax(-1) == labels).float().mean()) if labels is not None else None
    return kl, agree, acc


def site_sensitivity(model: nn.Module, spec: QuantConfig, calib: list[dict], test: list[dict],
                     method: str = "rtn", config: object | None = None, batch_size: int = 128,
                     recover_top: int | None = 10, progress: bool = True) -> SensitivityReport:
    """Rank the quantization sites of ``model`` quantized with ``method`` at ``spec`` (a deepcopy; the
    model itself is left alone). ``calib``: calibration batches (also scored); ``test``: held-out batches
    (with "labels" for the accuracies). Each batch is a dict of model inputs (``model(**batch)`` must
    return ``.logits``). The all-but view runs for the ``recover_top`` most damaging sites (None: all);
    the others keep ``recovered = kl_recovered = None``."""
    q = quantize_model(copy.deepcopy(model), spec, method=method, calib=calib, config=config, progress=progress)
    cal, held = merge_batches(calib, batch_size), merge_batches(test, batch_size)
    info = {r["name"]: r for r in list_quantizers(q)}
    with eval_mode(q):
        set_quantization(q, False)
        ref_cal, _ = _log_probs(q, cal)
        ref, labels = _log_probs(q, held)
        set_quantization(q, True)
        full_kl, _, full_acc = _scores(_log_probs(q, held)[0], ref, labels)
        sites = [_alone(q, name, info[name], held, cal, ref, ref_cal, labels)
                 for name in tqdm(info, desc=f"sensitivity {spec.name}", disable=not progress, leave=False)]
        sites.sort(key=lambda site: -site.kl)
        for site in sites[:recover_top]:
            _all_but(q, site, held, ref, labels, full_kl, full_acc)
        set_quantization(q, True)
    return SensitivityReport(bits=spec.name, method=method, examples=len(ref), float_accuracy=_scores(ref, ref, labels)[2],
                             quant_accuracy=full_acc, quant_kl=full_kl, sites=sites)


def _alone(q: nn.Module, name: str, row: dict, held: list[dict], cal: list[dict], ref: Tensor, ref_cal: Tensor,
           labels: Tensor | None) -> SiteSensitivity:
    """The site ``name`` quantized alone, every other one in float."""
    set_quantization(q, False)
    named_quantizers(q)[name].enabled = True
    kl, agree, acc = _scores(_log_probs(q, held)[0], ref, labels)
    kl_cal = _scores(_log_probs(q, cal)[0], ref_cal, None)[0]
    return SiteSensitivity(site=name, module=row["module"], role=row["role"], range=row["range"], kl=kl,
                           kl_calib=kl_cal, agreement=agree, accuracy=acc, recovered=None, kl_recovered=None)


def _all_but(q: nn.Module, site: SiteSensitivity, held: list[dict], ref: Tensor, labels: Tensor | None,
             full_kl: float, full_acc: float | None) -> None:
    """Fill ``site.recovered`` / ``kl_recovered``: every site quantized but this one."""
    set_quantization(q, True)
    named_quantizers(q)[site.site].enabled = False
    kl_rest, _, acc_rest = _scores(_log_probs(q, held)[0], ref, labels)
    site.recovered = None if acc_rest is None or full_acc is None else acc_rest - full_acc
    site.kl_recovered = full_kl - kl_rest
