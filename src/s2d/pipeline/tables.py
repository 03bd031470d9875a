"""The tables of an `s2d run` report, as pure functions of the results dict
(``dataclasses.asdict(ExperimentResult)``):

(a) Table-2 style accuracy table: rows = bit setting x PTQ method, columns = arms, mean ± 95 % CI over
    the seeds and the paired delta vs the baseline arm (default "adamw") with its CI, in pp;
(a') causal LMs: the same for held-out perplexity (ratios to the baseline instead of differences);
(b) Table-3 style per-layer table of the FFN layers: PCDR_1, max |a|, σ_max per arm;
(b') the pair alignment table (Colinearity Decay's measure, every arm) per pair kind;
(c) the per-layer table of ``s2d inspect``, its table of where the FFN outputs peak, and the ranked
    quantization sites of its sensitivity analysis (also in the report).
"""
from __future__ import annotations

import math

from s2d.models import is_ffn_name
from s2d.pipeline.evidence import (accuracy_rows, deployed_rows, float_arms, format_ratio, has_nll, qat_kinds,
                                   table_columns)
from s2d.stats import format_comparison, format_estimate

__all__ = ["format_accuracy_table", "format_deployed_table", "format_perplexity_table", "format_qat_table", "is_ffn", "layer_rows", "format_layer_table",
           "format_alignment_table", "format_lowrank_table", "format_lowrank_arms_table",
           "format_inspect_table", "format_condition_table", "format_outlier_table", "format_peak_table", "format_sensitivity_table",
           "short_name"]


