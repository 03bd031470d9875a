"""From the per-example outcomes of an `s2d run` to estimates and comparisons (:mod:`s2d.stats`).

The results dict (``dataclasses.asdict(ExperimentResult)``) holds, for every (arm, seed), the test
outcomes at full precision (and, for QAT arms, at their own bits), and for every PTQ cell the outcomes
of that (arm, seed, method, bits). A *column* of the main table is a float arm or a QAT kind; a *row*
is "FP", a PTQ (bits, method) or a "QAT" bits row. Each row's column gets the mean over seeds with a
95 % CI, and each non-baseline column the paired difference to the row's baseline column, over the
seeds both have.
"""
from __future__ import annotations

import math

import numpy as np

from s2d.pipeline.rundir import unpack_outcomes
from s2d.quant import Bits
from s2d.stats import Comparison, Estimate, cell_estimate, paired_comparison

__all__ = ["METRICS", "float_arms", "qat_kinds", "table_columns", "bits_key", "outcome_grid", "accuracy_rows",
           "has_nll", "verdict", "perplexity_verdict", "ratio_pct", "format_ratio", "estimate_pct", "selected_max_abs",
           "outlier_reduction", "deployed_rows"]

Key = tuple[str, str]            # (bits, method): ("FP", "-"), ("W4A4", "repq"), ("W4A4", "QAT")


def float_arms(res: dict) -> list[str]:
    """Names of the arms trained in float (not QAT), in config order."""
    return [n for n, a in res["arms"].items() if a.get("qat_bits") is None]


def qat_kinds(res: dict) -> list[str]:
    """Kinds of the QAT arms ("qat", "qat+s2d"), in config order: the QAT columns of the main table."""
    return list(dict.fromkeys(a["kind"] for a in res["arms"].values() if a.get("qat_bits")))


def table_columns(res: dict) -> list[str]:
    """Columns of the main table: the float arms, then one column per QAT kind."""
    return float_arms(res) + qat_kinds(res)


def bits_key(bits: str) -> tuple[int, int]:
    """Sort key of a "WxAy" label: most bits first."""
    parsed = Bits.parse(bits)
    return -parsed.w, -parsed.a


METRICS = {"accuracy": ("fp_correct", "correct"), "nll": ("fp_nll", "nll")}  # metric -> (run, cell) field


def outcome_grid(res: dict, metric: str = "accuracy") -> dict[Key, dict[str, dict[int, np.ndarray]]]:
    """(bits, method) -> column -> seed -> per-example outcomes (n,): correctness (``metric="accuracy"``)
    or the causal LM's text NLL in nats/token (``"nll"``; no QAT rows)."""
    run_field, cell_field = METRICS[metric]
    grid: dict[Key, dict[str, dict[int, np.ndarray]]] = {}
    floats = set(float_arms(res))
    for r in res["runs"]:
        if r["name"] in floats and r.get(run_field):
            grid.setdefault(("FP", "-"), {}).setdefault(r["name"], {})[r["seed"]] = unpack_outcomes(r[run_field])
        if metric == "accuracy" and r.get("qat_bits") and r.get("qat_correct"):
            col = grid.setdefault((r["qat_bits"], "QAT"), {}).setdefault(r["kind"], {})
            col[r["seed"]] = unpack_outcomes(r["qat_correct"])
    for c in res["cells"]:
        if c.get(cell_field):
            grid.setdefault((c["bits"], c["method"]), {}).setdefault(c["arm"], {})[c["seed"]] = \
                unpack_outcomes(c[cell_field])
    return grid


def _stack(by_seed: dict[int, np.ndarray], seeds: list[int]) -> np.ndarray:
    return np.stack([by_seed[s] for s in seeds]).astype(float)


