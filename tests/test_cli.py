"""The `s2d` command line: help, error handling, `s2d inspect` and `s2d run` on a tiny local model.

Checks: the console script and `python -m s2d` start; a bad config exits 2 with one line on stderr
and no traceback (before anything is loaded); `inspect` writes its table, JSON and violin plot, with
σ_max equal to the spectral norm of the saved weights; `run` writes results.json / report.md and the
terminal output ends with the main accuracy table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s2d.pipeline.cli import build_parser, main
from test_experiment import make_csv, make_tiny_model

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_tiny_model(root / "bert"), make_csv(root / "data.csv")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("argv", [[str(BIN / "s2d"), "--help"], [sys.executable, "-m", "s2d", "--help"]],
                         ids=["console-script", "python-m"])
def test_help_entry_points(argv, tmp_path):
    proc = _run(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("run", "inspect", "lowrank", "finetune", "quantize", "evaluate", "export", "assets", "bench"):
        assert cmd in proc.stdout


def test_run_help_in_process(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "CONFIG" in out.upper()


def test_bad_config_subprocess_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text('[model]\nname = "minilm-l6"\n[data]\ndataset = "rotten-tomatoes"\n'
                                       '[arms]\nnames = ["adamw", "sgd"]\n')
    proc = _run([str(BIN / "s2d"), "run", "bad.toml"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["s2d run: error: unknown arm 'sgd' in arms.names; allowed: adamw, adamw+s2d, adamw+s2d-rel, "
                     "adamw+condition, adamw+cd, muon, muon+s2d, adamw+s2d-all, qat, qat+s2d"]
    assert not (tmp_path / "runs").exists()                      # failed before creating anything


@pytest.mark.parametrize("body, message", [
    ('[model]\nname = "minilm-l6"\n[data]\ndataset = "rotten-tomatoes"\n[quant]\nbits = ["W1A4"]\n',
     "quant.bits: bit widths must be 2..8 or 16"),
    ('[model]\nname = "nope-model"\n[data]\ndataset = "rotten-tomatoes"\n', "unknown model.name 'nope-model'"),
    ('[model]\nname = "minilm-l6"\n[data]\ndataset = "nope-data"\n', "unknown data.dataset 'nope-data'"),
    ("[model\n", "invalid TOML"),
])
def test_bad_config_in_process(tmp_path, capsys, body, message):
    (tmp_path / "c.toml").write_text(body)
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2d run: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_inspect_local_model(tiny, tmp_path, capsys):
    from transformers import BertModel

    model_dir, data = tiny
    out = tmp_path / "inspect"
    assert main(["inspect", str(model_dir), "--data", str(data), "--out", str(out), "--batches", "1",
                 "--batch-size", "8", "--max-length", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "layers.json").read_text())
    layers = {r["name"]: r for r in saved["layers"]}
    encoder = BertModel.from_pretrained(str(model_dir))
    linears = {f"bert.{n}": m for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(linears) <= set(layers) and "classifier" in layers
    for name, lin in linears.items():          # σ_max = spectral norm of the stored (pretrained) weight
        expect = torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2).item()
        assert layers[name]["sigma_max"] == pytest.approx(expect, rel=1e-4)
        assert len(layers[name]["pcdr"]) == 3 and layers[name]["max_abs"] > 0
    ffn = {n for n, r in layers.items() if r["role"] in ("fc1", "fc2")}
    assert set(saved["activations"]) == ffn and len(ffn) == 4
    assert (out / "violins.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "layers.md").read_text()
    per_layer, peaks = table.strip().split("\n\n")
    assert per_layer in printed and peaks in printed and "PCDR_3" in table and "kurtosis" in table
    assert "bert.encoder.layer.1.output.dense" in table
    assert set(saved["peaks"]) == {n for n in ffn}                 # where each FFN output peaks
    assert (out / "max_abs_per_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_sensitivity(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "inspect"
    assert main(["inspect", str(model_dir), "--data", str(data), "--out", str(out), "--batches", "1",
                 "--batch-size", "8", "--max-length", "16", "--sensitivity", "W4A4", "--sensitivity-examples", "16",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "sensitivity.json").read_text())
    assert rep["bits"] == "W4A4" and rep["method"] == "rtn" and rep["examples"] == 16
    assert len(rep["sites"]) == 2 * 14 + 4 * 2                      # 14 Linears (head included), 2 attention modules
    kls = [s["kl"] for s in rep["sites"]]
    assert kls == sorted(kls, reverse=True) and all(k >= 0 for k in kls)
    assert "S2D selects" in printed and (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(model_dir), "--data", str(data), "--sensitivity", "W4A9"]) == 2
    assert "--sensitivity: bit widths" in capsys.readouterr().err


def test_quantize_and_evaluate_commands(tiny, tmp_path, capsys):
    model_dir, data = tiny
    row = tmp_path / "q.json"
    assert main(["quantize", str(model_dir), "--data", str(data), "--bits", "W8A8", "--batch-size", "16",
                 "--max-length", "16", "--out", str(row), "--no-progress"]) == 0
    saved = json.loads(row.read_text())
    assert 0 <= saved["accuracy"] <= 1 and 0 <= saved["fp_accuracy"] <= 1 and "perplexity" not in saved
    assert f"{100 * saved['accuracy']:.2f}%" in capsys.readouterr().out
    assert main(["evaluate", str(model_dir), "--data", str(data), "--max-length", "16", "--no-progress"]) == 0
    assert f"{100 * saved['fp_accuracy']:.2f}%" in capsys.readouterr().out


def _write_tiny_config(tiny, tmp_path, bits='["W8A8", "W4A4"]'):
    model_dir, data = tiny
    (tmp_path / "c.toml").write_text(f'''
name = "cli-tiny"
[model]
name = "{model_dir}"
[data]
dataset = "{data}"
max_length = 16
calib_samples = 8
[train]
steps = 2
batch_size = 16
eval_batch_size = 32
eval_every = 1
eval_batches = 1
[arms]
names = ["adamw", "adamw+s2d"]
[quant]
bits = {bits}
methods = ["rtn"]
[probes]
batches = 1
sample_size = 32
''')


def test_run_end_to_end(tiny, tmp_path, capsys):
    _write_tiny_config(tiny, tmp_path)
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"]) == 0
    from s2d.pipeline.report import load_results
    from s2d.pipeline.tables import format_accuracy_table

    res = load_results(out)                          # results.json + outcomes.npz
    assert len(res["cells"]) == 4 and set(res["arms"]) == {"adamw", "adamw+s2d"}
    assert "## Verdict" in (out / "report.md").read_text() and "adamw+s2d vs adamw" in capsys.readouterr().out
    main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out.rstrip()
    assert printed.endswith(format_accuracy_table(res))
    assert (out / "report.md").read_text().count("figures/") >= 3
    # a second invocation reuses everything and prints the same table
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(format_accuracy_table(res))


def test_run_deploy_adds_the_deployed_int8_table(tiny, tmp_path, capsys):
    _write_tiny_config(tiny, tmp_path, bits='["W8A8"]')
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress", "--deploy"]) == 0
    from s2d.pipeline.report import load_results
    from s2d.pipeline.tables import format_deployed_table

    res = load_results(out)
    assert {d["arm"] for d in res["deployed"]} == {"adamw", "adamw+s2d"}
    for d in res["deployed"]:
        cell = next(c for c in res["cells"] if c["arm"] == d["arm"] and c["bits"] == "W8A8")
        assert d["method"] == "rtn" and d["fake_accuracy"] == pytest.approx(cell["accuracy"])  # same cell again
        assert d["integer_ops"].get("MatMulIntegerToFloat", 0) >= 1 and d["int8_ms"] > 0
        assert (out / "deployed" / f"{d['arm']}@s0.onnx").is_file()
    table = format_deployed_table(res)
    assert table in capsys.readouterr().out and "## Deployed (int8)" in (out / "report.md").read_text()
    saved = (out / "deployed" / "adamw@s0.json").stat().st_mtime_ns
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress", "--deploy"]) == 0
    assert (out / "deployed" / "adamw@s0.json").stat().st_mtime_ns == saved       # resumed, not recomputed
    assert table in capsys.readouterr().out


def test_run_deploy_without_w8a8_cells_deploys_each_method_and_keeps_the_best(tiny, tmp_path):
    _write_tiny_config(tiny, tmp_path, bits='["W4A4"]')
    text = (tmp_path / "c.toml").read_text().replace('methods = ["rtn"]', 'methods = ["rtn", "repq"]')
    (tmp_path / "c.toml").write_text(text.replace('names = ["adamw", "adamw+s2d"]', 'names = ["adamw"]'))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--no-progress", "--deploy"]) == 0
    from s2d.pipeline.report import load_results

    (row,) = load_results(out)["deployed"]
    assert row["method"] in ("rtn", "repq") and "no W8A8 cell" in row["selected_by"]
    assert sorted(p.name for p in (out / "deployed").iterdir()) == ["adamw@s0.json", "adamw@s0.onnx",
                                                                    "adamw@s0.s2d.json"]
    assert json.loads((out / "deployed" / "adamw@s0.s2d.json").read_text())["path"] == str(out / "deployed" / "adamw@s0.onnx")


def test_bad_data_file_one_line_exit_2(tiny, tmp_path):
    model, good = tiny
    (tmp_path / "cut.csv").write_bytes(good.read_bytes()[:40] + b"\xff\xfe")      # truncated, not UTF-8
    proc = _run([str(BIN / "s2d"), "evaluate", str(model), "--data", "cut.csv", "--no-progress"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("s2d ")]
    assert len(lines) == 1 and "cut.csv: not UTF-8 text" in lines[0]


def test_parser_lists_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "inspect", "condition", "lowrank", "finetune", "quantize", "evaluate", "export",
                                "assets", "bench"}


def test_lowrank_local_model(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "lowrank"
    assert main(["lowrank", str(model_dir), "--data", str(data), "--out", str(out), "--calib-samples", "16",
                 "--batch-size", "8", "--max-length", "16", "--threshold", "0.2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "lowrank.json").read_text())
    rows = saved["layers"]
    assert saved["threshold"] == 0.2 and "classifier" not in {r["name"] for r in rows} and len(rows) == 13
    for r in rows:          # the ranks are the first where each stored curve meets the threshold
        for key, curve in (("weight_rank", "weight_output"), ("feature_rank", "feature_output")):
            first = next(i + 1 for i, e in enumerate(r["curves"][curve]) if e <= 0.2 or i + 1 == r["full_rank"])
            assert r[key] == first
        assert len(r["curves"]["weight_frob"]) == r["full_rank"] == min(r["shape"])
    assert (out / "lowrank.md").read_text().strip() in printed
    assert (out / "lowrank.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["lowrank", str(model_dir), "--data", str(data), "--threshold", "1.5"]) == 2
    assert "--threshold must be in (0, 1)" in capsys.readouterr().err


def test_lowrank_compress_local_model(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "lowrank"
    assert main(["lowrank", str(model_dir), "--data", str(data), "--out", str(out), "--calib-samples", "16",
                 "--batch-size", "8", "--max-length", "16", "--compress", "0.9,0.6", "--test-examples", "16",
                 "--timing-repeats", "2", "--no-progress"]) == 0
    grid = json.loads((out / "lowrank.json").read_text())["compression"]
    assert [g["space"] for g in grid] == ["dense", "feature", "feature"] and grid[0]["layers"] == 0
    dense = grid[0]["linear_params"]
    for g, ratio in zip(grid[1:], (0.9, 0.6)):
        assert g["linear_params"] <= ratio * dense and g["model_params"] < grid[0]["model_params"]
        assert 0 <= g["agreement"] <= 1 and g["ms_per_batch"] > 0
    assert "| 60% (feature) |" in capsys.readouterr().out
    assert main(["lowrank", str(model_dir), "--data", str(data), "--compress", "0.9,1.5"]) == 2
    assert "--compress must be comma-separated shares in (0, 1)" in capsys.readouterr().err


def test_lowrank_compress_times_onnx_exports(tiny, tmp_path, capsys):
    """--onnx: every budget's model is exported as fp32 ONNX and timed under ONNX Runtime; its logits match
    torch's, its file holds its float parameters (4 bytes each), and it shrinks with the budget."""
    model_dir, data = tiny
    out = tmp_path / "lowrank"
    args = ["lowrank", str(model_dir), "--data", str(data), "--out", str(out), "--calib-samples", "16",
            "--batch-size", "8", "--max-length", "16", "--test-examples", "16", "--timing-repeats", "1",
            "--no-progress"]
    assert main(args + ["--compress", "0.6", "--onnx"]) == 0
    grid = json.loads((out / "lowrank.json").read_text())["compression"]
    for g in grid:
        assert g["onnx_ms_per_batch"] > 0 and g["onnx_max_logit_diff"] < 1e-4
        assert 4 * g["model_params"] <= g["onnx_bytes"] <= 4 * g["model_params"] + 200_000
    assert grid[1]["onnx_bytes"] < grid[0]["onnx_bytes"]
    assert "| ONNX MB | ONNX max abs(Δ logit) | ONNX ms / batch | ONNX speed-up |" in capsys.readouterr().out
    assert main(args + ["--onnx"]) == 2
    assert "--onnx needs --compress" in capsys.readouterr().err