def format_accuracy_table(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> str:
    """Markdown of :func:`~s2d.pipeline.evidence.accuracy_rows`: accuracy in % as mean ±95 % CI half-width
    over the seeds, and in parentheses the paired difference to the row's baseline in pp with its CI;
    ``*`` marks a difference whose CI excludes 0."""
    cols = table_columns(res)
    lines = ["| bits | method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for row in accuracy_rows(res, baseline, qat_baseline):
        cells = []
        for a in cols:
            est = row["values"].get(a)
            if est is None:
                cells.append("-")
            elif a in row["deltas"]:
                cells.append(f"{format_estimate(est)} ({format_comparison(row['deltas'][a])})")
            else:
                cells.append(format_estimate(est))
        lines.append(f"| {row['bits']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_deployed_table(res: dict, baseline: str = "adamw") -> str:
    """Markdown of :func:`~s2d.pipeline.evidence.deployed_rows` ("" when the run deployed nothing): the
    deployed accuracy in % (mean ±95 % CI; in parentheses the paired delta to ``baseline`` in pp), s2d's
    fake-quant accuracy of the same cells, the per-example agreement, and ms per test batch."""
    rows = deployed_rows(res, baseline)
    if not rows:
        return ""
    lines = ["| arm | W8A8 method | deployed int8 (ONNX Runtime) | s2d fake quant | agreement | "
             "torch fp32 ms | int8 ms | speed-up |", "|" + "---|" * 8]
    for r in rows:
        value = format_estimate(r["value"]) + (f" ({format_comparison(r['delta'])})" if r["delta"] else "")
        lines.append(f"| {r['arm']} | {', '.join(sorted(set(r['methods'])))} | {value} | "
                     f"{100 * r['fake_accuracy']:.2f} | {100 * r['agreement']:.2f} % | {r['fp32_ms']:.1f} | "
                     f"{r['int8_ms']:.1f} | {r['fp32_ms'] / r['int8_ms']:.2f}× |")
    return "\n".join(lines)


def format_perplexity_table(res: dict, baseline: str = "adamw") -> str:
    """Markdown of the held-out perplexity (causal LMs): exp of the mean per-example text NLL with its
    95 % CI, and in parentheses the perplexity ratio to the baseline - 1 in % with its CI (``*``: the
    CI excludes 0); "" when the run has no NLLs."""
    if not has_nll(res):
        return ""
    cols = float_arms(res)
    lines = ["| bits | method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for row in accuracy_rows(res, baseline, metric="nll"):
        cells = []
        for a in cols:
            est = row["values"].get(a)
            if est is None:
                cells.append("-")
                continue
            text = f"{math.exp(est.mean):.2f} [{math.exp(est.lo):.2f}, {math.exp(est.hi):.2f}]"
            if a in row["deltas"]:
                text += f" ({format_ratio(row['deltas'][a])})"
            cells.append(text)
        lines.append(f"| {row['bits']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_qat_table(res: dict, qat_baseline: str = "qat") -> str:
    """Markdown table of the QAT kinds at their own bits with the paired delta to ``qat_baseline``
    ("" without QAT arms)."""
    rows = [r for r in accuracy_rows(res, qat_baseline=qat_baseline) if r["method"] == "QAT"]
    if not rows:
        return ""
    kinds = qat_kinds(res)
    others = [k for k in kinds if k != qat_baseline]
    head = ["bits", *kinds] + [f"{k} - {qat_baseline}" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [format_estimate(r["values"][k]) if k in r["values"] else "-" for k in kinds]
        cells += [format_comparison(r["deltas"][k]) if k in r["deltas"] else "-" for k in others]
        lines.append(f"| {r['bits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def is_ffn(report: dict) -> bool:
    """Whether a LayerReport dict is an FFN Linear: by its role, or by its name for unrecognised models."""
    role = report.get("role")
    if role in ("fc1", "fc2"):
        return True
    return role in (None, "linear", "other") and is_ffn_name(report["name"])


def layer_rows(res: dict, arms: list[str] | None = None) -> list[dict]:
    """Table-3 rows, one per FFN layer: {"layer", "role", arm: {"pcdr1", "max_abs", "sigma_max"}}, each
    value the mean over the arm's seeds."""
    arms = arms or list(res["arms"])
    acc: dict[str, dict] = {}
    for run in res["runs"]:
        if run["name"] not in arms:
            continue
        for rep in run.get("probes", []):
            if not is_ffn(rep):
                continue
            row = acc.setdefault(rep["name"], {"layer": rep["name"], "role": rep.get("role", "linear")})
            vals = row.setdefault(run["name"], {"pcdr1": [], "max_abs": [], "sigma_max": []})
            vals["pcdr1"].append(rep["pcdr"][0] if rep["pcdr"] else float("nan"))
            vals["max_abs"].append(rep["max_abs"])
            vals["sigma_max"].append(rep["sigma_max"])
    for row in acc.values():
        for arm in arms:
            if arm in row:
                row[arm] = {k: sum(v) / len(v) for k, v in row[arm].items()}
    return list(acc.values())


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


def format_alignment_table(res: dict) -> str:
    """Markdown: per arm and pair kind, mean R·d_mid, mean top alignment and the largest σ_max of the
    pairs' weights, each averaged over the arm's seeds ("" when no run measured pair alignment)."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    for run in res["runs"]:
        by_kind: dict[str, list[dict]] = {}
        for p in run.get("alignment", []):
            by_kind.setdefault(p["kind"], []).append(p)
        for kind, pairs in by_kind.items():
            vals = acc.setdefault((run["name"], kind), {"alignment": [], "top": [], "sigma": []})
            vals["alignment"].append(sum(p["alignment"] for p in pairs) / len(pairs))
            vals["top"].append(sum(p["top_alignment"] for p in pairs) / len(pairs))
            vals["sigma"].append(max(max(p["sigma_first"], p["sigma_second"]) for p in pairs))
    if not acc:
        return ""
    lines = ["| arm | pairs | alignment R·d (1 = chance) | top alignment | max σ_max |", "|---|---|---|---|---|"]
    for (arm, kind), v in acc.items():
        mean = {k: sum(x) / len(x) for k, x in v.items()}
        lines.append(f"| {arm} | {kind} | {mean['alignment']:.2f} | {mean['top']:.3f} | {mean['sigma']:.2f} |")
    return "\n".join(lines)


def format_lowrank_table(rows: list[dict]) -> str:
    """Markdown of ``s2d lowrank``'s LayerRank dicts: the rank each construction needs per Linear."""
    t = rows[0]["threshold"] if rows else 0.0
    lines = [f"| layer | role | shape | full rank | break-even | weight space: rank for ≤{t:.0%} output error | "
             f"feature space: rank for ≤{t:.0%} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        full = r["full_rank"]
        lines.append(f"| {short_name(r['name'])} | {r['role']} | {r['shape'][0]}x{r['shape'][1]} | {full} | "
                     f"{r['break_even']} | {r['weight_rank']} ({r['weight_rank'] / full:.0%}) | "
                     f"{r['feature_rank']} ({r['feature_rank'] / full:.0%}) |")
    return "\n".join(lines)


_ROLE_GROUPS = {"attention": ("q", "k", "v", "qkv", "attn_out"), "FFN up": ("fc1",), "FFN down": ("fc2",)}


def format_lowrank_arms_table(summaries: list[dict]) -> str:
    """Markdown, one line per arm (mean over its seeds): the rank each construction needs as a share of
    the full rank, per role group, and the parameter share a threshold plan keeps (``s2d lowrank RUN``)."""
    by_arm: dict[str, list[dict]] = {}
    for s in summaries:
        by_arm.setdefault(s["arm"], []).append(s)
    t = summaries[0]["layers"][0]["threshold"] if summaries and summaries[0]["layers"] else 0.0
    groups = list(_ROLE_GROUPS)
    lines = ["| arm | seeds | " + " | ".join(f"{g}: feature / weight rank" for g in groups)
             + f" | params kept at ≤{t:.0%} error: feature / weight |", "|---" * (len(groups) + 3) + "|"]
    for arm, runs in by_arm.items():
        cells = []
        for g in groups:
            shares = {sp: [r[f"{sp}_rank"] / r["full_rank"] for s in runs for r in s["layers"]
                           if r["role"] in _ROLE_GROUPS[g]] for sp in ("feature", "weight")}
            cells.append(" / ".join(f"{sum(v) / len(v):.0%}" if v else "-" for v in shares.values()))
        kept = " / ".join(f"{sum(s[f'{sp}_params'] for s in runs) / len(runs):.0%}" for sp in ("feature", "weight"))
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + f" | {kept} |")
    return "\n".join(lines)


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


def format_outlier_table(rows: list[dict], baseline: str = "adamw") -> str:
    """Markdown of :func:`s2d.pipeline.evidence.outlier_reduction` rows."""
    lines = [f"| arm | seeds | layers PCDR selects in {baseline} | worst max \\|a\\| {baseline} | worst max \\|a\\| arm | "
             f"{baseline} / arm (mean, min..max over seeds) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['layers']:.1f} | {r['baseline']:.1f} | {r['arm_max_abs']:.1f} | "
                     f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) |")
    return "\n".join(lines)


def format_condition_table(before: list[dict], after: list[dict]) -> str:
    """Markdown of two `LayerReport` dict lists of one model (before / after conditioning), joined by name:
    σ_max, PCDR_1, k_target (before) and max |a| with its before/after ratio."""
    head = ["layer", "role", "σ_max", "PCDR_1", "k_target", r"max \|a\|", r"max \|a\| ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_name = {r["name"]: r for r in after}
    for b in before:
        a = by_name.get(b["name"])
        if a is None:
            continue
        pcdr = " -> ".join(f"{r['pcdr'][0]:.3f}" if r["pcdr"] else "-" for r in (b, a))
        ratio = b["max_abs"] / a["max_abs"] if a["max_abs"] > 0 else math.nan
        lines.append(f"| {b['name']} | {b.get('role', '-')} | {b['sigma_max']:.2f} -> {a['sigma_max']:.2f} | {pcdr} | "
                     f"{'-' if b['k_target'] is None else b['k_target']} | {b['max_abs']:.1f} -> {a['max_abs']:.1f} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def format_peak_table(layers: list[dict], peaks: dict[str, dict], tokens: dict[str, str]) -> str:
    """Markdown of the FFN down-projections (fc2 role): max |a|, where it sits (token position, the token,
    channel) and PCDR_1..k; ``peaks``: name -> PeakLocation dict, ``tokens``: name -> decoded token."""
    rows = [r for r in layers if r.get("role") == "fc2" and r["name"] in peaks]
    k = max((len(r["pcdr"]) for r in rows), default=0)
    head = ["layer", r"max \|a\|", "token position", "token", "channel"] + [f"PCDR_{i + 1}" for i in range(k)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = peaks[r["name"]]
        pcdr = [f"{v:.3f}" for v in r["pcdr"]] + ["-"] * (k - len(r["pcdr"]))
        token = tokens.get(r["name"], "-").replace("|", "\\|").replace("\n", "\\n")
        lines.append(f"| {r['name']} | {p['max_abs']:.1f} | {'-' if p['token'] is None else p['token']} | "
                     f"`{token}` | {p['channel']} | " + " | ".join(pcdr) + " |")
    return "\n".join(lines)


def format_sensitivity_table(report: dict, layers: list[dict], top: int | None = None) -> str:
    """Markdown of a SensitivityReport dict joined with the spectral view of each site's module
    (``layers``: LayerReport dicts): the sites ranked by held-out KL (top ``top``)."""
    spectral = {r["name"]: r for r in layers}
    head = ["rank", "site", "role", r"max \|x\| at the site", "KL held-out", "KL calib", "agreement %", "acc alone %",
            "recovered pp", r"module max \|a\|", "PCDR_1", "S2D selects"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, site in enumerate(report["sites"][:top], start=1):
        layer = spectral.get(site["module"], {})
        rng = site["range"]
        pcdr = layer.get("pcdr") or []
        selected = "-" if not layer else ("yes" if layer.get("k_target") is not None else "no")
        cells = [str(i), site["module"], site["role"], "-" if rng is None else f"{max(abs(rng[0]), abs(rng[1])):.1f}",
                 f"{site['kl']:.4f}", f"{site['kl_calib']:.4f}", f"{100 * site['agreement']:.1f}",
                 "-" if site["accuracy"] is None else f"{100 * site['accuracy']:.1f}",
                 "-" if site["recovered"] is None else f"{100 * site['recovered']:+.1f}",
                 f"{layer['max_abs']:.1f}" if layer else "-", f"{pcdr[0]:.3f}" if pcdr else "-", selected]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short_name(name: str) -> str:
    """A layer name shortened for tables and plots ("bert.encoder.layer.0.output.dense" -> "L0.fc2")."""
    return (name.replace("encoder.layer.", "L").replace("bert.", "").replace("mpnet.", "")
            .replace("intermediate.dense", "fc1").replace("output.dense", "fc2").replace("dinov2.", ""))
