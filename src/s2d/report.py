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


def accuracy_rows(res: dict, baseline: str = "adamw") -> list[dict]:
    """Rows of the main table: first "FP" (full precision), then each (bits, method) in descending bits.

    Each row: {"bits", "method", "values": {arm: accuracy}, "deltas": {arm: (acc - baseline acc) * 100}}
    (deltas in percentage points; empty when the baseline has no value in that row).
    """
    arms = float_arms(res)
    rows = [{"bits": "FP", "method": "-", "values": {a: res["arms"][a]["fp_accuracy"] for a in arms}}]
    grid: dict[tuple[str, str], dict[str, float]] = {}
    for c in res["cells"]:
        grid.setdefault((c["bits"], c["method"]), {})[c["arm"]] = c["accuracy"]
    for bits, method in sorted(grid, key=lambda k: (_bits_key(k[0]), k[1])):
        rows.append({"bits": bits, "method": method, "values": grid[(bits, method)]})
    for row in rows:
        base = row["values"].get(baseline)
        row["deltas"] = {} if base is None else {a: (v - base) * 100 for a, v in row["values"].items()}
    return rows


def format_accuracy_table(res: dict, baseline: str = "adamw") -> str:
    """Markdown of `accuracy_rows`: accuracy in %, delta vs the baseline in parentheses."""
    arms = float_arms(res)
    head = "| bits | method | " + " | ".join(arms) + " |"
    lines = [head, "|" + "---|" * (len(arms) + 2)]
    for row in accuracy_rows(res, baseline):
        cells = []
        for a in arms:
            v = row["values"].get(a)
            if v is None:
                cells.append("-")
            elif a == baseline or a not in row["deltas"]:
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
    head = ["layer", "role", "shape", "σ_max"] + [f"PCDR_{i + 1}" for i in range(k)] + ["k_target", "max |a|", "kurtosis"]
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


def fig_violins(res: dict, path: Path, arms: list[str] | None = None) -> Path:
    """Fig. 2: violin plots of FFN activation samples per layer, one colour per arm; x marks max |a|."""
    plt = _plt()
    arms = arms or float_arms(res)
    layers = list(dict.fromkeys(k for a in arms for k in res["arms"][a].get("activations", {})))
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(layers) * max(1, len(arms)) / 2), 4.5))
    width = 0.8 / max(1, len(arms))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, arm in enumerate(arms):
        acts = res["arms"][arm].get("activations", {})
        pos = [i + (j - (len(arms) - 1) / 2) * width for i, l in enumerate(layers) if acts.get(l, {}).get("sample")]
        data = [acts[l]["sample"] for l in layers if acts.get(l, {}).get("sample")]
        if not data:
            continue
        parts = ax.violinplot(data, positions=pos, widths=width * 0.9, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(colors[j % len(colors)])
            body.set_alpha(0.6)
        maxes = [acts[l]["max_abs"] for l in layers if acts.get(l, {}).get("sample")]
        ax.scatter(pos, maxes, marker="x", color=colors[j % len(colors)], s=18, label=f"{arm} (x = max |a|)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(range(len(layers)), [_short(l) for l in layers], rotation=60, fontsize=7)
    ax.set_ylabel("activation (symlog)")
    ax.set_title("FFN output activations per layer and arm")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fig_accuracy_vs_bits(res: dict, path: Path) -> Path:
    """Accuracy vs bit setting, one panel per PTQ method, one line per arm; dashed = full precision."""
    plt = _plt()
    methods = sorted({c["method"] for c in res["cells"]})
    arms = float_arms(res)
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.5 * max(1, len(methods)), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, method in zip(axes[0], methods):
        for j, arm in enumerate(arms):
            cells = sorted((c for c in res["cells"] if c["arm"] == arm and c["method"] == method),
                           key=lambda c: _bits_key(c["bits"]), reverse=True)
            ax.plot([c["bits"] for c in cells], [100 * c["accuracy"] for c in cells], marker="o",
                    color=colors[j % len(colors)], label=arm)
            ax.axhline(100 * res["arms"][arm]["fp_accuracy"], ls="--", lw=0.8, color=colors[j % len(colors)])
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

def summary(res: dict, baseline: str = "adamw") -> str:
    """Plain-language lines: per bit setting, best delta of each S2D arm vs the baseline."""
    lines = []
    for row in accuracy_rows(res, baseline):
        for arm, d in row["deltas"].items():
            if arm != baseline and "s2d" in arm:
                lines.append(f"- {arm} vs {baseline} at {row['bits']} ({row['method']}): {d:+.2f} pp")
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
    parts += ["## Accuracy (%), delta vs " + baseline + " in percentage points", "",
              format_accuracy_table(res, baseline), ""]
    qat = format_qat_table(res)
    if qat:
        parts += ["## Quantization-aware training (accuracy % at the arm's own bits)", "", qat, ""]
    parts += ["## FFN layers after fine-tuning (Table 3 style)", "", format_layer_table(res), ""]
    parts += ["## Arms", "", "| arm | optimizer | S2D | FP acc | train s | final loss |", "|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        s2d = a["s2d"]
        s2d_txt = "-" if not s2d else (f"λ={s2d['strength']:g} n={s2d['power']:g} τ={s2d['tau']:g} "
                                       f"k≤{s2d['k_max']} every {s2d['interval']} ({s2d['selection']}, {s2d['update']})")
        parts.append(f"| {name} | {a['optimizer']} | {s2d_txt} | {100 * a['fp_accuracy']:.2f} | "
                     f"{a['train'].get('wall_s', 0):.0f} | {a['train'].get('final_loss', float('nan')):.4f} |")
    parts += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()]
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
