"""Shared plumbing for the block-wise PTQ methods (PTQ4ViT, RepQ-ViT, ERQ).

- calibration batches: drop labels, keep the first samples, split into sub-batches;
- capture of module inputs (or quantizer inputs) as token matrices (N, C), padding tokens dropped when
  the batch has an ``attention_mask`` of matching shape, randomly subsampled to a token budget; a
  patch-embedding convolution's input as patch rows (N, C·kh·kw);
- the groups of Linears that share one input, in forward order (q/k/v, out-proj, fc1 [+gate], fc2,
  then every other Linear such as pooler and classifier head), with the two factors of a layer that
  ``s2d.lowrank`` factorised placed in its block;
- RepQ-style range search: clipping candidates from quantiles, the one with the lowest MSE per row.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from s2d.models import BlockInfo, blocks
from s2d.quant.conv import QuantPatchConv, patch_rows
from s2d.quant.primitives import best_clipping
from s2d.utils import real_tokens

__all__ = [
    "StopForward", "model_inputs", "take_samples", "sub_batches", "subsample", "require_blocks", "factorised_layers",
    "output_linears", "LinearGroup",
    "linear_groups", "token_rows", "TokenCapture", "forward_batches", "capture_inputs", "capture_patch_inputs",
    "quant_patch_convs", "quantile_mse_range",
]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early once the wanted tensors are recorded."""


# ----------------------------------------------------------------------------- calibration batches

def model_inputs(batch: dict) -> dict:
    """The batch without ``labels`` (methods never use the task labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _num_samples(batch: dict) -> int:
    """Leading dimension of the batch's first tensor."""
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))


def _slice(batch: dict, start: int, stop: int) -> dict:
    """Samples ``start:stop`` of every tensor of the batch (other values unchanged)."""
    return {k: (v[start:stop] if isinstance(v, Tensor) else v) for k, v in batch.items()}


def take_samples(calib: Iterable[dict], num_samples: int | None) -> list[dict]:
    """The first ``num_samples`` samples of ``calib`` (labels dropped), keeping the batch structure."""
    out, left = [], num_samples
    for batch in calib:
        batch = model_inputs(batch)
        n = _num_samples(batch)
        if left is not None and n > left:
            batch, n = _slice(batch, 0, left), left
        out.append(batch)
        if left is not None:
            left -= n
            if left <= 0:
                break
    if not out:
        raise ValueError("calibration batches are empty")
    return out


def sub_batches(calib: Iterable[dict], size: int | None) -> list[dict]:
    """Split every batch into sub-batches of at most ``size`` samples (None: unchanged)."""
    out = []
    for batch in calib:
        batch = model_inputs(batch)
        n = _num_samples(batch)
        step = n if size is None else size
        out.extend(_slice(batch, i, i + step) for i in range(0, n, step))
    return out


def subsample(x: Tensor, max_rows: int | None, generator: torch.Generator) -> Tensor:
    """At most ``max_rows`` rows of ``x`` (N, ...), chosen uniformly at random without replacement."""
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_rows].sort().values
    return x[idx.to(x.device)]


# ----------------------------------------------------------------------------- model structure

def require_blocks(model: nn.Module) -> list[BlockInfo]:
    """``s2d.models.blocks(model)`` with factorised layers resolved (:func:`factorised_layers`: a slot
    names the factor that reads its input); ValueError when no transformer block layout is recognised."""
    infos = blocks(model)
    if not infos:
        raise ValueError(
            f"{type(model).__name__}: no transformer blocks recognised (supported: BERT/MPNet encoders and "
            "ViT-style models: DINOv2, ViT, SigLIP, CLIP vision, timm ViT)"
        )
    factors = factorised_layers(model)
    if not factors:
        return infos
    for b in infos:
        if len(b.qkv) == 1 and b.qkv[0] in factors:
            raise ValueError(f"{b.qkv[0]}: a factorised fused qkv Linear is not supported by the PTQ methods "
                             "(the attention matmuls need q, k and v from one Linear); leave it dense")
    return [replace(b, qkv=[_first(factors, n) for n in b.qkv], attn_out=_first(factors, b.attn_out),
                    fc1=[_first(factors, n) for n in b.fc1], fc2=_first(factors, b.fc2)) for b in infos]


