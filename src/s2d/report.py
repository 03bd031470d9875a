"""Tables and figures of an `s2d run`: results.json, report.md and PNGs (matplotlib, Agg backend).

(a) Table-2 style accuracy table: rows = bit setting x PTQ method, columns = arms, deltas vs the
    baseline arm (default "adamw") in percentage points;
(b) Table-3 style per-layer table of the FFN layers: PCDR_1, max |a|, σ_max per arm;
(c) figures: FFN activation violins per layer and arm (Fig. 2), worst-layer max |a| over training
    steps per arm (Fig. 1), accuracy vs bits per arm and method, QAT bars (Fig. 3).
All table functions are pure functions of the results dict (`dataclasses.asdict(ExperimentResult)`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FFN = re.compile(r"(intermediate\.dense|(?<!attention\.)output\.dense|fc1|fc2|mlp\.|gate_proj|up_proj|down_proj)")


def versions() -> dict[str, str]:
    """Versions of the libraries that produce the numbers."""
    import sys

    import accelerate
    import numpy
    import torch
    import transformers

    import s2d
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "numpy": numpy.__version__, "s2d": s2d.__version__}


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# --------------------------------------------------------------------------- tables (pure)

def float_arms(res: dict) -> list[str]:
    return [n for n, a in res["arms"].items() if a.get("qat_bits") is None]


def _bits_key(bits: str) -> tuple[int, int]:
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
    for bits, method in sorted(grid, key=lambda k: (_bits_key(k[0]), k[1] == "QAT", k[1])):
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
    role = report.get("role")
    if role in ("fc1", "fc2"):
        return True
    return role in (None, "linear", "other") and bool(_FFN.search(report["name"]))


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
            lines.append(f"| {_short(r['layer'])} | " + " | ".join(cells) + " |")
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


def _short(name: str) -> str:
    return (name.replace("encoder.layer.", "L").replace("bert.", "").replace("mpnet.", "")
            .replace("intermediate.dense", "fc1").replace("output.dense", "fc2").replace("dinov2.", ""))


# --------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_outliers_over_steps(res: dict, path: Path) -> Path:
    """Fig. 1: worst FFN layer max |a| on a fixed probe batch vs optimizer step, one line per arm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, arm in res["arms"].items():
        hist = [h for h in arm["train"].get("probe_history", []) if h.get("worst_max_abs") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["worst_max_abs"] for h in hist], marker="o", ms=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max |a| of the worst FFN layer")
    ax.set_title("Activation outliers during fine-tuning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig_violins(res: dict, path: Path, arms: list[str] | None = None, ncols: int = 4) -> Path:
    """Fig. 2: violin plots of FFN activation samples, one panel per layer, one violin per arm (all
    arms by default, QAT arms through their float path); x marks each arm's max |a| (symlog axis)."""
    plt = _plt()
    arms = arms or list(res["arms"])
    layers = list(dict.fromkeys(k for a in arms for k in res["arms"][a].get("activations", {})))
    n = max(1, len(layers))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.2, 0.45 * len(arms) + 1.2) * ncols, 3.2 * nrows),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for idx, layer in enumerate(layers):
        ax = axes[idx // ncols][idx % ncols]
        present = [(j, a) for j, a in enumerate(arms) if res["arms"][a].get("activations", {}).get(layer, {}).get("sample")]
        if not present:
            continue
        stats = [res["arms"][a]["activations"][layer] for _, a in present]
        parts = ax.violinplot([st["sample"] for st in stats], positions=range(len(present)), showextrema=False)
        for body, (j, _) in zip(parts["bodies"], present):
            body.set_facecolor(colors[j % len(colors)])
            body.set_alpha(0.6)
        for k, ((j, _), st) in enumerate(zip(present, stats)):
            ax.scatter([k], [st["max_abs"]], marker="x", color=colors[j % len(colors)], s=18)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(range(len(present)), [a for _, a in present], rotation=45, ha="right", fontsize=7)
        ax.set_title(_short(layer), fontsize=8)
    for idx in range(len(layers), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.suptitle("FFN output activations per layer and arm (x = max |a|, symlog)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_accuracy_vs_bits(res: dict, path: Path) -> Path:
    """Accuracy vs bit setting, one panel per PTQ method, one line per float arm (dashed = its full
    precision accuracy); QAT arms appear in every panel as black markers at their own bits."""
    plt = _plt()
    methods = sorted({c["method"] for c in res["cells"]}) or ["(none)"]
    arms, qrows, kinds = float_arms(res), qat_rows(res), qat_kinds(res)
    settings = sorted({c["bits"] for c in res["cells"]} | {r["bits"] for r in qrows}, key=_bits_key, reverse=True)
    xpos = {b: i for i, b in enumerate(settings)}            # fewest bits on the left
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, method in zip(axes[0], methods):
        for j, arm in enumerate(arms):
            cells = sorted((c for c in res["cells"] if c["arm"] == arm and c["method"] == method),
                           key=lambda c: xpos[c["bits"]])
            color = colors[j % len(colors)]
            ax.plot([xpos[c["bits"]] for c in cells], [100 * c["accuracy"] for c in cells], marker="o",
                    color=color, label=arm)
            ax.axhline(100 * res["arms"][arm]["fp_accuracy"], ls="--", lw=0.8, color=color)
        for k, kind in enumerate(kinds):
            pts = [r for r in qrows if r["kind"] == kind]
            ax.scatter([xpos[r["bits"]] for r in pts], [100 * r["qat_accuracy"] for r in pts], color="k",
                       marker="*^sD"[k % 4], s=50, zorder=3, label=f"{kind} (own bits)")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(f"PTQ: {method}")
        ax.set_xlabel("bits")
        ax.set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig_qat(res: dict, path: Path) -> Path | None:
    """Fig. 3: QAT accuracy per bit setting, QAT vs QAT+S2D bars."""
    rows = qat_rows(res)
    if not rows:
        return None
    plt = _plt()
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, ax = plt.subplots(figsize=(5, 4))
    w = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        vals = {r["bits"]: 100 * r["qat_accuracy"] for r in rows if r["kind"] == kind}
        ax.bar([i + (j - (len(kinds) - 1) / 2) * w for i in range(len(bits))], [vals.get(b, 0) for b in bits],
               width=w, label=kind)
    ax.set_xticks(range(len(bits)), bits)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Quantization-aware training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report

FIGURE_CAPTIONS = {
    "outliers_over_steps": "Fig. 1: max |a| of the worst FFN layer over training steps, per arm",
    "violins": "Fig. 2: FFN activation distributions per layer and arm",
    "accuracy_vs_bits": "Accuracy vs bits per arm and PTQ method (QAT arms at their own bits)",
    "qat": "Fig. 3: QAT vs QAT+S2D accuracy",
}


def accuracy_caption(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> str:
    """One line explaining the main table."""
    text = (f"Accuracy (%) per bit setting x PTQ method (rows) and arm (columns); in parentheses the "
            f"difference to {baseline} in percentage points")
    if qat_kinds(res):
        text += f" (QAT rows: each QAT arm at its own bits, difference to {qat_baseline})"
    return text + "."


def terminal_summary(res: dict, out_dir: Path | str | None = None, baseline: str = "adamw") -> str:
    """What `s2d run` prints at the end: where the files are, notes, and the main table last."""
    lines = []
    if out_dir is not None:
        lines.append(f"report: {out_dir}/report.md   results: {out_dir}/results.json")
    lines += [f"note: {n}" for n in res["notes"]]
    lines += ["", f"{accuracy_caption(res, baseline)} Wall time {res['wall_s']:.0f} s.",
              format_accuracy_table(res, baseline)]
    return "\n".join(lines)


def render_markdown(res: dict, figures: dict[str, str], baseline: str = "adamw") -> str:
    cfg = res["config"]
    parts = [f"# s2d run: {cfg.get('name', 'experiment')}", "",
             f"Model `{cfg['model']['name']}` on `{cfg['data']['dataset']}`; fingerprint `{res['fingerprint']}`; "
             f"wall time {res['wall_s']:.0f} s (this invocation); machine: {res['machine'].get('platform')}, "
             f"{res['machine'].get('cpu_count')} CPUs{', GPU ' + ', '.join(res['machine']['gpu']) if res['machine'].get('gpu') else ''}.",
             f"PTQ methods: {', '.join(res['methods']) or 'none'}.", ""]
    if res["notes"]:
        parts += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    parts += ["## Accuracy (Table 2 style)", "", accuracy_caption(res, baseline), "",
              format_accuracy_table(res, baseline), ""]
    qat = format_qat_table(res)
    if qat:
        parts += ["## Quantization-aware training (accuracy % at the arm's own bits; delta = qat+s2d - qat)",
                  "", qat, ""]
    parts += ["## FFN layers after fine-tuning (Table 3 style)", "",
              "PCDR_1, max |a| (on the probe batches) and σ_max of every FFN Linear, per arm "
              "(QAT arms: float weights after training).", "", format_layer_table(res), ""]
    parts += ["## Arms", "", "| arm | optimizer | S2D | FP acc | train s | final loss |", "|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        s2d = a["s2d"]
        s2d_txt = "-" if not s2d else (f"λ={s2d['strength']:g} n={s2d['power']:g} τ={s2d['tau']:g} "
                                       f"k≤{s2d['k_max']} every {s2d['interval']} ({s2d['selection']}, {s2d['update']})")
        parts.append(f"| {name} | {a['optimizer']} | {s2d_txt} | {100 * a['fp_accuracy']:.2f} | "
                     f"{a['train'].get('wall_s', 0):.0f} | {a['train'].get('final_loss', float('nan')):.4f} |")
    parts += ["", "## Figures", ""]
    for key, rel in figures.items():
        parts += [f"**{FIGURE_CAPTIONS.get(key, key)}**", "", f"![{key}]({rel})", ""]
    parts += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    return "\n".join(parts)


def write_report(result: Any, out_dir: Path | str, baseline: str = "adamw") -> dict:
    """Write results.json, report.md and figures/*.png into `out_dir`; returns the results dict."""
    from s2d.experiment import write_json

    out = Path(out_dir)
    res = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    res["versions"] = res.get("versions") or versions()
    res["machine"] = res.get("machine") or machine()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, str] = {}
    for key, fn in (("outliers_over_steps", fig_outliers_over_steps), ("violins", fig_violins),
                    ("accuracy_vs_bits", fig_accuracy_vs_bits), ("qat", fig_qat)):
        path = fn(res, fig_dir / f"{key}.png")
        if path is not None:
            figs[key] = str(Path("figures") / path.name)
    res["figures"] = figs
    write_json(out / "results.json", res)
    md = render_markdown(res, figs, baseline)
    tmp = out / "report.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "report.md")
    return res
