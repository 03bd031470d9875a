"""The main job (`s2d run`): arms x seeds x PTQ methods x bit settings -> results, resumable.

For every seed and arm (AdamW, AdamW+S2D, Muon, S2D-all, QAT, QAT+S2D, sweep arms) the same pretrained
model is fine-tuned; within a seed every arm shares the initial head, the data order, the dropout
masks and the calibration batches, so that arms compare paired. Then full-precision accuracy, probes
(per-layer σ_max, PCDR_k, max |a|, kurtosis, activation samples) and, for float arms, PTQ accuracy
for every registered method at every bit setting (each cell on a deepcopy of the arm's float model).
Every evaluation keeps its per-example outcomes, so any comparison can be recomputed
(:mod:`s2d.stats`, :mod:`s2d.pipeline.tables`). The run directory is :mod:`s2d.pipeline.rundir`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
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
from s2d.models import CausalLMClassifier, ModelBundle, ffn_modules, load, with_label_words
from s2d.pipeline.config import DEFAULT_PROMPT, ArmConfig, DataConfig, ExperimentConfig, ModelConfig, scale_interval
from s2d.pipeline.deployed import deploy_best
from s2d.pipeline.provenance import machine, versions
from s2d.pipeline.rundir import ArmResult, CellResult, RunDir, pack_outcomes
from s2d.probes import capture_activations, pair_alignments, spectral_table
from s2d.quant import Bits, QuantConfig, available_methods, quantize_model, set_quantization
from s2d.quant.api import check_method
from s2d.quant.sensitivity import first_examples, site_sensitivity
from s2d.quant.qat import convert_qat
from s2d.regularizer import S2DConfig
from s2d.train import Outcomes, condition, evaluate_examples, evaluate_outcomes, finetune
from s2d.utils import jsonable

logger = logging.getLogger(__name__)


@dataclass
class ExperimentResult:
    """Everything :mod:`s2d.pipeline.report` needs."""
    config: dict               # the merged config
    fingerprint: str
    seeds: list[int]           # training seeds, in order
    arms: dict[str, dict]      # arm name -> {"kind", "optimizer", "s2d_config", "qat_bits"}
    runs: list[dict]           # ArmResult dicts, one per (arm, seed)
    cells: list[dict]          # CellResult dicts, one per (arm, seed, method, bits)
    methods: list[str]         # PTQ methods run
    notes: list[str]           # what the run changed on its own (e.g. a scaled S2D interval)
    wall_s: float              # seconds of this invocation
    sensitivity: dict[str, dict] = field(default_factory=dict)  # arm -> SensitivityReport dict (first seed)
    deployed: list[dict] = field(default_factory=list)  # DeployedResult dicts, one per float (arm, seed)
    versions: dict[str, str] = field(default_factory=dict)
    machine: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- pieces

def load_task(model: ModelConfig, data: DataConfig, *, batch_size: int = 32, eval_batch_size: int = 64,
              seed: int = 0) -> tuple[ModelBundle, Loaders]:
    """Pretrained bundle with a fresh classification head sized for the data, and the data loaders.

    A causal LM keeps its LM head: it reads ``data.prompt`` and answers with ``data.label_words``
    (:class:`s2d.models.CausalLMClassifier`).
    """
    torch.manual_seed(seed)
    bundle = load(model.name, num_labels=2, image_size=model.image_size)
    causal = isinstance(bundle.model, CausalLMClassifier)
    if not causal and (data.prompt is not None or data.label_words is not None):
        raise ValueError(f"data.prompt and data.label_words apply to causal LMs; {model.name} is {bundle.family}")
    loaders = build_loaders(data.dataset, dataclasses.replace(bundle, num_labels=None), batch_size=batch_size,
                            eval_batch_size=eval_batch_size, data_format=data.format,
                            text_column=data.text_column, label_column=data.label_column,
                            max_length=data.max_length, image_size=data.image_size or model.image_size,
                            seed=seed, limit_train=data.limit_train, limit_eval=data.limit_eval,
                            subset_seed=data.subset_seed, prompt=(data.prompt or DEFAULT_PROMPT) if causal else None)
    if causal:
        words = list(data.label_words or loaders.label_names)
        if len(words) != loaders.num_labels:
            raise ValueError(f"data.label_words has {len(words)} words but {data.dataset} has "
                             f"{loaders.num_labels} classes ({', '.join(loaders.label_names)})")
        bundle = with_label_words(bundle, words)
    elif loaders.num_labels != 2:                # the head size comes from the data
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
             loader: DataLoader, progress: bool, config: object = None) -> Outcomes:
    """Per-example outcomes of a deepcopy of ``float_model`` quantized with ``method``."""
    qmodel = copy.deepcopy(float_model)
    quantize_model(qmodel, quant_config, method=method, calib=calib, config=config, progress=progress)
    outcomes = evaluate_outcomes(qmodel, loader, progress=progress)
    del qmodel
    return outcomes


@dataclass
class _Task:
    """What every arm of one seed shares."""
    cfg: ExperimentConfig
    seed: int                      # the training seed
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
    cfg, run, loaders, progress, seed = task.cfg, task.run, task.loaders, task.progress, task.seed
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    arm_bundle = dataclasses.replace(task.bundle, model=copy.deepcopy(task.pristine))
    qat = cfg.quant.quant_config(arm.qat_bits) if arm.qat_bits else None
    if arm.optimizer == "muon" and arm.s2d_config is not None and arm.s2d_config.update == "coupled":
        logger.warning("%s: coupled S2D under Muon is orthogonalised together with the gradient; "
                       "update='decoupled' applies the penalty as specified", arm.name)
    train_dir = run.arm_dir(arm.name, seed) / "train"
    relative = arm.s2d_config is not None and arm.s2d_config.update == "relative"
    guard = first_examples(loaders.val, cfg.guard_examples) if relative and cfg.guard_examples else None
    tres = finetune(arm_bundle, loaders, dataclasses.replace(cfg.train, seed=seed), optimizer=arm.optimizer,
                    s2d_config=arm.s2d_config, qat=qat, qat_calib=task.calib, out_dir=train_dir, progress=progress,
                    guard_batches=guard, cd_config=arm.cd_config)
    model = arm_bundle.model
    qat_hits = None
    if qat is not None:
        model = convert_qat(model)
        qat_hits = evaluate_examples(model, loaders.test, progress=progress)
        set_quantization(model, False)          # float path through the same weights
    res = _finish_arm(arm, task, model, jsonable(tres), t0, qat_hits)
    if run.writer:
        shutil.rmtree(train_dir, ignore_errors=True)   # optimizer state is large; final weights are kept
    return res, model


CONDITION_SOURCE = "adamw"       # the arm whose trained model the adamw+condition arm conditions


def condition_arm(arm: ArmConfig, task: _Task) -> tuple[ArmResult, nn.Module]:
    """The ``adamw`` arm of this seed, conditioned without labels (:func:`s2d.train.condition`) on the
    training inputs, then evaluated and probed like a trained arm; returns (result, model)."""
    t0 = time.perf_counter()
    source = ArmConfig(CONDITION_SOURCE, CONDITION_SOURCE, "adamw")
    model = load_arm_model(source, task.seed, task.pristine, task.run)
    cfg = task.cfg
    guard = first_examples(task.loaders.val, cfg.condition.guard_examples) if cfg.condition.guard_examples else None
    cres = condition(model, task.loaders.train, dataclasses.replace(cfg.condition, seed=task.seed), arm.s2d_config,
                     guard_batches=guard, progress=task.progress)
    return _finish_arm(arm, task, model, jsonable(cres), t0), model


def _finish_arm(arm: ArmConfig, task: _Task, model: nn.Module, train: dict, t0: float,
                qat_hits: torch.Tensor | None = None) -> ArmResult:
    """Full-precision outcomes, probes and the saved weights of a trained arm; saves its ArmResult."""
    cfg, run, seed, progress = task.cfg, task.run, task.seed, task.progress
    model.eval()
    fp = evaluate_outcomes(model, task.loaders.test, progress=progress)
    fp_acc = float(fp.correct.float().mean())
    qat_acc = float(qat_hits.float().mean()) if qat_hits is not None else None
    probes, acts = probe_model(model, task.probe_batches, arm.s2d_config or cfg.s2d_config,
                               cfg.probes.sample_size, progress)
    if run.writer:
        run.arm_dir(arm.name, seed).mkdir(parents=True, exist_ok=True)
        save_model(model, str(run.arm_dir(arm.name, seed) / "model.safetensors"))
    res = ArmResult(name=arm.name, seed=seed, kind=arm.kind, optimizer=arm.optimizer,
                    s2d_config=jsonable(arm.s2d_config), qat_bits=arm.qat_bits.name if arm.qat_bits else None,
                    fp_accuracy=fp_acc, qat_accuracy=qat_acc, train=train, probes=probes,
                    activations=acts, wall_s=time.perf_counter() - t0, fp_correct=pack_outcomes(fp.correct),
                    qat_correct=pack_outcomes(qat_hits) if qat_hits is not None else None,
                    fp_nll=pack_outcomes(fp.nll) if fp.nll is not None else None,
                    alignment=[jsonable(p) for p in pair_alignments(model)])
    run.save_arm(res)
    logger.info("arm %s seed %d: fp acc %.4f%s (%.0f s)", arm.name, seed, fp_acc,
                f", QAT {res.qat_bits} acc {qat_acc:.4f}" if qat_acc is not None else "", res.wall_s)
    return res


def load_arm_model(arm: ArmConfig, seed: int, pristine: nn.Module, run: RunDir) -> nn.Module:
    """The finished float arm's model: pristine architecture + saved weights."""
    model = copy.deepcopy(pristine)
    load_model(model, str(run.arm_dir(arm.name, seed) / "model.safetensors"))
    return model.eval()


