"""The run directory of `s2d run` and what it stores: per (arm, seed) results and per PTQ cell results,
each with the per-example outcomes on the test split, written atomically as soon as they are known.

    fingerprint.json                        config fingerprint + merged config; another config is refused
    arms/<arm>@s<seed>/result.json          ArmResult (present = finished: never retrained)
    arms/<arm>@s<seed>/model.safetensors    final weights
    arms/<arm>@s<seed>/train/               training checkpoints while it runs (resume), removed after
    cells/<arm>@s<seed>__<method>__<WxAy>.json   CellResult (present = finished: never recomputed)
    deployed/<arm>@s<seed>.json / .onnx     DeployedResult and its ONNX file ([deploy] int8 = true)
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from s2d.pipeline.config import ExperimentConfig
from s2d.utils import write_json

__all__ = ["CellResult", "ArmResult", "DeployedResult", "RunDir", "pack_outcomes", "unpack_outcomes"]


def pack_outcomes(values: torch.Tensor | np.ndarray) -> dict:
    """Per-example outcomes (N,) -> JSON: 0/1 correctness as {"n": N, "bits": hex of the packed bits}
    (1,280 examples in 320 characters), float values (per-example NLL) as {"n": N, "f32": hex of float32}."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind == "f":
        return {"n": int(arr.size), "f32": arr.astype("<f4").tobytes().hex()}
    arr = arr.astype(bool)
    return {"n": int(arr.size), "bits": np.packbits(arr).tobytes().hex()}


