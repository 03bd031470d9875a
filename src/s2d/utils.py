"""Small shared helpers: atomic file writes, moving batches, eval mode, JSON-friendly values.

Depends on the standard library and torch only, so every layer of the package may use it.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["atomic_write", "write_text", "write_json", "save_torch", "to_device", "model_device", "eval_mode", "jsonable",
           "token_mask", "real_tokens"]


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then ``os.replace`` it into place.

    A reader never sees a half-written file, and a crash leaves the old file (or none). Parent
    directories are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: Path | str, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: object) -> Path:
    """Atomically write ``obj`` as indented JSON (non-JSON values through ``str``)."""
    return write_text(path, json.dumps(obj, indent=1, default=str))


def save_torch(path: Path | str, obj: object) -> Path:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def to_device(batch: Mapping[str, object], device: torch.device | str,
              drop_labels: bool = False) -> dict[str, object]:
    """The batch with every tensor moved to ``device`` (other values as they are).

    ``drop_labels``: leave out the ``"labels"`` key (for forwards that must not compute a loss).
    """
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()
            if not (drop_labels and k == "labels")}


def token_mask(batch: Mapping[str, object]) -> Tensor | None:
    """The (B, T) real-token mask of a text batch (its 2-D ``attention_mask`` as bool), or None."""
    mask = batch.get("attention_mask")
    return mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None


def real_tokens(t: Tensor, mask: Tensor | None) -> Tensor:
    """The rows of ``t`` (B, T, ..., C) at real tokens, as (N, ..., C); ``t`` unchanged when ``mask``
    is None or does not match its first two dims (e.g. a pooled (B, C) tensor)."""
    if mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return t
    return t[mask.to(t.device)]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module with neither (e.g. an
    ONNX Runtime session behind the module interface)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block, then restore every submodule's own flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def jsonable(obj: object) -> object:
    """A JSON-friendly copy: dataclasses and mappings -> dicts, sequences -> lists, tensors -> lists,
    numbers/strings/None as they are, anything else (e.g. a callable) -> its ``repr``."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    return repr(obj)