def resolve_arms(cfg: ExperimentConfig, total_steps: int) -> tuple[list[ArmConfig], list[str]]:
    """Arms with the S2D interval scaled for short runs (sweep arms over ``interval`` keep theirs)."""
    arms, notes = [], []
    for arm in cfg.arms:
        if arm.s2d_config is not None and not arm.name.startswith("adamw+s2d[interval="):
            steps = cfg.condition.steps if arm.kind == "adamw+condition" else total_steps
            s2d_config, note = scale_interval(arm.s2d_config, steps, cfg.min_refreshes)
            if note and note not in notes:
                notes.append(note)
            arm = dataclasses.replace(arm, s2d_config=s2d_config)
        arms.append(arm)
    return arms, notes


# --------------------------------------------------------------------------- the job

CellFn = Callable[[nn.Module, QuantConfig, str, list[dict], DataLoader, bool, object], "Outcomes | torch.Tensor"]


def run_experiment(cfg: ExperimentConfig, out_dir: Path | str, progress: bool = True,
                   cell_fn: CellFn = ptq_cell) -> ExperimentResult:
    """Run (or continue) every arm, seed and PTQ cell of ``cfg`` in ``out_dir``; returns the results.

    Finished (arm, seed) results and cells found in ``out_dir`` are reused, never recomputed;
    ``cell_fn`` computes one PTQ cell's :class:`~s2d.train.Outcomes` (or just its per-example correctness;
    injectable for tests).
    """
    t0 = time.perf_counter()
    state = PartialState()      # joins the process group under accelerate launch / torchrun; else a no-op
    run = RunDir(out_dir, writer=state.is_main_process)
    run.check(cfg)              # another config's folder is refused before anything is loaded
    first = _load(cfg, cfg.seeds[0])
    for method in _grid_methods(cfg):      # a method that cannot quantize this model fails now, not after training
        check_method(first[0].model, method, cfg.quant.method_config(method))
    claimed = run.claim(cfg)    # only now: bad data or a bad model never locks the folder
    state.wait_for_everyone()
    try:
        runs, cells, notes, methods, sensitivity, deployed = [], [], [], [], {}, []
        for seed in cfg.seeds:
            bundle, loaders = first if seed == cfg.seeds[0] else _load(cfg, seed)
            task, arms, seed_notes = _seed_task(cfg, seed, run, bundle, loaders, progress)
            notes += [n for n in seed_notes if n not in notes]
            methods = task.methods
            seed_runs, seed_cells = _run_arms(task, arms, cell_fn)
            runs += seed_runs
            cells += seed_cells
            if seed == cfg.seeds[0] and cfg.probes.sensitivity_examples:
                sensitivity = _run_sensitivity(task, arms, seed_runs, seed_cells)
            if cfg.deploy.int8:
                deployed += _run_deployed(task, arms, seed_cells)
    except BaseException:
        if claimed and run.release_if_unused():
            logger.info("%s: nothing was computed; the folder is free again", run.root)
        raise
    arm_info = {a.name: {"kind": a.kind, "optimizer": a.optimizer, "s2d_config": jsonable(a.s2d_config),
                         "cd_config": jsonable(a.cd_config),
                         "qat_bits": a.qat_bits.name if a.qat_bits else None} for a in arms}
    return ExperimentResult(config=cfg.raw, fingerprint=cfg.fingerprint(), seeds=list(cfg.seeds), arms=arm_info,
                            runs=runs, cells=cells, methods=methods, notes=notes,
                            wall_s=time.perf_counter() - t0, versions=versions(), machine=machine(),
                            sensitivity=sensitivity, deployed=deployed)


