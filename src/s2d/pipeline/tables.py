"""The tables of an `s2d run` report, as pure functions of the results dict
(``dataclasses.asdict(ExperimentResult)``):

(a) Table-2 style accuracy table: rows = bit setting x PTQ method, columns = arms, deltas vs the
    baseline arm (default "adamw") in percentage points;
(b) Table-3 style per-layer table of the FFN layers: PCDR_1, max |a|, σ_max per arm;
(c) the per-layer table of ``s2d inspect``.
"""
from __future__ import annotations

import re

from s2d.models import is_ffn_name

__all__ = ["float_arms", "bits_key", "qat_kinds", "table_columns", "accuracy_rows", "format_accuracy_table",
           "qat_rows", "format_qat_table", "is_ffn", "layer_rows", "format_layer_table", "format_inspect_table",
           "short_name"]


def float_arms(res: dict) -> list[str]:
    """Names of the arms trained in float (not QAT), in config order."""
    return [n for n, a in res["arms"].items() if a.get("qat_bits") is None]


def bits_key(bits: str) -> tuple[int, int]:
    """Sort key of a "WxAy" label: most bits first."""
    w, a = re.fullmatch(r"W(\d+)A(\d+)", bits).groups()
    return -int(w), -int(a)


def qat_kinds(res: dict) -> list[str]:
    """Kinds of the QAT arms ("qat", "qat+s2d"), in config order: the QAT columns of the main table."""
    return list(dict.fromkeys(a["kind"] for a in res["arms"].values() if a.get("qat_bits")))


def table_columns(res: dict) -> list[str]:
    """Columns of the main table: the float arms, then one column per QAT kind."""
    return float_arms(res) + qat_kinds(res)