def test_lowrank_compress_then_quantize(tiny, tmp_path, capsys):
    """--quant: every budget's model gets the PTQ cells; the dense row's cell is the plain PTQ cell of the
    dense model (recomputed here), and each factorised cell is paired against it."""
    from s2d.data import calibration_batches
    from s2d.pipeline.experiment import ptq_cell
    from s2d.pipeline.inspection import cli_task
    from s2d.quant import QuantConfig
    model_dir, data = tiny
    out = tmp_path / "lowrank"
    args = ["lowrank", str(model_dir), "--data", str(data), "--out", str(out), "--calib-samples", "16",
            "--batch-size", "8", "--max-length", "16", "--compress", "0.6", "--test-examples", "16",
            "--timing-repeats", "1", "--no-progress"]
    assert main(args + ["--quant", "W8A8:rtn,W4A4:repq"]) == 0
    grid = json.loads((out / "lowrank.json").read_text())["compression"]
    assert [list(g["quant"]) for g in grid] == [["W8A8 rtn", "W4A4 repq"]] * 2
    assert grid[0]["inner_max_abs"] is None and grid[1]["inner_max_abs"] > 0 and grid[1]["max_abs"] > 0
    assert grid[0]["quant"]["W4A4 repq"]["vs_dense"]["delta"] == 0
    bundle, loaders = cli_task(str(model_dir), str(data), max_length=16, batch_size=8, limit_eval=16)
    calib = calibration_batches(loaders, num_samples=16, batch_size=8)
    hits = ptq_cell(bundle.model, QuantConfig(w_bits=4, a_bits=4), "repq", calib, loaders.test, False).correct
    assert grid[0]["quant"]["W4A4 repq"]["accuracy"]["mean"] == pytest.approx(hits.float().mean().item())
    assert "max abs(a), rank-r intermediates" in capsys.readouterr().out
    assert main(args + ["--quant", "W4A4:gptq"]) == 2
    assert "--quant must be comma-separated BITS:METHOD cells" in capsys.readouterr().err
    assert main([a for a in args if a not in ("--compress", "0.6")] + ["--quant", "W4A4:rtn"]) == 2
    assert "--quant needs --compress" in capsys.readouterr().err


