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
from s2d.pipeline.config import QuantGridConfig
from s2d.pipeline.rundir import DeployedResult, pack_outcomes
from s2d.quant import Bits, quantize_model
from s2d.train import Outcomes, evaluate_outcomes
from s2d.utils import eval_mode, model_device, to_device

__all__ = ["DEPLOY_BITS", "parity", "best_cell", "deploy_cell"]

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


def deploy_cell(model: nn.Module, cell: dict, grid: QuantGridConfig, calib: list[dict], loader: DataLoader,
                path: Path, repeats: int = 5, progress: bool = False) -> DeployedResult:
    """Quantize a copy of ``model`` as ``cell`` was (method, W8A8, same calibration), export it to ``path``
    (ONNX QDQ), score both on ``loader`` and time one of its batches in torch float and on ONNX Runtime."""
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, grid.quant_config(DEPLOY_BITS), method=cell["method"], calib=calib,
                   config=grid.method_config(cell["method"]), progress=progress)
    res = export_onnx(qmodel, path, calib[0], "qdq")
    onnx = OnnxClassifier(path)
    deployed = evaluate_outcomes(onnx, loader, progress=progress)
    score = parity(evaluate_outcomes(qmodel, loader, progress=progress), deployed)
    batch = {k: v for k, v in next(iter(loader)).items() if k in res.inputs}
    on_model = to_device(batch, model_device(model))
    with torch.no_grad(), eval_mode(model):
        fp32_ms = median_ms(lambda: model(**on_model), repeats)
    int8_ms = median_ms(lambda: onnx(**batch), repeats)
    return DeployedResult(cell["arm"], cell["seed"], cell["method"], score["reference_accuracy"],
                          score["deployed_accuracy"], score["agreement"], res.bytes / 2**20, fp32_ms, int8_ms,
                          res.integer_ops, pack_outcomes(deployed.correct))
