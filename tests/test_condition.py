"""Conditioning without labels (s2d.train.condition, `s2d condition`, the adamw+s2d-rel / adamw+condition arms)
on a tiny random BERT with a planted outlier direction; KL against torch.distributions."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import s2d.pipeline.experiment as experiment
from s2d.pipeline.cli import main
from s2d.pipeline.config import DataConfig, ModelConfig
from s2d.pipeline.evidence import outlier_reduction
from s2d.pipeline.experiment import load_task, run_experiment
from s2d.pipeline.report import write_report
from s2d.pipeline.parse import from_dict
from s2d.regularizer import S2DConfig
from s2d.train import ConditionConfig, condition
from s2d.train.condition import held_out_kl, kl_to_teacher
from test_experiment import CountingCell, make_csv, make_tiny_model, raw_config

PLANTED = "bert.encoder.layer.0.output.dense"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    return make_tiny_model(root / "bert"), make_csv(root / "data.csv")


def _planted_task(tiny):
    bundle, loaders = load_task(ModelConfig(str(tiny[0])), DataConfig(str(tiny[1]), max_length=16), batch_size=16)
    layer = dict(bundle.model.named_modules())[PLANTED]
    with torch.no_grad():                          # a rank-one spike read by the (mostly positive) GELU outputs
        u = torch.randn(layer.out_features)
        layer.weight += 300.0 * torch.outer(u / u.norm(), torch.full((layer.in_features,), layer.in_features ** -0.5))
    return bundle, loaders, layer


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_teacher_matches_torch_distributions(temperature):
    t, s = torch.randn(5, 7), torch.randn(5, 7)
    p = torch.distributions.Categorical(logits=t / temperature)
    q = torch.distributions.Categorical(logits=s / temperature)
    expected = torch.distributions.kl_divergence(p, q).mean() * temperature ** 2
    torch.testing.assert_close(kl_to_teacher(t, s, temperature), expected)
    assert float(kl_to_teacher(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_condition_decays_the_planted_direction_and_keeps_the_function(tiny):
    bundle, loaders, layer = _planted_task(tiny)
    model = bundle.model
    sigma0 = float(torch.linalg.svdvals(layer.weight.detach())[0])
    teacher = copy.deepcopy(model)
    cfg = S2DConfig(update="relative", fraction=0.5, interval=2, k_max=1)
    val = [next(iter(loaders.val))]
    res = condition(model, loaders.train, ConditionConfig(steps=8, lr=1e-4, guard_examples=16), cfg,
                    guard_batches=val, progress=False)
    assert res.loss_history[0][1] == pytest.approx(0.0, abs=1e-6)      # student = teacher at step 0 (eval mode)
    sigma1 = float(torch.linalg.svdvals(layer.weight.detach())[0])
    assert sigma1 < sigma0 / 4               # selected at >= 2 of the 4 refreshes, each removing half
    stats = {s["name"]: s for s in res.s2d_stats}
    assert "classifier" not in stats and stats[PLANTED]["refreshed_at"] == 6     # the head is not a target
    assert res.guard_history and PLANTED in res.guard_history[0]["layers"]
    assert held_out_kl(model, teacher, val) < 0.5                      # the outputs stay close to the original


def test_relative_and_condition_arms_in_a_run(tiny, tmp_path, monkeypatch):
    raw = raw_config(*tiny, arms={"names": ["adamw", "adamw+s2d-rel", "adamw+condition"]},
                     s2d={"interval": 100, "min_refreshes": 2, "guard_examples": 8},
                     condition={"steps": 4, "guard_examples": 8},
                     quant={"bits": ["W8A8"], "methods": ["rtn"], "method_bits": {}})
    seen = {}
    real = experiment.condition

    def spy(model, loader, cfg, s2d_config, **kw):
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["s2d"], seen["cfg"] = s2d_config, cfg
        return real(model, loader, cfg, s2d_config, **kw)

    monkeypatch.setattr(experiment, "condition", spy)
    res = run_experiment(from_dict(raw), tmp_path / "run", progress=False, cell_fn=CountingCell())
    assert list(res.arms) == ["adamw", "adamw+s2d-rel", "adamw+condition"]
    adamw = experiment.load_arm_model(experiment.ArmConfig("adamw", "adamw", "adamw"), 0,
                                      load_task(ModelConfig(str(tiny[0])), DataConfig(str(tiny[1]), max_length=16))[0].model,
                                      experiment.RunDir(tmp_path / "run"))
    for k, v in adamw.state_dict().items():                          # it conditions the adamw arm's weights
        torch.testing.assert_close(seen["weights"][k], v, rtol=0, atol=0)
    assert seen["s2d"].update == "relative" and seen["s2d"].interval == 2 and seen["cfg"].steps == 4
    runs = {r["name"]: r for r in res.runs}
    assert runs["adamw+condition"]["train"]["steps"] == 4
    assert runs["adamw+s2d-rel"]["s2d_config"]["update"] == "relative"
    assert isinstance(runs["adamw+s2d-rel"]["train"]["s2d_guard"], list) and runs["adamw"]["train"]["s2d_guard"] is None
    assert len(res.cells) == 3
    write_report(res, tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "**adamw+condition vs adamw**" in md and "fraction=0.5" in md
    arm_dir = tmp_path / "run" / "arms" / "adamw@s0"                  # `s2d condition` on a run's arm
    assert main(["condition", str(arm_dir), "--out", str(tmp_path / "c"), "--steps", "2", "--bits", "W8A8",
                 "--batch-size", "16", "--guard-examples", "0", "--no-progress"]) == 0
    assert json.loads((tmp_path / "c" / "condition.json").read_text())["summary"]["test_examples"] == 16


@pytest.mark.parametrize("over,match", [
    ({"arms": {"names": ["adamw+condition", "adamw"]}}, "list \"adamw\" before it"),
    ({"condition": {"seed": 3}}, "condition.seed is set per run"),
    ({"condition": {"step": 3}}, "unknown key condition.step"),
    ({"s2d": {"guard_examples": -1}}, "s2d.guard_examples must be"),
    ({"s2d": {"fraction": 1.5}}, "S2DConfig.fraction must be"),
])
def test_condition_config_errors(tiny, over, match):
    with pytest.raises(ValueError, match=match):
        from_dict(raw_config(*tiny, **over))


def test_condition_cli(tiny, tmp_path, capsys):
    out = tmp_path / "cond"
    rc = main(["condition", str(tiny[0]), "--data", str(tiny[1]), "--out", str(out), "--steps", "4",
               "--bits", "W8A8", "--max-length", "16", "--batch-size", "16", "--guard-examples", "8", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "condition.json").read_text())["summary"]
    assert 0.0 <= summary["float_agreement"] <= 1.0 and summary["steps"] == 4
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "config.json").exists()
    report = (out / "report.md").read_text()
    assert "agreement with the original" in report and "## Per layer" in report
    assert main(["evaluate", str(out / "model"), "--data", str(tiny[1]), "--max-length", "16", "--no-progress"]) == 0


@pytest.mark.parametrize("extra,message", [([], "--data is required"), (["--data", "x", "--fraction", "1"], "--fraction"),
                                           (["--data", "x", "--steps", "0"], "--steps must be >= 1")])
def test_condition_cli_errors(tiny, tmp_path, capsys, extra, message):
    assert main(["condition", str(tiny[0]), "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_outlier_reduction_by_hand():
    def probes(a_k, a, b):
        return [{"name": "a", "k_target": a_k, "max_abs": a}, {"name": "b", "k_target": None, "max_abs": b}]
    res = {"arms": {"adamw": {}, "x": {}},
           "runs": [{"name": "adamw", "seed": 0, "probes": probes(1, 100.0, 500.0)},
                    {"name": "x", "seed": 0, "probes": probes(None, 20.0, 600.0)},
                    {"name": "adamw", "seed": 1, "probes": probes(2, 50.0, 10.0)},
                    {"name": "x", "seed": 1, "probes": probes(1, 25.0, 1.0)}]}
    (row,) = outlier_reduction(res)
    assert row["arm"] == "x" and row["seeds"] == 2 and row["layers"] == 1.0     # only "a" is selected in adamw
    assert row["baseline"] == 75.0 and row["arm_max_abs"] == 22.5
    assert row["ratio"] == pytest.approx((5.0 + 2.0) / 2) and (row["ratio_min"], row["ratio_max"]) == (2.0, 5.0)


def test_condition_order_does_not_depend_on_the_loaders_past(tiny):
    """Conditioning is a function of (model, dataset, config): iterating the loader before changes nothing."""
    results = []
    for burn in (0, 3):
        bundle, loaders, _ = _planted_task(tiny)
        for _ in range(burn):
            list(loaders.train)
        cfg = S2DConfig(update="relative", fraction=0.5, interval=2, k_max=1)
        condition(bundle.model, loaders.train, ConditionConfig(steps=3, lr=1e-3, guard_examples=0), cfg, progress=False)
        results.append({k: v.clone() for k, v in bundle.model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=0)