def accuracy_rows(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> list[dict]:
    """Rows of the main (Table-2 style) table: "FP" first, then per bit setting (descending) one row per
    PTQ method and, where QAT arms trained at that setting, a "QAT" row holding each QAT arm's
    accuracy at its own bits under its kind's column.

    Each row: {"bits", "method", "baseline", "values": {column: accuracy}, "deltas": {column: (acc -
    baseline acc) * 100}} (percentage points; empty when the row's baseline has no value). The
    baseline is `baseline` for FP/PTQ rows and `qat_baseline` for QAT rows.
    """
    arms = float_arms(res)
    rows = [{"bits": "FP", "method": "-", "baseline": baseline,
             "values": {a: res["arms"][a]["fp_accuracy"] for a in arms}}]
    grid: dict[tuple[str, str], dict[str, float]] = {}
    for c in res["cells"]:
        grid.setdefault((c["bits"], c["method"]), {})[c["arm"]] = c["accuracy"]
    for a in res["arms"].values():
        if a.get("qat_bits"):
            grid.setdefault((a["qat_bits"], "QAT"), {})[a["kind"]] = a["qat_accuracy"]
    # within a bit setting: PTQ methods alphabetically, then QAT
    for bits, method in sorted(grid, key=lambda k: (bits_key(k[0]), k[1] == "QAT", k[1])):
        rows.append({"bits": bits, "method": method, "baseline": qat_baseline if method == "QAT" else baseline,
                     "values": grid[(bits, method)]})
    for row in rows:
        base = row["values"].get(row["baseline"])
        row["deltas"] = {} if base is None else {a: (v - base) * 100 for a, v in row["values"].items()}
    return rows


def format_accuracy_table(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> str:
    """Markdown of `accuracy_rows`: accuracy in %, delta vs the row's baseline in parentheses (pp)."""
    cols = table_columns(res)
    lines = ["| bits | method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for row in accuracy_rows(res, baseline, qat_baseline):
        cells = []
        for a in cols:
            v = row["values"].get(a)
            if v is None:
                cells.append("-")
            elif a == row["baseline"] or a not in row["deltas"]:
                cells.append(f"{100 * v:.2f}")
            else:
                cells.append(f"{100 * v:.2f} ({row['deltas'][a]:+.2f})")
        lines.append(f"| {row['bits']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qat_rows(res: dict) -> list[dict]:
    """QAT arms: {"arm", "kind", "bits", "qat_accuracy", "fp_accuracy"} in config order."""
    return [{"arm": n, "kind": a["kind"], "bits": a["qat_bits"], "qat_accuracy": a["qat_accuracy"],
             "fp_accuracy": a["fp_accuracy"]} for n, a in res["arms"].items() if a.get("qat_bits")]


def format_qat_table(res: dict) -> str:
    """Markdown table of the QAT arms per bit setting, with the qat+s2d - qat delta ("" without QAT arms)."""
    rows = qat_rows(res)
    if not rows:
        return ""
    by_bits: dict[str, dict[str, float]] = {}
    for r in rows:
        by_bits.setdefault(r["bits"], {})[r["kind"]] = r["qat_accuracy"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| bits | " + " | ".join(kinds) + " | delta |", "|" + "---|" * (len(kinds) + 2)]
    for bits, vals in by_bits.items():
        delta = (vals["qat+s2d"] - vals["qat"]) * 100 if {"qat", "qat+s2d"} <= set(vals) else None
        cells = [f"{100 * vals[k]:.2f}" if k in vals else "-" for k in kinds]
        lines.append(f"| {bits} | " + " | ".join(cells) + f" | {'-' if delta is None else f'{delta:+.2f}'} |")
    return "\n".join(lines)


def is_ffn(report: dict) -> bool:
    """Whether a LayerReport dict is an FFN Linear: by its role, or by its name for unrecognised models."""
    role = report.get("role")
    if role in ("fc1", "fc2"):
        return True
    return role in (None, "linear", "other") and is_ffn_name(report["name"])


def layer_rows(res: dict, arms: list[str] | None = None) -> list[dict]:
    """Table-3 rows, one per FFN layer: {"layer", "role", arm: {"pcdr1", "max_abs", "sigma_max"}}."""
    arms = arms or list(res["arms"])
    rows: dict[str, dict] = {}
    for arm in arms:
        for rep in res["arms"][arm].get("probes", []):
            if not is_ffn(rep):
                continue
            row = rows.setdefault(rep["name"], {"layer": rep["name"], "role": rep.get("role", "linear")})
            row[arm] = {"pcdr1": rep["pcdr"][0] if rep["pcdr"] else float("nan"),
                        "max_abs": rep["max_abs"], "sigma_max": rep["sigma_max"]}
    return list(rows.values())


def format_layer_table(res: dict, arms: list[str] | None = None) -> str:
    """Three markdown tables (PCDR_1, max |a|, σ_max): rows = FFN layers, columns = arms."""
    arms = arms or list(res["arms"])
    rows = layer_rows(res, arms)
    out = []
    for key, title, fmt in (("pcdr1", "PCDR_1", "{:.3f}"), ("max_abs", "max |a|", "{:.1f}"),
                            ("sigma_max", "σ_max", "{:.2f}")):
        lines = [f"**{title}**", "", "| layer | " + " | ".join(arms) + " |", "|" + "---|" * (len(arms) + 1)]
        for r in rows:
            cells = [fmt.format(r[a][key]) if a in r else "-" for a in arms]
            lines.append(f"| {short_name(r['layer'])} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def format_inspect_table(layers: list[dict]) -> str:
    """Markdown table of `LayerReport` dicts: σ_max, PCDR_1..k, k_target, max |a|, kurtosis per layer."""
    k = max((len(r["pcdr"]) for r in layers), default=0)
    head = ["layer", "role", "shape", "σ_max"] + [f"PCDR_{i + 1}" for i in range(k)] + ["k_target", r"max \|a\|", "kurtosis"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in layers:
        pcdr = [f"{v:.3f}" for v in r["pcdr"]] + ["-"] * (k - len(r["pcdr"]))
        cells = [r["name"], r.get("role", "-"), "x".join(map(str, r["shape"])), f"{r['sigma_max']:.2f}", *pcdr,
                 "-" if r["k_target"] is None else str(r["k_target"]), f"{r['max_abs']:.1f}", f"{r['kurtosis']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_name(name: str) -> str:
    """A layer name shortened for tables and plots ("bert.encoder.layer.0.output.dense" -> "L0.fc2")."""
    return (name.replace("encoder.layer.", "L").replace("bert.", "").replace("mpnet.", "")
            .replace("intermediate.dense", "fc1").replace("output.dense", "fc2").replace("dinov2.", ""))
