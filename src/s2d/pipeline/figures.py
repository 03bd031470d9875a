"""The figures of an `s2d run` report (matplotlib ``Figure`` objects, no pyplot state), each a function of the results dict:
Fig. 1 worst-layer max |a| over training steps, Fig. 2 FFN activation violins, accuracy vs bits,
Fig. 3 QAT bars; and ``s2d inspect``'s max |a| per layer.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from s2d.pipeline.evidence import accuracy_rows, bits_key, estimate_pct, float_arms, qat_kinds
from s2d.pipeline.tables import short_name

__all__ = ["fig_outliers_over_steps", "fig_violins", "fig_accuracy_vs_bits", "fig_qat", "fig_max_abs_per_layer",
           "fig_sensitivity", "FIGURES", "first_runs"]


def _finish(fig: Figure, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label a one-panel figure, add its legend, and save it at 120 dpi."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def first_runs(res: dict) -> dict[str, dict]:
    """Arm -> its run with the first seed (the curves and violins show one seed)."""
    first = res["seeds"][0]
    return {r["name"]: r for r in res["runs"] if r["seed"] == first}


def fig_outliers_over_steps(res: dict, path: Path) -> Path:
    """Fig. 1: worst FFN layer max |a| on a fixed probe batch vs optimizer step, one line per arm (first seed)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, run in first_runs(res).items():
        hist = [h for h in run["train"].get("probe_history", []) if h.get("worst_max_abs") is not None]
        if hist:
            ax.plot([h["step"] for h in hist], [h["worst_max_abs"] for h in hist], marker="o", ms=3, label=name)
    return _finish(fig, ax, path, "optimizer step", "max |a| of the worst FFN layer",
                   "Activation outliers during fine-tuning")


