"""The deployed model, next to s2d's fake quantization: parity of two outcome sets, and the
"deployed (int8)" rows of `s2d run` (each float arm's best W8A8 cell exported to ONNX QDQ, scored and
timed on ONNX Runtime's integer kernels against the torch float model)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from s2d.deploy import OnnxClassifier, export_onnx, median_ms
from s2d.deploy.onnx_export import move_export, sidecar_path
from s2d.deploy.runtime import pad_to_length
from s2d.models import CausalLMClassifier
from s2d.pipeline.config import QuantGridConfig
from s2d.pipeline.rundir import DeployedResult, pack_outcomes
from s2d.quant import Bits, quantize_model
from s2d.train import Outcomes, evaluate_outcomes
from s2d.utils import eval_mode, model_device, to_device

__all__ = ["DEPLOY_BITS", "parity", "best_cell", "export_example", "deploy_best", "deploy_cell"]

DEPLOY_BITS = Bits(8, 8)   # the only setting with integer CPU kernels (ONNX QDQ carries 8-bit codes)


def parity(reference: Outcomes, deployed: Outcomes) -> dict[str, float]:
    """Accuracies (in [0, 1]) of the reference and the deployed model on the same examples, their
    difference, and the share of examples where both predict the same class."""
    if reference.pred is None or deployed.pred is None or reference.pred.shape != deployed.pred.shape:
        raise ValueError("parity needs the predictions of both models on the same examples")
    ref, dep = float(reference.correct.float().mean()), float(deployed.correct.float().mean())
    return {"reference_accuracy": ref, "deployed_accuracy": dep, "difference": dep - ref,
            "agreement": float((reference.pred == deployed.pred).float().mean()), "examples": reference.pred.numel()}


def best_cell(cells: list[dict], arm: str, seed: int, bits: Bits = DEPLOY_BITS) -> dict | None:
    """The most accurate of ``arm``'s cells at ``bits`` for ``seed`` (the first on a tie), or None."""
    mine = [c for c in cells if c["arm"] == arm and c["seed"] == seed and c["bits"] == bits.name]
    return max(mine, key=lambda c: c["accuracy"]) if mine else None


def export_example(model: nn.Module, batch: dict, loader: DataLoader) -> dict:
    """The example batch to export ``model`` with: ``batch``, except that a causal-LM classifier (exported
    at a fixed (B, T), see :mod:`s2d.deploy.onnx_export`) gets it right-padded to the longest sequence of
    ``loader``."""
    if not isinstance(model, CausalLMClassifier):
        return batch
    return pad_to_length(batch, max(b["input_ids"].shape[1] for b in loader))


def deploy_best(model: nn.Module, cells: list[dict], arm: str, seed: int, methods: list[str], grid: QuantGridConfig,
                calib: list[dict], loader: DataLoader, path: Path, repeats: int = 5,
                progress: bool = False) -> DeployedResult:
    """``arm``'s (seed ``seed``) best W8A8 cell deployed to ``path``. A grid without W8A8 cells deploys
    every method of ``methods`` at W8A8 and keeps the one whose fake-quant accuracy is highest."""
    cell = best_cell(cells, arm, seed)
    if cell is not None:
        return deploy_cell(model, arm, seed, cell["method"], grid, calib, loader, path, repeats, progress)
    tried = {m: deploy_cell(model, arm, seed, m, grid, calib, loader, path.with_suffix(f".{m}.onnx"), repeats,
                            progress) for m in methods}
    best = max(tried.values(), key=lambda r: r.fake_accuracy)
    for m in tried:
        onnx_file = path.with_suffix(f".{m}.onnx")
        if m == best.method:
            move_export(onnx_file, path)
        else:
            onnx_file.unlink()
            sidecar_path(onnx_file).unlink()
    best.selected_by = f"highest s2d W8A8 accuracy of {', '.join(methods)} (the grid has no W8A8 cell)"
    return best


def deploy_cell(model: nn.Module, arm: str, seed: int, method: str, grid: QuantGridConfig, calib: list[dict],
                loader: DataLoader, path: Path, repeats: int = 5, progress: bool = False) -> DeployedResult:
    """Quantize a copy of ``model`` with ``method`` at W8A8 (the grid's spec and method config, the same
    calibration batches as its cells), export it to ``path`` (ONNX QDQ), score both on ``loader`` and time
    one of its batches in torch float and on ONNX Runtime."""
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, grid.quant_config(DEPLOY_BITS), method=method, calib=calib,
                   config=grid.method_config(method), progress=progress)
    res = export_onnx(qmodel, path, export_example(model, calib[0], loader), "qdq")
    onnx = OnnxClassifier(path)
    deployed = evaluate_outcomes(onnx, loader, progress=progress)
    score = parity(evaluate_outcomes(qmodel, loader, progress=progress), deployed)
    batch = {k: v for k, v in next(iter(loader)).items() if k in res.inputs}
    on_model = to_device(batch, model_device(model))
    with torch.no_grad(), eval_mode(model):
        fp32_ms = median_ms(lambda: model(**on_model), repeats)
    int8_ms = median_ms(lambda: onnx(**batch), repeats)
    return DeployedResult(arm, seed, method, score["reference_accuracy"], score["deployed_accuracy"],
                          score["agreement"], res.bytes / 2**20, fp32_ms, int8_ms, res.integer_ops,
                          pack_outcomes(deployed.correct))
