"""The main job (`s2d run`): arms x PTQ methods x bit settings -> results, resumable.

For every arm (AdamW, AdamW+S2D, Muon, S2D-all, QAT, QAT+S2D, sweep arms) the same pretrained model
is fine-tuned with the same seed, data order and schedule; then full-precision accuracy, probes
(per-layer σ_max, PCDR_k, max |a|, kurtosis, activation samples) and, for float arms, PTQ accuracy
for every registered method at every bit setting (each cell on a deepcopy of the arm's float model).

Run directory layout (everything JSON is written atomically as soon as it is known):
    fingerprint.json             config fingerprint + merged config; another config is refused
    arms/<arm>/result.json       ArmResult (present = arm finished: never retrained)
    arms/<arm>/model.safetensors final weights of the arm
    arms/<arm>/train/            training checkpoints while the arm runs (resume), removed after
    cells/<arm>__<method>__<WxAy>.json   CellResult (present = cell finished: never recomputed)
    results.json, report.md, figures/*.png   written by s2d.report at the end
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from s2d.config import ArmSpec, DataSpec, ExperimentConfig, ModelSpec, available_methods, bits_name, scale_interval
from s2d.train import _jsonable, evaluate, ffn_modules, finetune

logger = logging.getLogger(__name__)


@dataclass
class CellResult:
    """Accuracy of one arm quantized post-training with `method` at W`w_bits`A`a_bits`."""
    arm: str
    method: str
    bits: str
    w_bits: int
    a_bits: int
    accuracy: float
    wall_s: float


@dataclass
class ArmResult:
    """One trained arm. `qat_accuracy` is the accuracy at the arm's own QAT bits (QAT arms only);
    `probes` are `LayerReport` dicts; `activations` map FFN layer -> ActivationStats dict (violins)."""
    name: str
    kind: str
    optimizer: str
    s2d: dict | None
    qat_bits: str | None
    fp_accuracy: float
    qat_accuracy: float | None
    train: dict
    probes: list[dict] = field(default_factory=list)
    activations: dict[str, dict] = field(default_factory=dict)
    wall_s: float = 0.0


@dataclass
class ExperimentResult:
    """Everything `s2d.report` needs."""
    config: dict
    fingerprint: str
    arms: dict[str, dict]
    cells: list[dict]
    methods: list[str]
    notes: list[str]
    wall_s: float
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=@-]", "_", name)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: temp file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)


class RunDir:
    """The run directory: fingerprint check and per-arm / per-cell results.

    Under several processes (accelerate launch / torchrun) only the main one (`writer=True`) writes.
    """

    def __init__(self, root: Path | str, writer: bool = True):
        self.root = Path(root)
        self.writer = writer

    def claim(self, cfg: ExperimentConfig) -> None:
        """Bind the directory to `cfg`; refuse (ValueError) if it holds a run of another config."""
        fp_file = self.root / "fingerprint.json"
        if fp_file.exists():
            try:
                old = json.loads(fp_file.read_text()).get("fingerprint")
            except (json.JSONDecodeError, AttributeError):
                old = None
            if old != cfg.fingerprint():
                raise ValueError(f"{self.root} holds a run of a different config (fingerprint "
                                 f"{old} != {cfg.fingerprint()}); use another --out")
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(f"{self.root} is not empty and holds no s2d run (no fingerprint.json); "
                             "use an empty or new --out directory")
        if self.writer:
            write_json(fp_file, {"fingerprint": cfg.fingerprint(), "config": cfg.raw})

    def arm_dir(self, arm: str) -> Path:
        return self.root / "arms" / _slug(arm)

    def load_arm(self, arm: str) -> ArmResult | None:
        path = self.arm_dir(arm) / "result.json"
        return ArmResult(**json.loads(path.read_text())) if path.exists() else None

    def save_arm(self, res: ArmResult) -> None:
        if self.writer:
            write_json(self.arm_dir(res.name) / "result.json", dataclasses.asdict(res))

    def cell_path(self, arm: str, method: str, bits: str) -> Path:
        return self.root / "cells" / f"{_slug(arm)}__{method}__{bits}.json"

    def load_cell(self, arm: str, method: str, bits: str) -> CellResult | None:
        path = self.cell_path(arm, method, bits)
        return CellResult(**json.loads(path.read_text())) if path.exists() else None

    def save_cell(self, cell: CellResult) -> None:
        if self.writer:
            write_json(self.cell_path(cell.arm, cell.method, cell.bits), dataclasses.asdict(cell))


# --------------------------------------------------------------------------- pieces

def load_task(model: ModelSpec, data: DataSpec, *, batch_size: int = 32, eval_batch_size: int = 64,
              seed: int = 0) -> tuple[Any, Any]:
    """Pretrained bundle with a fresh classification head sized for the data, and the data loaders."""
    from s2d.data import build_loaders
    from s2d.models import load

    torch.manual_seed(seed)
    bundle = load(model.name, num_labels=2, image_size=model.image_size)
    loaders = build_loaders(data.dataset, dataclasses.replace(bundle, num_labels=None), batch_size=batch_size,
                            eval_batch_size=eval_batch_size, data_format=data.format,
                            text_column=data.text_column, label_column=data.label_column,
                            max_length=data.max_length, image_size=data.image_size or model.image_size,
                            seed=seed, limit_train=data.limit_train, limit_eval=data.limit_eval)
    if loaders.num_labels != 2:                  # the head size comes from the data
        torch.manual_seed(seed)
        bundle = load(model.name, num_labels=loaders.num_labels, image_size=model.image_size)
    return bundle, loaders


def quant_spec(bits: tuple[int, int], extra: dict) -> Any:
    from s2d.quant.apply import QuantSpec

    return QuantSpec(w_bits=bits[0], a_bits=bits[1], **extra)


def probe_model(model: nn.Module, batches: list[dict], s2d_cfg: Any, sample_size: int,
                progress: bool) -> tuple[list[dict], dict[str, dict]]:
    """Per-layer spectral table (all Linears) and FFN activation statistics with samples."""
    from s2d.probes import capture_activations, spectral_table

    k_max = s2d_cfg.k_max if s2d_cfg is not None else 3
    tau = s2d_cfg.tau if s2d_cfg is not None else 0.95
    table = spectral_table(model, batches, k_max=k_max, tau=tau, progress=progress)
    acts = capture_activations(model, batches, modules=ffn_modules(model), sample_size=sample_size,
                               progress=progress)
    return [_jsonable(r) for r in table], {k: _jsonable(v) for k, v in acts.items()}


def ptq_cell(float_model: nn.Module, spec: Any, method: str, calib: list[dict], loader: Any,
             progress: bool, config: Any = None) -> float:
    """Accuracy of a deepcopy of `float_model` quantized with `method` (and its `config`) at `spec`."""
    from s2d.quant.apply import quantize_model

    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, spec, method=method, calib=calib, config=config, progress=progress)
    acc = evaluate(qmodel, loader, progress=progress)
    del qmodel
    return acc


def train_arm(arm: ArmSpec, cfg: ExperimentConfig, pristine: nn.Module, bundle: Any, loaders: Any,
              run: RunDir, probe_batches: list[dict], calib: list[dict] | None,
              progress: bool) -> tuple[ArmResult, nn.Module]:
    """Fine-tune one arm from the pristine model, evaluate and probe it; returns (result, model)."""
    from safetensors.torch import save_model

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    arm_bundle = dataclasses.replace(bundle, model=copy.deepcopy(pristine))
    qat = quant_spec(arm.qat_bits, cfg.quant.spec) if arm.qat_bits else None
    if arm.optimizer == "muon" and arm.s2d is not None and arm.s2d.update == "coupled":
        logger.warning("%s: coupled S2D under Muon is orthogonalised together with the gradient; "
                       "update='decoupled' applies the penalty as specified", arm.name)
    train_dir = run.arm_dir(arm.name) / "train"
    tres = finetune(arm_bundle, loaders, cfg.train, optimizer=arm.optimizer, s2d=arm.s2d, qat=qat,
                    qat_calib=calib, out_dir=train_dir, progress=progress)
    model = arm_bundle.model
    qat_acc = None
    if qat is not None:
        from s2d.quant.apply import set_quantization
        from s2d.quant.qat import convert_qat

        model = convert_qat(model)
        qat_acc = evaluate(model, loaders.test, progress=progress)
        set_quantization(model, False)          # float path through the same weights
    model.eval()
    fp_acc = evaluate(model, loaders.test, progress=progress)
    probes, acts = probe_model(model, probe_batches, arm.s2d or cfg.s2d, cfg.probes.sample_size, progress)
    if run.writer:
        save_model(model, str(run.arm_dir(arm.name) / "model.safetensors"))
    res = ArmResult(name=arm.name, kind=arm.kind, optimizer=arm.optimizer, s2d=_jsonable(arm.s2d),
                    qat_bits=bits_name(arm.qat_bits) if arm.qat_bits else None, fp_accuracy=fp_acc,
                    qat_accuracy=qat_acc, train=_jsonable(tres), probes=probes, activations=acts,
                    wall_s=time.perf_counter() - t0)
    run.save_arm(res)
    if run.writer:
        shutil.rmtree(train_dir, ignore_errors=True)   # optimizer state is large; final weights are kept
    logger.info("arm %s: fp acc %.4f%s (%.0f s)", arm.name, fp_acc,
                f", QAT {res.qat_bits} acc {qat_acc:.4f}" if qat_acc is not None else "", res.wall_s)
    return res, model


def load_arm_model(arm: ArmSpec, pristine: nn.Module, run: RunDir) -> nn.Module:
    """The finished float arm's model: pristine architecture + saved weights."""
    from safetensors.torch import load_model

    model = copy.deepcopy(pristine)
    load_model(model, str(run.arm_dir(arm.name) / "model.safetensors"))
    return model.eval()