def test_lowrank_of_a_whole_run_compares_its_arms(tiny, tmp_path, capsys):
    from s2d.pipeline.experiment import run_experiment
    from s2d.pipeline.parse import from_dict
    from test_experiment import CountingCell, raw_config

    run = tmp_path / "run"
    cfg = from_dict(raw_config(*tiny, arms={"names": ["adamw", "adamw+s2d"]},
                               quant={"bits": ["W8A8"], "methods": ["rtn"], "method_bits": {}}))
    run_experiment(cfg, run, progress=False, cell_fn=CountingCell())
    out = tmp_path / "lr"
    assert main(["lowrank", str(run), "--out", str(out), "--calib-samples", "16", "--batch-size", "8",
                 "--threshold", "0.2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    saved = json.loads((out / "lowrank-arms.json").read_text())
    assert [(a["arm"], a["seed"]) for a in saved["arms"]] == [("adamw", 0), ("adamw+s2d", 0)]
    assert "| adamw+s2d | 1 |" in table and "FFN down: feature / weight rank" in table
    # the same arm analysed alone gives the same ranks
    assert main(["lowrank", str(run / "arms" / "adamw@s0"), "--out", str(tmp_path / "one"), "--calib-samples", "16",
                 "--batch-size", "8", "--threshold", "0.2", "--no-progress"]) == 0
    alone = json.loads((tmp_path / "one" / "lowrank.json").read_text())["layers"]
    assert [(r["name"], r["feature_rank"], r["weight_rank"]) for r in alone] == \
        [(r["name"], r["feature_rank"], r["weight_rank"]) for r in saved["arms"][0]["layers"]]
    assert 0 < saved["arms"][0]["feature_params"] <= 1