def _grid_methods(cfg: ExperimentConfig) -> list[str]:
    return [m for m in available_methods() if "all" in cfg.quant.methods or m in cfg.quant.methods]


def _load(cfg: ExperimentConfig, seed: int) -> tuple[ModelBundle, Loaders]:
    return load_task(cfg.model, cfg.data, batch_size=cfg.train.batch_size,
                     eval_batch_size=cfg.train.eval_batch_size, seed=seed)


def _seed_task(cfg: ExperimentConfig, seed: int, run: RunDir, bundle: ModelBundle, loaders: Loaders,
               progress: bool) -> tuple[_Task, list[ArmConfig], list[str]]:
    arms, notes = resolve_arms(cfg, cfg.train.total_steps(len(loaders.train)))
    task = _Task(cfg=cfg, seed=seed, run=run, pristine=bundle.model, bundle=bundle, loaders=loaders,
                 calib=calibration_batches(loaders, num_samples=cfg.data.calib_samples,
                                           batch_size=min(cfg.data.calib_samples, cfg.train.eval_batch_size),
                                           seed=seed),
                 probe_batches=list(islice(iter(loaders.test), cfg.probes.batches)),
                 methods=_grid_methods(cfg),
                 progress=progress)
    return task, arms, notes


def _run_arms(task: _Task, arms: list[ArmConfig], cell_fn: CellFn) -> tuple[list[dict], list[dict]]:
    """Every arm of one seed and its PTQ cells, reusing what the run directory already holds."""
    state = PartialState()
    runs: list[dict] = []
    cells: list[dict] = []
    for i, arm in enumerate(arms):
        res = task.run.load_arm(arm.name, task.seed)
        model = None
        if res is None:
            logger.info("seed %d, arm %d/%d: %s", task.seed, i + 1, len(arms), arm.name)
            res, model = (condition_arm if arm.kind == "adamw+condition" else train_arm)(arm, task)
        else:
            logger.info("arm %s seed %d: finished earlier, reusing its results", arm.name, task.seed)
        runs.append(dataclasses.asdict(res))
        if arm.qat_bits is None:
            cells += _run_cells(arm, task, model, cell_fn)
        del model
        state.wait_for_everyone()
    return runs, cells