def resolve_arms(cfg: ExperimentConfig, total_steps: int) -> tuple[list[ArmSpec], list[str]]:
    """Arms with the S2D interval scaled for short runs (sweep arms over `interval` keep theirs)."""
    arms, notes = [], []
    for arm in cfg.arms:
        if arm.s2d is not None and not arm.name.startswith("adamw+s2d[interval="):
            s2d, note = scale_interval(arm.s2d, total_steps, cfg.min_refreshes)
            if note and note not in notes:
                notes.append(note)
            arm = dataclasses.replace(arm, s2d=s2d)
        arms.append(arm)
    return arms, notes


# --------------------------------------------------------------------------- the job

def run_experiment(cfg: ExperimentConfig, out_dir: Path | str, progress: bool = True,
                   cell_fn: Callable[..., float] = ptq_cell) -> ExperimentResult:
    """Run (or continue) every arm and PTQ cell of `cfg` in `out_dir`; returns the collected results.

    Finished arms and cells found in `out_dir` are reused, never recomputed; `cell_fn` computes one
    PTQ cell (injectable for tests).
    """
    from s2d.data import calibration_batches

    t0 = time.perf_counter()
    from accelerate import PartialState

    state = PartialState()      # joins the process group under accelerate launch / torchrun; else a no-op
    run = RunDir(out_dir, writer=state.is_main_process)
    run.claim(cfg)
    state.wait_for_everyone()
    bundle, loaders = load_task(cfg.model, cfg.data, batch_size=cfg.train.batch_size,
                                eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed)
    pristine = bundle.model
    total = cfg.train.total_steps(len(loaders.train))
    arms, notes = resolve_arms(cfg, total)
    methods = [m for m in available_methods() if "all" in cfg.quant.methods or m in cfg.quant.methods]
    calib = calibration_batches(loaders, num_samples=cfg.data.calib_samples,
                                batch_size=min(cfg.data.calib_samples, cfg.train.eval_batch_size), seed=cfg.seed)
    probe_batches = list(islice(iter(loaders.test), cfg.probes.batches))
    results: dict[str, dict] = {}
    cells: list[dict] = []
    for i, arm in enumerate(arms):
        res = run.load_arm(arm.name)
        model = None
        if res is None:
            logger.info("arm %d/%d: %s", i + 1, len(arms), arm.name)
            res, model = train_arm(arm, cfg, pristine, bundle, loaders, run, probe_batches, calib, progress)
        else:
            logger.info("arm %s: finished earlier, reusing its results", arm.name)
        results[arm.name] = dataclasses.asdict(res)
        if arm.qat_bits is not None:
            continue
        for bits in cfg.quant.bits:
            for method in methods:
                if not cfg.quant.runs(method, bits):
                    continue
                cell = run.load_cell(arm.name, method, bits_name(bits))
                if cell is None:
                    if model is None:
                        model = load_arm_model(arm, pristine, run)
                    tc = time.perf_counter()
                    acc = cell_fn(model, quant_spec(bits, cfg.quant.spec), method, calib, loaders.test, progress,
                                  cfg.quant.method_config(method))
                    cell = CellResult(arm.name, method, bits_name(bits), bits[0], bits[1], acc,
                                      time.perf_counter() - tc)
                    run.save_cell(cell)
                    logger.info("PTQ %s %s %s: %.4f", arm.name, method, cell.bits, acc)
                cells.append(dataclasses.asdict(cell))
        del model
        state.wait_for_everyone()
    from s2d.report import machine, versions

    return ExperimentResult(config=cfg.raw, fingerprint=cfg.fingerprint(), arms=results, cells=cells,
                            methods=methods, notes=notes, wall_s=time.perf_counter() - t0,
                            versions=versions(), machine=machine())