def unpack_outcomes(packed: dict) -> np.ndarray:
    """The inverse of :func:`pack_outcomes`: (N,) bool, or (N,) float32 for float values."""
    if "f32" in packed:
        return np.frombuffer(bytes.fromhex(packed["f32"]), dtype="<f4")[: packed["n"]].copy()
    raw = np.frombuffer(bytes.fromhex(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(raw)[: packed["n"]].astype(bool)


@dataclass
class CellResult:
    """One arm and seed quantized post-training with ``method`` at W``w_bits``A``a_bits``."""
    arm: str                   # arm name
    seed: int                  # training seed
    method: str                # PTQ method name
    bits: str                  # the setting's label, e.g. "W4A4"
    w_bits: int
    a_bits: int
    accuracy: float            # top-1 on the test split, in [0, 1]
    wall_s: float              # seconds to quantize and evaluate
    correct: dict = field(default_factory=dict)   # per-test-example correctness, see pack_outcomes
    nll: dict | None = None    # causal LMs: per-test-example NLL of the text, nats/token (pack_outcomes)


@dataclass
class ArmResult:
    """One arm trained with one seed."""
    name: str
    seed: int                  # training seed
    kind: str                  # one of ARM_KINDS, or "sweep"
    optimizer: str
    s2d_config: dict | None    # the arm's S2DConfig (None: no S2D)
    qat_bits: str | None       # QAT arms: the label of their bits
    fp_accuracy: float         # test accuracy in float (QAT arms: through the float path)
    qat_accuracy: float | None  # QAT arms: test accuracy at their own bits
    train: dict                # the TrainResult
    probes: list[dict] = field(default_factory=list)           # LayerReport dicts (per-layer table)
    activations: dict[str, dict] = field(default_factory=dict)  # FFN layer -> ActivationStats dict (violins)
    wall_s: float = 0.0
    fp_correct: dict = field(default_factory=dict)   # per-test-example correctness in float (pack_outcomes)
    qat_correct: dict | None = None                  # QAT arms: the same at their own bits
    fp_nll: dict | None = None                       # causal LMs: per-test-example text NLL in float
    alignment: list[dict] = field(default_factory=list)  # PairAlignment dicts of every block pair (s2d.probes)


@dataclass
class DeployedResult:
    """One arm and seed's best W8A8 cell, exported to ONNX QDQ and run on ONNX Runtime's integer kernels."""
    arm: str
    seed: int
    method: str                # the PTQ method of the arm's best W8A8 cell for this seed
    fake_accuracy: float       # s2d's fake-quantized model on the test split, in [0, 1]
    accuracy: float            # the exported file on ONNX Runtime, same examples
    agreement: float           # share of test examples where both predict the same class
    file_mib: float            # size of the .onnx file
    fp32_ms: float             # torch float model: median ms per test batch
    int8_ms: float             # ONNX Runtime on the exported file: median ms per test batch
    integer_ops: dict = field(default_factory=dict)  # ONNX Runtime integer op -> count after its fusions
    deployed_correct: dict = field(default_factory=dict)  # per-test-example correctness (pack_outcomes)
    selected_by: str = "best W8A8 cell"  # how ``method`` was chosen


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=@-]", "_", name)


class RunDir:
    """The run directory: fingerprint check and per-arm / per-cell results.

    Under several processes (accelerate launch / torchrun) only the main one (``writer=True``) writes.
    """

    def __init__(self, root: Path | str, writer: bool = True):
        self.root = Path(root)
        self.writer = writer

    def check(self, cfg: ExperimentConfig) -> bool:
        """Whether the directory already belongs to ``cfg``; ValueError if it holds another config's run
        or other files. Writes nothing."""
        fp_file = self.root / "fingerprint.json"
        if fp_file.exists():
            try:
                old = json.loads(fp_file.read_text()).get("fingerprint")
            except (json.JSONDecodeError, AttributeError):
                old = None
            if old != cfg.fingerprint():
                raise ValueError(f"{self.root} holds a run of a different config (fingerprint "
                                 f"{old} != {cfg.fingerprint()}); use another --out")
            return True
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(f"{self.root} is not empty and holds no s2d run (no fingerprint.json); "
                             "use an empty or new --out directory")
        return False

    def claim(self, cfg: ExperimentConfig) -> bool:
        """Bind the directory to ``cfg`` (see :meth:`check`); returns True when this call bound it."""
        if self.check(cfg):
            return False
        if self.writer:
            write_json(self.root / "fingerprint.json", {"fingerprint": cfg.fingerprint(), "config": cfg.raw})
        return True

    def release_if_unused(self) -> bool:
        """Unbind the directory when nothing was computed in it (only the fingerprint and empty folders):
        a run that failed before its first checkpoint or result leaves the folder free for any config."""
        files = [p for p in self.root.rglob("*") if p.is_file()] if self.root.exists() else []
        if not self.writer or [p.name for p in files] != ["fingerprint.json"]:
            return False
        files[0].unlink()
        for d in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        return True

    def arm_dir(self, arm: str, seed: int) -> Path:
        return self.root / "arms" / f"{_slug(arm)}@s{seed}"

    def load_arm(self, arm: str, seed: int) -> ArmResult | None:
        path = self.arm_dir(arm, seed) / "result.json"
        return ArmResult(**json.loads(path.read_text())) if path.exists() else None

    def save_arm(self, res: ArmResult) -> None:
        if self.writer:
            write_json(self.arm_dir(res.name, res.seed) / "result.json", dataclasses.asdict(res))

    def cell_path(self, arm: str, seed: int, method: str, bits: str) -> Path:
        return self.root / "cells" / f"{_slug(arm)}@s{seed}__{method}__{bits}.json"

    def load_cell(self, arm: str, seed: int, method: str, bits: str) -> CellResult | None:
        path = self.cell_path(arm, seed, method, bits)
        return CellResult(**json.loads(path.read_text())) if path.exists() else None

    def save_cell(self, cell: CellResult) -> None:
        if self.writer:
            write_json(self.cell_path(cell.arm, cell.seed, cell.method, cell.bits), dataclasses.asdict(cell))

    def sensitivity_path(self, arm: str, seed: int) -> Path:
        return self.root / "sensitivity" / f"{_slug(arm)}@s{seed}.json"

    def load_sensitivity(self, arm: str, seed: int) -> dict | None:
        """A finished arm's SensitivityReport dict, or None."""
        path = self.sensitivity_path(arm, seed)
        return json.loads(path.read_text()) if path.exists() else None

    def save_sensitivity(self, arm: str, seed: int, report: dict) -> None:
        if self.writer:
            write_json(self.sensitivity_path(arm, seed), report)

    def deployed_path(self, arm: str, seed: int, suffix: str = ".json") -> Path:
        return self.root / "deployed" / f"{_slug(arm)}@s{seed}{suffix}"

    def load_deployed(self, arm: str, seed: int) -> DeployedResult | None:
        path = self.deployed_path(arm, seed)
        return DeployedResult(**json.loads(path.read_text())) if path.exists() else None

    def save_deployed(self, res: DeployedResult) -> None:
        if self.writer:
            write_json(self.deployed_path(res.arm, res.seed), dataclasses.asdict(res))