def _run_cells(arm: ArmConfig, task: _Task, model: nn.Module | None, cell_fn: CellFn) -> list[dict]:
    """Every PTQ cell of a float arm and seed (saved ones are read back); ``model``: the trained arm or None."""
    cells = []
    grid = task.cfg.quant
    for bits in grid.bits:
        for method in task.methods:
            if not grid.runs(method, bits):
                continue
            cell = task.run.load_cell(arm.name, task.seed, method, bits.name)
            if cell is None:
                if model is None:
                    model = load_arm_model(arm, task.seed, task.pristine, task.run)
                tc = time.perf_counter()
                out = cell_fn(model, grid.quant_config(bits), method, task.calib, task.loaders.test, task.progress,
                              grid.method_config(method))
                out = out if isinstance(out, Outcomes) else Outcomes(out)
                cell = CellResult(arm.name, task.seed, method, bits.name, bits.w, bits.a,
                                  float(out.correct.float().mean()), time.perf_counter() - tc,
                                  pack_outcomes(out.correct), pack_outcomes(out.nll) if out.nll is not None else None)
                task.run.save_cell(cell)
                logger.info("PTQ %s seed %d %s %s: %.4f", arm.name, task.seed, method, cell.bits, cell.accuracy)
            cells.append(dataclasses.asdict(cell))
    return cells