def factorised_layers(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Layers that :func:`s2d.lowrank.factorise_model` replaced by ``nn.Sequential(first, second)`` of
    two Linears: name -> (first's name, second's name). In a block, ``first`` takes the layer's slot (it
    reads the slot's input: the reparameterised LayerNorm output, the GELU output); ``second``, which
    reads the rank-r intermediate, is one more Linear of the block (role "inner")."""
    return {name: (f"{name}.0", f"{name}.1") for name, m in model.named_modules()
            if isinstance(m, nn.Sequential) and len(m) == 2 and all(isinstance(c, nn.Linear) for c in m)}


def output_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Slot name -> the Linear that computes its output: itself, or for a factorised layer (its own name
    and its first factor's) the second factor. One walk of the modules."""
    mods = dict(model.named_modules())
    out = {n: m for n, m in mods.items() if isinstance(m, nn.Linear)}
    for layer, (first, second) in factorised_layers(model).items():
        out[layer] = out[first] = mods[second]
    return out


def _first(factors: dict[str, tuple[str, str]], name: str) -> str:
    return factors[name][0] if name in factors else name


@dataclass
class LinearGroup:
    """Linears (module names) that read the same tensor, and the block they belong to (None: outside)."""

    names: list[str]   # module names, in the block layout's order
    role: str          # "qkv" | "attn_out" | "fc1" | "fc2" | "inner" (a factorised layer's second factor) | "other"
    block: int | None  # index into the model's blocks, None for Linears outside every block


def linear_groups(model: nn.Module, infos: list[BlockInfo] | None = None) -> list[LinearGroup]:
    """Every ``nn.Linear`` of ``model`` once, grouped by shared input, in forward order.

    ``infos``: the model's blocks (default: :func:`require_blocks`, which raises when there are none).
    """
    infos = require_blocks(model) if infos is None else infos
    inner = {second for _, second in factorised_layers(model).values()}
    groups, seen = [], set()
    for i, b in enumerate(infos):
        for names, role in ((b.qkv, "qkv"), ([b.attn_out], "attn_out"), (b.fc1, "fc1"), ([b.fc2], "fc2")):
            groups.append(LinearGroup(list(names), role, i))
            seen.update(names)
        for name in sorted(n for n in inner if n.startswith(b.name + ".")):
            groups.append(LinearGroup([name], "inner", i))
            seen.add(name)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name not in seen:
            groups.append(LinearGroup([name], "other", None))
    return groups


# ----------------------------------------------------------------------------- input capture

def token_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` (..., C) as token rows (N, C); when ``mask`` (B, T) matches x's leading dims (x at least
    3-D) only the rows where it is nonzero (real tokens) are kept."""
    return real_tokens(x, None if mask is None else mask.bool()).reshape(-1, x.shape[-1])


class TokenCapture:
    """Forward pre-hooks that record the first positional input of modules as token rows (N, C), float32.

    Padded tokens are dropped with the current batch's attention mask (``mask``, set by
    :func:`forward_batches`; see :func:`token_rows`), except for the names in ``unmasked`` (inputs that
    are not (B, T, C)). ``stop``: raise :class:`StopForward` once every module has been called in the
    current pass.
    """

    def __init__(self, modules: dict[str, nn.Module], stop: bool = False, unmasked: Iterable[str] = ()) -> None:
        self.unmasked = set(unmasked)
        self.data: dict[str, list[Tensor]] = {n: [] for n in modules}
        self.mask: Tensor | None = None
        self.stop = stop
        self._called: set[str] = set()
        self._handles: list[RemovableHandle] = [mod.register_forward_pre_hook(self._pre(name))
                                                for name, mod in modules.items()]

    def rows(self, x: Tensor, name: str) -> Tensor:
        """Token rows of module ``name``'s input ``x``."""
        return x.reshape(-1, x.shape[-1]) if name in self.unmasked else token_rows(x, self.mask)

    def _pre(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.data[name].append(self.rows(args[0].detach(), name).float())
            self._called.add(name)
            if self.stop and len(self._called) == len(self.data):
                raise StopForward
        return hook

    def new_pass(self) -> None:
        self._called = set()

    def cat(self, name: str) -> Tensor:
        """Everything recorded for ``name``, (N, C) (empty tensor if nothing)."""
        return torch.cat(self.data[name]) if self.data[name] else torch.empty(0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def forward_batches(model: nn.Module, batches: list[dict], capture: TokenCapture | None = None,
                    grad: bool = False) -> Iterator[tuple[dict, object]]:
    """Run ``model(**batch)`` for every batch (no graph unless ``grad``); yields (batch, output or None).

    A :class:`StopForward` raised by a capture hook ends that pass early (output None).
    """
    for batch in batches:
        if capture is not None:
            capture.mask = batch.get("attention_mask")
            capture.new_pass()
        try:
            with torch.set_grad_enabled(grad):
                out = model(**batch)
        except StopForward:
            out = None
        yield batch, out


def capture_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict],
                   max_tokens: int | None, generator: torch.Generator,
                   unmasked: Iterable[str] = ()) -> dict[str, Tensor]:
    """Inputs of ``modules`` over ``batches`` as token matrices (N, C), N <= max_tokens; stops each
    forward pass as soon as all of them were called. ``unmasked``: names never filtered by the mask."""
    cap = TokenCapture(modules, stop=True, unmasked=unmasked)
    try:
        for _ in forward_batches(model, batches, cap):
            pass
    finally:
        cap.remove()
    return {n: subsample(cap.cat(n), max_tokens, generator) for n in modules}


def quant_patch_convs(model: nn.Module) -> dict[str, QuantPatchConv]:
    """The model's quantized patch-embedding convolutions by name (``prepare_model`` made them)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantPatchConv)}


def capture_patch_inputs(model: nn.Module, conv: QuantPatchConv, batches: list[dict], max_rows: int | None,
                         generator: torch.Generator) -> Tensor:
    """The convolution's input over ``batches`` as patch rows (N, C·kh·kw) (:func:`s2d.quant.conv.patch_rows`),
    float32, N <= max_rows (random subset); each forward pass stops at the convolution."""
    rows: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        rows.append(patch_rows(args[0].detach().float(), module))
        raise StopForward

    handle = conv.register_forward_pre_hook(hook)
    try:
        for _ in forward_batches(model, batches):
            pass
    finally:
        handle.remove()
    return subsample(torch.cat(rows), max_rows, generator)


# ----------------------------------------------------------------------------- range search

def quantile_mse_range(rows: Tensor, bits: int, symmetric: bool,
                       quantiles: tuple[float, ...] = (1.0, 0.99999, 0.9999, 0.999),
                       max_values: int = 1 << 18, include_zero: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row clipping range [lo, hi] (R,) for ``rows`` (R, M): among the candidate pairs
    (quantile(1−p), quantile(p)) for p in ``quantiles`` (symmetric: ±quantile(p) of |x|), the one whose
    fake-quantized rows have the lowest mean squared error (:func:`best_clipping`; earlier candidates
    win ties). p = 1.0 is min-max. Quantiles are estimated on at most ``max_values`` values per row
    (a deterministic strided subset); the errors use every value. ``include_zero``: as
    :func:`s2d.quant.primitives.scale_zero_point`."""
    rows = rows.float()
    keep = max(min(max_values, (1 << 24) // rows.shape[0]), 1)  # torch.quantile's input-size limit
    rows_q = rows[:, torch.linspace(0, rows.shape[1] - 1, keep).long()] if rows.shape[1] > keep else rows
    ps = [p for p in quantiles if p < 1]
    if ps:  # one sort per call: all quantiles at once, (len(qs), R)
        qs = torch.tensor(ps if symmetric else [1 - p for p in ps] + ps, dtype=rows.dtype, device=rows.device)
        table = torch.quantile(rows_q.abs() if symmetric else rows_q, qs, dim=1)
    cands = []
    for p in quantiles:
        if p == 1.0:
            if symmetric:
                top = rows.abs().amax(1)
                cands.append((-top, top))
            else:
                cands.append((rows.amin(1), rows.amax(1)))
        else:
            i = ps.index(p)
            cands.append((-table[i], table[i]) if symmetric else (table[i], table[len(ps) + i]))
    return best_clipping(rows, cands, bits, symmetric, include_zero)
