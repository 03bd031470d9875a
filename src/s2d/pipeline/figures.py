"""The figures of an `s2d run` report (matplotlib ``Figure`` objects, no pyplot state), each a function of the results dict:
Fig. 1 worst-layer max |a| over training steps, Fig. 2 FFN activation violins, accuracy vs bits,
Fig. 3 QAT bars.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from s2d.pipeline.tables import bits_key, float_arms, qat_kinds, qat_rows, short_name

__all__ = ["fig_outliers_over_steps", "fig_violins", "fig_accuracy_vs_bits", "fig_qat", "FIGURES"]


def fig_outliers_over_steps(res: dict, path: Path) -> Path:
    """Fig. 1: worst FFN layer max |a| on a fixed probe batch vs optimizer step, one line per arm."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
    return path


def fig_violins(res: dict, path: Path, arms: list[str] | None = None, ncols: int = 4) -> Path:
    """Fig. 2: violin plots of FFN activation samples, one panel per layer, one violin per arm (all
    arms by default, QAT arms through their float path); x marks each arm's max |a| (symlog axis)."""
    arms = arms or list(res["arms"])
    layers = list(dict.fromkeys(k for a in arms for k in res["arms"][a].get("activations", {})))
    n = max(1, len(layers))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(max(3.2, 0.45 * len(arms) + 1.2) * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
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
        ax.set_title(short_name(layer), fontsize=8)
    for idx in range(len(layers), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.suptitle("FFN output activations per layer and arm (x = max |a|, symlog)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def fig_accuracy_vs_bits(res: dict, path: Path) -> Path:
    """Accuracy vs bit setting, one panel per PTQ method, one line per float arm (dashed = its full
    precision accuracy); QAT arms appear in every panel as black markers at their own bits."""
    methods = sorted({c["method"] for c in res["cells"]}) or ["(none)"]
    arms, qrows, kinds = float_arms(res), qat_rows(res), qat_kinds(res)
    settings = sorted({c["bits"] for c in res["cells"]} | {r["bits"] for r in qrows}, key=bits_key, reverse=True)
    xpos = {b: i for i, b in enumerate(settings)}            # fewest bits on the left
    fig = Figure(figsize=(4.5 * len(methods), 4))
    axes = fig.subplots(1, len(methods), squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
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
    return path


def fig_qat(res: dict, path: Path) -> Path | None:
    """Fig. 3: QAT accuracy per bit setting, QAT vs QAT+S2D bars."""
    rows = qat_rows(res)
    if not rows:
        return None
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
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
    return path


FIGURES = {"outliers_over_steps": fig_outliers_over_steps, "violins": fig_violins,
           "accuracy_vs_bits": fig_accuracy_vs_bits, "qat": fig_qat}