SENSITIVITY_BASELINE = "adamw"   # the arm whose PTQ loss picks the sensitivity's bit setting
SENSITIVITY_DROP = 0.05          # ... the mildest setting at which it loses more than this accuracy


def sensitivity_bits(runs: list[dict], cells: list[dict], method: str) -> str | None:
    """The mildest bit setting (most bits) at which the baseline arm's ``method`` cell falls more than
    SENSITIVITY_DROP below its float accuracy (one seed's ``runs`` and ``cells``), or None."""
    fp = next((r["fp_accuracy"] for r in runs if r["name"] == SENSITIVITY_BASELINE), None)
    if fp is None:
        return None
    hurt = [Bits.parse(c["bits"]) for c in cells if c["arm"] == SENSITIVITY_BASELINE and c["method"] == method
            and fp - c["accuracy"] > SENSITIVITY_DROP]
    return max(hurt).name if hurt else None


def _run_sensitivity(task: _Task, arms: list[ArmConfig], runs: list[dict], cells: list[dict]) -> dict[str, dict]:
    """Per-site sensitivity of the baseline and every float S2D arm (resumable, one file per arm)."""
    method = "rtn" if "rtn" in task.methods else (task.methods or ["rtn"])[0]
    bits = sensitivity_bits(runs, cells, method)
    if bits is None:
        logger.info("sensitivity: %s loses <= %.0f pp at every setting; skipped", SENSITIVITY_BASELINE,
                    100 * SENSITIVITY_DROP)
        return {}
    n = task.cfg.probes.sensitivity_examples
    test = first_examples(task.loaders.test, n)
    out = {}
    for arm in arms:
        if arm.qat_bits is not None or not (arm.name == SENSITIVITY_BASELINE or arm.s2d_config is not None):
            continue
        rep = task.run.load_sensitivity(arm.name, task.seed)
        if rep is None:
            model = load_arm_model(arm, task.seed, task.pristine, task.run)
            rep = jsonable(site_sensitivity(model, task.cfg.quant.quant_config(Bits.parse(bits)), task.calib,
                                            test, method=method, batch_size=task.cfg.train.eval_batch_size,
                                            progress=task.progress))
            task.run.save_sensitivity(arm.name, task.seed, rep)
            logger.info("sensitivity %s %s: top site %s (KL %.3g)", arm.name, bits, rep["sites"][0]["site"],
                        rep["sites"][0]["kl"])
        out[arm.name] = rep
    return out


def _run_deployed(task: _Task, arms: list[ArmConfig], cells: list[dict]) -> list[dict]:
    """Each float arm's best W8A8 cell of this seed on ONNX Runtime's integer kernels (resumable)."""
    out = []
    for arm in (a for a in arms if a.qat_bits is None):
        res = task.run.load_deployed(arm.name, task.seed)
        if res is None:
            model = load_arm_model(arm, task.seed, task.pristine, task.run)
            res = deploy_best(model, cells, arm.name, task.seed, task.methods, task.cfg.quant, task.calib,
                              task.loaders.test, task.run.deployed_path(arm.name, task.seed, ".onnx"),
                              task.cfg.deploy.timing_repeats, task.progress)
            task.run.save_deployed(res)
            logger.info("deployed %s seed %d %s W8A8: %.4f (fake %.4f), %.1f ms vs %.1f ms fp32", arm.name,
                        task.seed, res.method, res.accuracy, res.fake_accuracy, res.int8_ms, res.fp32_ms)
        out.append(dataclasses.asdict(res))
    return out
