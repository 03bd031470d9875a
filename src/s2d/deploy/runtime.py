"""Run an exported ONNX classifier with ONNX Runtime behind the torch classifier interface.

``OnnxClassifier(path)(**batch).logits`` is a (B, num_labels) torch tensor, so
:func:`s2d.train.evaluate_outcomes` and the rest of s2d score it like the torch model.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import torch
from torch import Tensor, nn

from s2d.deploy.onnx_export import session_options, sidecar_path

__all__ = ["OPTIMIZATION_LEVELS", "OnnxClassifier", "read_sidecar", "pad_to_length", "median_ms"]

# ONNX Runtime's graph optimization levels by name. "all" adds layout transforms (NCHWc convolutions) that
# change float summation order; "extended" keeps every QDQ fusion (integer kernels) without them.
OPTIMIZATION_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def read_sidecar(path: str | Path) -> dict:
    """The ``<name>.s2d.json`` that :func:`s2d.deploy.export_onnx` wrote beside ``path``."""
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"{side}: missing; export the model with `s2d export` (it writes this file)")
    return json.loads(side.read_text())


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session (CPU) with the call signature of a Hugging Face classifier.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        optimization: a key of :data:`OPTIMIZATION_LEVELS`.
    """

    def __init__(self, path: str | Path, threads: int | None = None, optimization: str = "all") -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, session_options(OPTIMIZATION_LEVELS[optimization], threads=threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.static_shape = read_sidecar(path).get("static_shape") if sidecar_path(path).is_file() else None

    def forward(self, **batch: Tensor) -> SimpleNamespace:
        feeds = {n: batch[n].detach().cpu() for n in self.input_names}
        if self.static_shape is None:
            return SimpleNamespace(logits=self._run(feeds))
        rows, step = feeds["input_ids"].shape[0], self.static_shape[0]
        feeds = pad_to_length(feeds, self.static_shape[1])
        chunks = [self._run({n: _fill_rows(v[i:i + step], step) for n, v in feeds.items()})[: min(step, rows - i)]
                  for i in range(0, rows, step)]
        return SimpleNamespace(logits=torch.cat(chunks))

    def _run(self, feeds: dict[str, Tensor]) -> Tensor:
        (logits,) = self.session.run(["logits"], {n: v.numpy() for n, v in feeds.items()})
        return torch.from_numpy(logits)


def pad_to_length(batch: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """Right-pad every (B, T) tensor of ``batch`` with zeros to (B, ``length``): padding tokens with mask 0,
    which a causal model read at its last real token never sees. ValueError if T > ``length``."""
    t = batch["input_ids"].shape[1]
    if t > length:
        raise ValueError(f"sequences of {t} tokens; this ONNX file was exported for at most {length} "
                         f"(export it again with a longer example)")
    return {k: torch.nn.functional.pad(v, (0, length - t)) if v.ndim == 2 else v for k, v in batch.items()}


def _fill_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` (b, ...) with its first row repeated up to ``rows`` rows (their outputs are dropped)."""
    return x if x.shape[0] == rows else torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


def median_ms(call: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of ``call()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)
