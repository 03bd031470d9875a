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
    results.json, report.md, figures/*.png   written by s2d.pipeline.report at the end
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader

from s2d.data import Loaders, build_loaders, calibration_batches
from s2d.models import ModelBundle, ffn_modules, load
from s2d.pipeline.config import ArmConfig, DataConfig, ExperimentConfig, ModelConfig, scale_interval
from s2d.pipeline.provenance import machine, versions
from s2d.probes import capture_activations, spectral_table
from s2d.quant import QuantConfig, available_methods, quantize_model, set_quantization
from s2d.quant.qat import convert_qat
from s2d.regularizer import S2DConfig
from s2d.train import evaluate, finetune
from s2d.utils import jsonable, write_json

logger = logging.getLogger(__name__)


@dataclass
class CellResult:
    """Accuracy of one arm quantized post-training with ``method`` at W``w_bits``A``a_bits``."""
    arm: str                   # arm name
    method: str                # PTQ method name
    bits: str                  # the setting's label, e.g. "W4A4"
    w_bits: int
    a_bits: int
    accuracy: float            # top-1 on the test split, in [0, 1]
    wall_s: float              # seconds to quantize and evaluate


@dataclass
class ArmResult:
    """One trained arm."""
    name: str
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


@dataclass
class ExperimentResult:
    """Everything :mod:`s2d.pipeline.report` needs."""
    config: dict               # the merged config
    fingerprint: str
    arms: dict[str, dict]      # arm name -> ArmResult dict
    cells: list[dict]          # CellResult dicts
    methods: list[str]         # PTQ methods run
    notes: list[str]           # what the run changed on its own (e.g. a scaled S2D interval)
    wall_s: float              # seconds of this invocation
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, object] = field(default_factory=dict)


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

def load_task(model: ModelConfig, data: DataConfig, *, batch_size: int = 32, eval_batch_size: int = 64,
              seed: int = 0) -> tuple[ModelBundle, Loaders]:
    """Pretrained bundle with a fresh classification head sized for the data, and the data loaders."""
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


def probe_model(model: nn.Module, batches: list[dict], s2d_config: S2DConfig | None, sample_size: int,
                progress: bool) -> tuple[list[dict], dict[str, dict]]:
    """Per-layer spectral table (all Linears) and FFN activation statistics with samples."""
    k_max = s2d_config.k_max if s2d_config is not None else 3
    tau = s2d_config.tau if s2d_config is not None else 0.95
    table = spectral_table(model, batches, k_max=k_max, tau=tau, progress=progress)
    acts = capture_activations(model, batches, modules=ffn_modules(model), sample_size=sample_size,
                               progress=progress)
    return [jsonable(r) for r in table], {k: jsonable(v) for k, v in acts.items()}


def ptq_cell(float_model: nn.Module, quant_config: QuantConfig, method: str, calib: list[dict],
             loader: DataLoader, progress: bool, config: object = None) -> float:
    """Accuracy of a deepcopy of ``float_model`` quantized with ``method`` (and its ``config``)."""
    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, quant_config, method=method, calib=calib, config=config, progress=progress)
    acc = evaluate(qmodel, loader, progress=progress)
    del qmodel
    return acc


@dataclass
class _Task:
    """What every arm of a run shares."""
    cfg: ExperimentConfig
    run: RunDir
    pristine: nn.Module            # the pretrained model with its fresh head, never trained
    bundle: ModelBundle
    loaders: Loaders
    calib: list[dict]              # calibration batches (PTQ and QAT)
    probe_batches: list[dict]      # test batches of the per-layer probes
    methods: list[str]             # PTQ methods of the grid
    progress: bool


def train_arm(arm: ArmConfig, task: _Task) -> tuple[ArmResult, nn.Module]:
    """Fine-tune one arm from the pristine model, evaluate and probe it; returns (result, model)."""
    cfg, run, loaders, progress = task.cfg, task.run, task.loaders, task.progress
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    arm_bundle = dataclasses.replace(task.bundle, model=copy.deepcopy(task.pristine))
    qat = cfg.quant.quant_config(arm.qat_bits) if arm.qat_bits else None
    if arm.optimizer == "muon" and arm.s2d_config is not None and arm.s2d_config.update == "coupled":
        logger.warning("%s: coupled S2D under Muon is orthogonalised together with the gradient; "
                       "update='decoupled' applies the penalty as specified", arm.name)
    train_dir = run.arm_dir(arm.name) / "train"
    tres = finetune(arm_bundle, loaders, cfg.train, optimizer=arm.optimizer, s2d_config=arm.s2d_config, qat=qat,
                    qat_calib=task.calib, out_dir=train_dir, progress=progress)
    model = arm_bundle.model
    qat_acc = None
    if qat is not None:
        model = convert_qat(model)
        qat_acc = evaluate(model, loaders.test, progress=progress)
        set_quantization(model, False)          # float path through the same weights
    model.eval()
    fp_acc = evaluate(model, loaders.test, progress=progress)
    probes, acts = probe_model(model, task.probe_batches, arm.s2d_config or cfg.s2d_config,
                               cfg.probes.sample_size, progress)
    if run.writer:
        save_model(model, str(run.arm_dir(arm.name) / "model.safetensors"))
    res = ArmResult(name=arm.name, kind=arm.kind, optimizer=arm.optimizer, s2d_config=jsonable(arm.s2d_config),
                    qat_bits=arm.qat_bits.name if arm.qat_bits else None, fp_accuracy=fp_acc,
                    qat_accuracy=qat_acc, train=jsonable(tres), probes=probes, activations=acts,
                    wall_s=time.perf_counter() - t0)
    run.save_arm(res)
    if run.writer:
        shutil.rmtree(train_dir, ignore_errors=True)   # optimizer state is large; final weights are kept
    logger.info("arm %s: fp acc %.4f%s (%.0f s)", arm.name, fp_acc,
                f", QAT {res.qat_bits} acc {qat_acc:.4f}" if qat_acc is not None else "", res.wall_s)
    return res, model


def load_arm_model(arm: ArmConfig, pristine: nn.Module, run: RunDir) -> nn.Module:
    """The finished float arm's model: pristine architecture + saved weights."""
    model = copy.deepcopy(pristine)
    load_model(model, str(run.arm_dir(arm.name) / "model.safetensors"))
    return model.eval()


def resolve_arms(cfg: ExperimentConfig, total_steps: int) -> tuple[list[ArmConfig], list[str]]:
    """Arms with the S2D interval scaled for short runs (sweep arms over ``interval`` keep theirs)."""
    arms, notes = [], []
    for arm in cfg.arms:
        if arm.s2d_config is not None and not arm.name.startswith("adamw+s2d[interval="):
            s2d_config, note = scale_interval(arm.s2d_config, total_steps, cfg.min_refreshes)
            if note and note not in notes:
                notes.append(note)
            arm = dataclasses.replace(arm, s2d_config=s2d_config)
        arms.append(arm)
    return arms, notes


# --------------------------------------------------------------------------- the job

CellFn = Callable[[nn.Module, QuantConfig, str, list[dict], DataLoader, bool, object], float]


def run_experiment(cfg: ExperimentConfig, out_dir: Path | str, progress: bool = True,
                   cell_fn: CellFn = ptq_cell) -> ExperimentResult:
    """Run (or continue) every arm and PTQ cell of ``cfg`` in ``out_dir``; returns the collected results.

    Finished arms and cells found in ``out_dir`` are reused, never recomputed; ``cell_fn`` computes one
    PTQ cell (injectable for tests).
    """
    t0 = time.perf_counter()
    state = PartialState()      # joins the process group under accelerate launch / torchrun; else a no-op
    run = RunDir(out_dir, writer=state.is_main_process)
    run.check(cfg)              # another config's folder is refused before anything is loaded
    bundle, loaders = load_task(cfg.model, cfg.data, batch_size=cfg.train.batch_size,
                                eval_batch_size=cfg.train.eval_batch_size, seed=cfg.seed)
    claimed = run.claim(cfg)    # only now: bad data or a bad model never locks the folder
    state.wait_for_everyone()
    try:
        return _run_arms(cfg, run, bundle, loaders, progress, cell_fn, t0)
    except BaseException:
        if claimed and run.release_if_unused():
            logger.info("%s: nothing was computed; the folder is free again", run.root)
        raise


def _run_arms(cfg: ExperimentConfig, run: RunDir, bundle: ModelBundle, loaders: Loaders, progress: bool,
              cell_fn: CellFn, t0: float) -> ExperimentResult:
    """Every arm of ``cfg`` and its PTQ cells, reusing what ``run`` already holds."""
    state = PartialState()
    arms, notes = resolve_arms(cfg, cfg.train.total_steps(len(loaders.train)))
    task = _Task(cfg=cfg, run=run, pristine=bundle.model, bundle=bundle, loaders=loaders,
                 calib=calibration_batches(loaders, num_samples=cfg.data.calib_samples,
                                           batch_size=min(cfg.data.calib_samples, cfg.train.eval_batch_size),
                                           seed=cfg.seed),
                 probe_batches=list(islice(iter(loaders.test), cfg.probes.batches)),
                 methods=[m for m in available_methods() if "all" in cfg.quant.methods or m in cfg.quant.methods],
                 progress=progress)
    results: dict[str, dict] = {}
    cells: list[dict] = []
    for i, arm in enumerate(arms):
        res = run.load_arm(arm.name)
        model = None
        if res is None:
            logger.info("arm %d/%d: %s", i + 1, len(arms), arm.name)
            res, model = train_arm(arm, task)
        else:
            logger.info("arm %s: finished earlier, reusing its results", arm.name)
        results[arm.name] = dataclasses.asdict(res)
        if arm.qat_bits is None:
            cells += _run_cells(arm, task, model, cell_fn)
        del model
        state.wait_for_everyone()
    return ExperimentResult(config=cfg.raw, fingerprint=cfg.fingerprint(), arms=results, cells=cells,
                            methods=task.methods, notes=notes, wall_s=time.perf_counter() - t0,
                            versions=versions(), machine=machine())


def _run_cells(arm: ArmConfig, task: _Task, model: nn.Module | None, cell_fn: CellFn) -> list[dict]:
    """Every PTQ cell of a float arm (saved ones are read back); ``model``: the trained arm or None."""
    cells = []
    grid = task.cfg.quant
    for bits in grid.bits:
        for method in task.methods:
            if not grid.runs(method, bits):
                continue
            cell = task.run.load_cell(arm.name, method, bits.name)
            if cell is None:
                if model is None:
                    model = load_arm_model(arm, task.pristine, task.run)
                tc = time.perf_counter()
                acc = cell_fn(model, grid.quant_config(bits), method, task.calib, task.loaders.test, task.progress,
                              grid.method_config(method))
                cell = CellResult(arm.name, method, bits.name, bits.w, bits.a, acc, time.perf_counter() - tc)
                task.run.save_cell(cell)
                logger.info("PTQ %s %s %s: %.4f", arm.name, method, cell.bits, acc)
            cells.append(dataclasses.asdict(cell))
    return cells
