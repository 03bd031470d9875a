"""s2d.report against a hand-built results dict (the shape of dataclasses.asdict(ExperimentResult)).

Checks: the Table-2 style accuracy table (rows bits x method + QAT rows at the arms' own bits, columns
arms, deltas vs adamw / vs qat) cell by cell; the Table-3 style FFN table; the QAT table; the figures
are real PNG files; report.md holds the tables and links every figure; results.json round-trips
every number; the terminal summary ends with the main table.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from s2d.pipeline import evidence, report, tables
from s2d.pipeline.rundir import pack_outcomes, unpack_outcomes
from s2d.stats import cell_estimate, paired_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


N = 200                       # test examples
SEEDS = [0, 1]


def outcomes(acc: float, seed: int, salt: str) -> dict:
    """A per-example correctness vector of exactly round(acc * N) hits, shuffled by (seed, salt)."""
    hits = np.zeros(N, dtype=bool)
    hits[: round(acc * N)] = True
    rng = np.random.default_rng(abs(hash((seed, salt))) % 2**32)
    return pack_outcomes(rng.permutation(hits))


def run(kind, fp, seed, qat_bits=None, qat_acc=None, pcdr=(0.9, 0.5), max_abs=(12.0, 30.0), sigma=(3.0, 4.0)):
    layers = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]
    probes = [{"name": n, "shape": [64, 32], "sigma_max": s, "pcdr": [p, 0.95, 0.99], "k_target": 2,
               "max_abs": m, "kurtosis": 3.0, "p99": 1.0, "p999": 2.0, "role": r}
              for n, p, m, s, r in zip(layers, pcdr, max_abs, sigma, ("fc1", "fc2"))]
    probes.append({"name": "bert.encoder.layer.0.attention.self.query", "shape": [32, 32], "sigma_max": 9.0,
                   "pcdr": [0.1, 0.2, 0.3], "k_target": None, "max_abs": 99.0, "kurtosis": 1.0, "p99": 1.0,
                   "p999": 1.0, "role": "q"})
    acts = {n: {"name": n, "max_abs": m, "kurtosis": 3.0, "p99": 1.0, "p999": 2.0, "count": 10,
                "sample": [-m, -1.0, 0.0, 0.5, 1.0, m]} for n, m in zip(layers, max_abs)}
    history = [{"step": s, "worst_max_abs": max(max_abs) * (1 + s / 10), "val_accuracy": None} for s in (0, 2, 4)]
    name = kind if qat_bits is None else f"{kind}@{qat_bits}"
    return {"name": name, "seed": seed, "kind": kind, "optimizer": "adamw", "s2d_config": _s2d(kind),
            "qat_bits": qat_bits, "fp_accuracy": fp, "qat_accuracy": qat_acc,
            "train": {"wall_s": 1.0, "final_loss": 0.5, "probe_history": history}, "probes": probes,
            "activations": acts, "wall_s": 1.0, "fp_correct": outcomes(fp, seed, name + "fp"),
            "qat_correct": outcomes(qat_acc, seed, name + "qat") if qat_bits else None}


def _s2d(kind):
    return None if "s2d" not in kind else {"strength": 5e-4, "power": 2.0, "tau": 0.95, "k_max": 3,
                                           "interval": 2, "selection": "pcdr", "update": "coupled"}


ACC = {("adamw", "rtn", "W8A8"): 0.79, ("adamw+s2d", "rtn", "W8A8"): 0.795,
       ("adamw", "rtn", "W4A4"): 0.50, ("adamw+s2d", "rtn", "W4A4"): 0.70,
       ("adamw", "repq", "W4A4"): 0.55, ("adamw+s2d", "repq", "W4A4"): 0.56}


@pytest.fixture
def res():
    runs = []
    for seed in SEEDS:
        runs += [run("adamw", 0.80, seed), run("adamw+s2d", 0.81, seed, pcdr=(0.6, 0.4), max_abs=(6.0, 10.0),
                                                  sigma=(2.0, 2.5)),
                 run("qat", 0.70, seed, "W4A4", 0.60), run("qat+s2d", 0.72, seed, "W4A4", 0.66)]
    cells = [{"arm": a, "seed": seed, "method": m, "bits": b, "w_bits": int(b[1]), "a_bits": int(b[3]),
              "accuracy": v, "wall_s": 0.1, "correct": outcomes(v, seed, a + m + b)}
             for (a, m, b), v in ACC.items() for seed in SEEDS]
    arms = {r["name"]: {k: r[k] for k in ("kind", "optimizer", "s2d_config", "qat_bits")} for r in runs}
    return {"config": {"name": "toy", "model": {"name": "tiny"}, "data": {"dataset": "toy.csv"}},
            "fingerprint": "abc", "seeds": SEEDS, "arms": arms, "runs": runs, "cells": cells,
            "methods": ["repq", "rtn"], "notes": ["S2D interval scaled 100 -> 2"], "wall_s": 12.0,
            "versions": {"torch": "x"}, "machine": {"platform": "test", "cpu_count": 2}}


def matrix(res, arm, method, bits):
    return np.stack([unpack_outcomes(c["correct"]) for s in SEEDS for c in res["cells"]
                     if (c["arm"], c["method"], c["bits"], c["seed"]) == (arm, method, bits, s)]).astype(float)


def parse_table(md: str) -> list[list[str]]:
    rows = [l for l in md.splitlines() if l.startswith("|")]
    split = (re.split(r"(?<!\\)\|", r.strip()[1:-1]) for r in rows if not set(r) <= set("|-"))
    return [[c.strip().replace("\\|", "|") for c in cells] for cells in split]   # "\|" is a literal |


def test_accuracy_table_cells(res):
    table = parse_table(tables.format_accuracy_table(res))
    assert table[0] == ["bits", "method", "adamw", "adamw+s2d", "qat", "qat+s2d"]
    assert [r[:2] for r in table[1:]] == [["FP", "-"], ["W8A8", "rtn"], ["W4A4", "repq"], ["W4A4", "rtn"],
                                           ["W4A4", "QAT"]]
    means = {(r[0], r[1]): [c.split(" ")[0] for c in r[2:]] for r in table[1:]}
    assert means[("W4A4", "rtn")] == ["50.00", "70.00", "-", "-"]      # exact means over both seeds
    assert means[("W4A4", "QAT")] == ["-", "-", "60.00", "66.00"]      # QAT kinds at their own bits
    big = table[4][3]                                                    # +20 pp on 2 x 200 examples
    assert re.fullmatch(r"70\.00 ±\d\.\d\d \(\+20\.00 \[\+\d+\.\d\d, \+\d+\.\d\d\]\*\)", big), big
    assert not table[2][3].endswith("*)")                                # +0.5 pp at W8A8: no mark


def test_accuracy_rows_use_the_paired_statistics(res):
    by = {(r["bits"], r["method"]): r for r in evidence.accuracy_rows(res)}
    row = by[("W4A4", "rtn")]
    want = paired_comparison(matrix(res, "adamw+s2d", "rtn", "W4A4"), matrix(res, "adamw", "rtn", "W4A4"))
    assert row["deltas"]["adamw+s2d"] == want and want.significant and want.delta == pytest.approx(0.20)
    assert row["values"]["adamw"] == cell_estimate(matrix(res, "adamw", "rtn", "W4A4"))
    assert by[("W4A4", "QAT")]["baseline"] == "qat" and by[("W4A4", "QAT")]["deltas"]["qat+s2d"].seeds == 2
    assert evidence.accuracy_rows(res, baseline="none")[0]["deltas"] == {}      # no baseline -> no deltas


def test_verdict_says_what_was_found(res):
    lines = report.verdict_lines(res)
    text = "\n".join(lines)
    assert "**adamw+s2d vs adamw** (2 seed(s) x 200 test examples" in text
    assert re.search(r"- better: W4A4 rtn \+20\.00 pp \[", text)
    assert "no significant change in 2 of 3 PTQ cells" in text
    assert "**qat+s2d vs qat** at W4A4: +6.00 pp" in text


def test_layer_table(res):
    rows = tables.layer_rows(res, ["adamw", "adamw+s2d"])
    assert [r["layer"] for r in rows] == ["bert.encoder.layer.0.intermediate.dense",
                                          "bert.encoder.layer.0.output.dense"]    # FFN only, no query
    assert rows[0]["adamw+s2d"] == {"pcdr1": 0.6, "max_abs": 6.0, "sigma_max": 2.0}   # mean of equal seeds
    md = tables.format_layer_table(res, ["adamw", "adamw+s2d"])
    titles = md.split("**")[1::2]
    assert titles == ["PCDR_1", "max |a|", "σ_max"]
    parsed = parse_table(md)
    assert ["L0.fc1", "0.900", "0.600"] in parsed and ["L0.fc2", "30.0", "10.0"] in parsed
    assert ["L0.fc2", "4.00", "2.50"] in parsed


def test_qat_table(res):
    table = parse_table(tables.format_qat_table(res))
    assert table[0] == ["bits", "qat", "qat+s2d", "qat+s2d - qat"]
    assert table[1][0] == "W4A4" and table[1][1].startswith("60.00 ±") and table[1][3].startswith("+6.00 [")


def test_write_report(res, tmp_path):
    out = report.write_report(res, tmp_path)
    for key in ("outliers_over_steps", "violins", "accuracy_vs_bits", "qat"):
        png = tmp_path / "figures" / f"{key}.png"
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, key
        assert out["figures"][key] == f"figures/{key}.png"
    md = (tmp_path / "report.md").read_text()
    assert tables.format_accuracy_table(res) in md
    assert tables.format_layer_table(res) in md and tables.format_qat_table(res) in md
    for key in out["figures"]:
        assert f"]({out['figures'][key]})" in md
    assert "S2D interval scaled 100 -> 2" in md and "torch x" in md
    assert md.index("## Verdict") < md.index("## Accuracy")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["arms"] == res["arms"] and saved["config"] == res["config"] and saved["versions"] == {"torch": "x"}
    assert all(c["correct"] == report.OUTCOMES for c in saved["cells"])     # outcomes live in outcomes.npz
    back = report.load_results(tmp_path)
    assert back["cells"] == res["cells"] and back["runs"] == res["runs"]
    assert tables.format_accuracy_table(back) == tables.format_accuracy_table(res)   # recomputed, no eval


def test_write_report_without_qat_or_cells(res, tmp_path):
    res["arms"] = {k: v for k, v in res["arms"].items() if not v["qat_bits"]}
    res["runs"] = [r for r in res["runs"] if not r["qat_bits"]]
    res["cells"] = []
    out = report.write_report(res, tmp_path)
    assert "qat" not in out["figures"] and (tmp_path / "figures" / "accuracy_vs_bits.png").stat().st_size > 0
    table = parse_table(tables.format_accuracy_table(res))
    assert [r[:2] for r in table[1:]] == [["FP", "-"]] and table[1][3].startswith("81.00 ±")


def test_terminal_summary_ends_with_main_table(res):
    text = report.terminal_summary(res, "runs/x")
    assert text.startswith("report: runs/x/report.md")
    assert text.endswith(tables.format_accuracy_table(res))
    assert "note: S2D interval scaled" in text


def test_inspect_table():
    layers = run("adamw", 0.5, 0)["probes"]
    layers[2]["role"] = "q"
    table = parse_table(tables.format_inspect_table(layers))
    assert table[0] == ["layer", "role", "shape", "σ_max", "PCDR_1", "PCDR_2", "PCDR_3", "k_target", "max |a|",
                        "kurtosis"]
    assert table[1] == ["bert.encoder.layer.0.intermediate.dense", "fc1", "64x32", "3.00", "0.900", "0.950",
                        "0.990", "2", "12.0", "3.0"]
    assert table[3][7] == "-"