def accuracy_rows(res: dict, baseline: str = "adamw", qat_baseline: str = "qat", metric: str = "accuracy") -> list[dict]:
    """Rows of the main (Table-2 style) table: "FP" first, then per bit setting (descending) one row per
    PTQ method (alphabetical) and, where QAT arms trained at that setting, a "QAT" row.

    Each row: {"bits", "method", "baseline", "values": {column: Estimate}, "deltas": {column:
    Comparison against the baseline column}} (accuracies in [0, 1], or mean NLL in nats/token for
    ``metric="nll"``; no deltas when the row's baseline has no outcomes). The baseline is ``baseline``
    for FP/PTQ rows and ``qat_baseline`` for QAT rows.
    """
    grid = outcome_grid(res, metric)
    order = sorted(grid, key=lambda k: (k != ("FP", "-"), bits_key(k[0]) if k[0] != "FP" else (0, 0),
                                        k[1] == "QAT", k[1]))
    rows = []
    for key in order:
        base = qat_baseline if key[1] == "QAT" else baseline
        cols = grid[key]
        values = {c: cell_estimate(_stack(by, sorted(by))) for c, by in cols.items()}
        deltas: dict[str, Comparison] = {}
        if base in cols:
            for c, by in cols.items():
                shared = sorted(set(by) & set(cols[base]))
                if c != base and shared:
                    deltas[c] = paired_comparison(_stack(by, shared), _stack(cols[base], shared))
        rows.append({"bits": key[0], "method": key[1], "baseline": base, "values": values, "deltas": deltas})
    return rows


def verdict(res: dict, arm: str, baseline: str = "adamw") -> list[str]:
    """Sentences on ``arm`` against ``baseline`` from :func:`accuracy_rows`: the full-precision delta,
    the cells whose CI excludes 0 (improved, then worsened), and how many did not move."""
    rows = [r for r in accuracy_rows(res, baseline) if arm in r["deltas"] and r["method"] != "QAT"]
    if not rows:
        return []
    seeds = max(r["deltas"][arm].seeds for r in rows)
    examples = rows[0]["deltas"][arm].examples
    lines = [f"**{arm} vs {baseline}** ({seeds} seed(s) x {examples} test examples; 95 % CI, paired):"]
    fp = next((r for r in rows if r["bits"] == "FP"), None)
    if fp is not None:
        lines.append(f"- full precision {_delta(fp['deltas'][arm])}")
    ptq = [r for r in rows if r["bits"] != "FP"]
    up = [r for r in ptq if r["deltas"][arm].significant and r["deltas"][arm].delta > 0]
    down = [r for r in ptq if r["deltas"][arm].significant and r["deltas"][arm].delta < 0]
    for title, group in (("better", up), ("worse", down)):
        if group:
            lines.append(f"- {title}: " + "; ".join(f"{r['bits']} {r['method']} {_delta(r['deltas'][arm])}"
                                                   for r in group))
    lines.append(f"- no significant change in {len(ptq) - len(up) - len(down)} of {len(ptq)} PTQ cells")
    return lines


def has_nll(res: dict) -> bool:
    """Whether the run kept per-example text NLLs (a causal LM)."""
    return any(r.get("fp_nll") for r in res["runs"])


def perplexity_verdict(res: dict, arm: str, baseline: str = "adamw") -> list[str]:
    """Sentences on ``arm``'s held-out perplexity against ``baseline``: the full-precision ratio and
    the PTQ cells whose CI excludes no change, as perplexity ratios in % (exp of the NLL difference)."""
    rows = [r for r in accuracy_rows(res, baseline, metric="nll") if arm in r["deltas"]]
    if not rows:
        return []
    fp = next((r for r in rows if r["bits"] == "FP"), None)
    lines = [f"- held-out perplexity, full precision {_ratio(fp['deltas'][arm])}" if fp else None]
    ptq = [r for r in rows if r["bits"] != "FP"]
    sig = [r for r in ptq if r["deltas"][arm].significant]
    if sig:
        lines.append("- perplexity changed: " + "; ".join(f"{r['bits']} {r['method']} {_ratio(r['deltas'][arm])}"
                                                        for r in sig))
    lines.append(f"- perplexity unchanged in {len(ptq) - len(sig)} of {len(ptq)} PTQ cells")
    return [ln for ln in lines if ln]


def ratio_pct(c: Comparison) -> tuple[float, float, float]:
    """An NLL difference as the perplexity ratio arm / baseline - 1, in % (delta, lo, hi)."""
    return tuple(100 * math.expm1(v) for v in (c.delta, c.lo, c.hi))


def format_ratio(c: Comparison) -> str:
    """A paired NLL difference as ``"+d % [+lo, +hi]"`` (:func:`ratio_pct`), ``*`` appended when significant."""
    d, lo, hi = ratio_pct(c)
    return f"{d:+.2f} % [{lo:+.2f}, {hi:+.2f}]" + ("*" if c.significant else "")