def fig_violins(activations: dict[str, dict[str, dict]], path: Path, ncols: int = 4) -> Path:
    """Fig. 2: violin plots of FFN activation samples, one panel per layer, one violin per arm;
    ``activations``: arm -> layer -> ActivationStats dict (a run: ``{a: r["activations"] for a, r in
    first_runs(res).items()}``); x marks each arm's max |a| (symlog axis)."""
    arms = list(activations)
    layers = list(dict.fromkeys(k for a in arms for k in activations[a]))
    n = max(1, len(layers))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(max(3.2, 0.45 * len(arms) + 1.2) * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for idx, layer in enumerate(layers):
        ax = axes[idx // ncols][idx % ncols]
        present = [(j, a) for j, a in enumerate(arms) if activations[a].get(layer, {}).get("sample")]
        if not present:
            continue
        stats = [activations[a][layer] for _, a in present]
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
    """Accuracy vs bit setting, one panel per PTQ method, one line per float arm with 95 % CI error bars
    over the seeds (dashed: its full-precision mean); QAT kinds appear in every panel as black markers
    at their own bits."""
    rows = accuracy_rows(res)
    methods = sorted({r["method"] for r in rows if r["method"] not in ("-", "QAT")}) or ["(none)"]
    settings = sorted({r["bits"] for r in rows if r["bits"] != "FP"}, key=bits_key, reverse=True)
    xpos = {b: i for i, b in enumerate(settings)}            # fewest bits on the left
    fp = next((r for r in rows if r["bits"] == "FP"), {"values": {}})
    fig = Figure(figsize=(4.5 * len(methods), 4))
    axes = fig.subplots(1, len(methods), squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, method in zip(axes[0], methods):
        for j, arm in enumerate(float_arms(res)):
            pts = sorted(((xpos[r["bits"]], estimate_pct(r["values"][arm])) for r in rows
                          if r["method"] == method and arm in r["values"]))
            color = colors[j % len(colors)]
            if pts:
                xs, est = [p[0] for p in pts], [p[1] for p in pts]
                ax.errorbar(xs, [e[0] for e in est], yerr=[[e[0] - e[1] for e in est], [e[2] - e[0] for e in est]],
                            marker="o", capsize=3, color=color, label=arm)
            if arm in fp["values"]:
                ax.axhline(estimate_pct(fp["values"][arm])[0], ls="--", lw=0.8, color=color)
        for k, kind in enumerate(qat_kinds(res)):
            pts = [(xpos[r["bits"]], estimate_pct(r["values"][kind])) for r in rows
                   if r["method"] == "QAT" and kind in r["values"] and r["bits"] in xpos]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                            yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]],
                            fmt="*^sD"[k % 4], color="k", ms=8, capsize=3, zorder=3, label=f"{kind} (own bits)")
        ax.set_xticks(range(len(settings)), settings)
        ax.set_title(f"PTQ: {method}")
        ax.set_xlabel("bits")
        ax.set_ylabel("accuracy (%), mean and 95 % CI")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def fig_qat(res: dict, path: Path) -> Path | None:
    """Fig. 3: QAT accuracy per bit setting, one bar per QAT kind with its 95 % CI."""
    rows = [r for r in accuracy_rows(res) if r["method"] == "QAT"]
    if not rows:
        return None
    kinds = qat_kinds(res)
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    w = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        est = [estimate_pct(r["values"][kind]) if kind in r["values"] else (0.0, 0.0, 0.0) for r in rows]
        ax.bar([i + (j - (len(kinds) - 1) / 2) * w for i in range(len(rows))], [e[0] for e in est], width=w,
               yerr=[[e[0] - e[1] for e in est], [e[2] - e[0] for e in est]], capsize=3, label=kind)
    ax.set_xticks(range(len(rows)), [r["bits"] for r in rows])
    ax.set_ylabel("accuracy (%), mean and 95 % CI")
    ax.set_title("Quantization-aware training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def fig_max_abs_per_layer(layers: list[dict], path: Path) -> Path:
    """max |a| of each Linear's output per block, one line per role (log scale): where in depth the
    outliers sit; ``layers``: LayerReport dicts of ``s2d inspect`` (model order)."""
    lines: dict[tuple[str, str], list[float]] = {}       # (role, Linear's own name) -> one value per block
    for r in layers:
        if r.get("role") not in (None, "other", "head", "linear"):
            lines.setdefault((r["role"], r["name"].rsplit(".", 1)[-1]), []).append(r["max_abs"])
    shared = {role for role, _ in lines if sum(k[0] == role for k in lines) > 1}   # gate + up: both fc1
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    for (role, leaf), values in lines.items():
        label = f"{role} ({leaf})" if role in shared else role
        ax.plot(range(len(values)), values, marker="o", ms=3, lw=2.0 if role == "fc2" else 1.0,
                label=f"{label} output" + (" (FFN down-projection)" if role == "fc2" else ""))
    ax.set_yscale("log")
    return _finish(fig, ax, path, "block", "max |a| on the probe batches", "Largest activation per layer")


def fig_sensitivity(reports: dict[str, dict], path: Path, top: int = 20) -> Path:
    """Held-out KL of each site quantized alone (log scale), for the ``top`` sites of the first report,
    one bar per report side by side (``reports``: label -> SensitivityReport dict)."""
    labels = list(reports)
    first = reports[labels[0]]["sites"][:top]
    names = [f"{short_name(s['module'])}:{s['role']}" for s in first]
    fig = Figure(figsize=(max(8, 0.45 * len(names) + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        kl = {s["site"]: s["kl"] for s in reports[label]["sites"]}
        ax.bar([i + j * width for i in range(len(first))], [max(kl.get(s["site"], 0.0), 1e-8) for s in first],
               width=width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(first))], names, rotation=70, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("KL(float || only this site quantized)")
    ax.set_title(f"Quantization damage per site at {reports[labels[0]]['bits']} ({reports[labels[0]]['method']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _violins_of_run(res: dict, path: Path) -> Path:
    return fig_violins({a: r.get("activations", {}) for a, r in first_runs(res).items()}, path)


def _sensitivity_of_run(res: dict, path: Path) -> Path | None:
    return fig_sensitivity(res["sensitivity"], path) if res.get("sensitivity") else None


FIGURES = {"outliers_over_steps": fig_outliers_over_steps, "violins": _violins_of_run,
           "accuracy_vs_bits": fig_accuracy_vs_bits, "qat": fig_qat, "sensitivity": _sensitivity_of_run}


def fig_lowrank(rows: list[dict], path: Path) -> Path:
    """Rank needed (share of the full rank) per Linear, weight space against feature space, with the
    break-even rank below which two factors hold fewer parameters; ``rows``: LayerRank dicts in model order."""
    fig = Figure(figsize=(max(8, 0.18 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    x = range(len(rows))
    for key, label, marker in (("weight_rank", "weight space (SVD of W)", "o"),
                               ("feature_rank", "feature space (PCA of the outputs)", "s")):
        ax.plot(x, [r[key] / r["full_rank"] for r in rows], marker=marker, ms=3, lw=1, label=label)
    ax.plot(x, [r["break_even"] / r["full_rank"] for r in rows], ls="--", color="grey", lw=1,
            label="break-even (fewer parameters below)")
    ax.set_xticks(list(x), [short_name(r["name"]) for r in rows], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    t = rows[0]["threshold"] if rows else 0.0
    return _finish(fig, ax, path, "Linear (model order)", "rank needed / full rank",
                   f"Rank that keeps the relative output error under {t:.0%}")