def _ratio(c: Comparison) -> str:
    d, lo, hi = ratio_pct(c)
    return f"{d:+.2f} % [{lo:+.2f}, {hi:+.2f}], p={c.p:.3g}" + (" (significant)" if c.significant else "")


def _delta(c: Comparison) -> str:
    return (f"{100 * c.delta:+.2f} pp [{100 * c.lo:+.2f}, {100 * c.hi:+.2f}], p={c.p:.3g}"
            + (" (significant)" if c.significant else ""))


def estimate_pct(e: Estimate) -> tuple[float, float, float]:
    """(mean, lo, hi) in percent, for plots."""
    return 100 * e.mean, 100 * e.lo, 100 * e.hi


def selected_max_abs(before: list[dict], after: list[dict]) -> tuple[float, float, list[str]]:
    """Worst max |a| over the layers PCDR selects in ``before`` (k_target set), in ``before`` and in
    ``after`` (two per-layer probe tables, `LayerReport` dicts), and those layers' names."""
    names = [r["name"] for r in before if r["k_target"] is not None and math.isfinite(r["max_abs"])]
    by_name = {r["name"]: r for r in after}
    names = [n for n in names if n in by_name]
    if not names:
        return math.nan, math.nan, []
    return (max(r["max_abs"] for r in before if r["name"] in names),
            max(by_name[n]["max_abs"] for n in names), names)


def outlier_reduction(res: dict, baseline: str = "adamw") -> list[dict]:
    """Per float arm but the baseline: the worst max |a| over the layers PCDR selects in the baseline's
    model of the same seed, baseline vs arm, and their ratio, over the seeds both have.

    Returns rows {"arm", "seeds", "layers" (mean count), "baseline", "arm_max_abs" (means), "ratio" (mean
    of the per-seed ratios), "ratio_min", "ratio_max"}."""
    probes = {(r["name"], r["seed"]): r.get("probes") or [] for r in res["runs"]}
    rows = []
    for arm in float_arms(res):
        if arm == baseline:
            continue
        per_seed = [selected_max_abs(probes[(baseline, s)], probes[(arm, s)]) for b, s in probes
                    if b == arm and (baseline, s) in probes]
        per_seed = [t for t in per_seed if t[2]]
        if not per_seed:
            continue
        ratios = [b / a for b, a, _ in per_seed]
        rows.append({"arm": arm, "seeds": len(per_seed), "layers": float(np.mean([len(t[2]) for t in per_seed])),
                     "baseline": float(np.mean([t[0] for t in per_seed])),
                     "arm_max_abs": float(np.mean([t[1] for t in per_seed])), "ratio": float(np.mean(ratios)),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def deployed_rows(res: dict, baseline: str = "adamw") -> list[dict]:
    """One row per arm of the "deployed (int8)" table, from ``res["deployed"]`` (DeployedResult dicts).

    Each row: {"arm", "methods" (the best W8A8 method of each seed), "value": Estimate of the deployed
    accuracy over seeds and examples, "fake": mean s2d fake-quant accuracy, "agreement", "fp32_ms",
    "int8_ms" (means over seeds), "delta": Comparison of the deployed accuracy with ``baseline``'s over
    the seeds both have (None for the baseline or without it)}.
    """
    by_arm: dict[str, dict[int, dict]] = {}
    for d in res.get("deployed", []):
        by_arm.setdefault(d["arm"], {})[d["seed"]] = d
    outcomes = {a: {s: unpack_outcomes(d["deployed_correct"]) for s, d in by.items()} for a, by in by_arm.items()}
    rows = []
    for arm, by in by_arm.items():
        seeds = sorted(by)
        shared = sorted(set(by) & set(by_arm.get(baseline, {})))
        delta = None
        if arm != baseline and shared:
            delta = paired_comparison(_stack(outcomes[arm], shared), _stack(outcomes[baseline], shared))
        rows.append({"arm": arm, "methods": [by[s]["method"] for s in seeds],
                     "value": cell_estimate(_stack(outcomes[arm], seeds)), "delta": delta,
                     **{k: float(np.mean([by[s][k] for s in seeds]))
                        for k in ("fake_accuracy", "agreement", "fp32_ms", "int8_ms")}})
    return rows
