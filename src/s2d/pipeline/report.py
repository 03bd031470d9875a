"""The report of an `s2d run`: results.json, report.md (tables of :mod:`s2d.pipeline.tables`) and the
figures of :mod:`s2d.pipeline.figures`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from s2d.pipeline.evidence import accuracy_rows, float_arms, outlier_reduction, perplexity_verdict, qat_kinds, verdict
from s2d.pipeline.experiment import ExperimentResult
from s2d.pipeline.figures import FIGURES
from s2d.pipeline.provenance import machine, versions
from s2d.pipeline.rundir import pack_outcomes, unpack_outcomes
from s2d.pipeline.tables import (format_accuracy_table, format_alignment_table, format_deployed_table, format_layer_table,
                                 format_outlier_table, format_perplexity_table, format_qat_table, format_sensitivity_table)
from s2d.utils import atomic_write, write_json, write_text

__all__ = ["FIGURE_CAPTIONS", "OUTCOMES", "accuracy_caption", "verdict_lines", "terminal_summary", "render_markdown",
           "write_report", "load_results"]

OUTCOMES = "outcomes.npz"     # beside results.json: every per-example outcome vector, keyed as below
_OUTCOME_FIELDS = (("runs", "fp_correct"), ("runs", "qat_correct"), ("cells", "correct"), ("runs", "fp_nll"),
                   ("cells", "nll"), ("deployed", "deployed_correct"))


ALIGNMENT_CAPTION = ("Every block's (attention value -> output) and (FFN up -> down) pair, per arm, mean over "
                     "the seeds: R·d = d_mid·‖BA‖²_F/(‖A‖²_F‖B‖²_F), the σ²-weighted alignment of B's input "
                     "directions with A's output directions (1 = chance orientation); top alignment = "
                     "‖BA‖₂/(‖A‖₂‖B‖₂) (1: the top directions line up); max σ_max over the pairs' weights "
                     "(docs/colinearity.md). CD acts on the first two, S2D on the last.")
DEPLOYED_CAPTION = ("Deployed (int8): each float arm's best W8A8 cell per seed (a grid without W8A8 cells: the "
                    "method with the best W8A8 fake-quant accuracy), exported to ONNX QuantizeLinear/"
                    "DequantizeLinear with that method's scales and run on ONNX Runtime's integer kernels "
                    "(docs/deployment.md). Accuracy % mean ±95 % CI over seeds and examples; in parentheses the "
                    "paired difference to {baseline}'s deployed model in pp (* = CI excludes 0); agreement: test "
                    "examples where the deployed file and s2d's fake quantization predict the same class; "
                    "ms per test batch, median, torch float vs ONNX Runtime int8.")
PERPLEXITY_CAPTION = ("Perplexity of the test texts (exp of the mean over texts of the per-token NLL) per bit setting "
                      "x PTQ method and arm, mean over the seeds with its 95 % CI; in parentheses the perplexity "
                      "ratio to {baseline} - 1 in % with its 95 % CI, * where the CI excludes 0.")

FIGURE_CAPTIONS = {
    "outliers_over_steps": "Fig. 1: max |a| of the worst FFN layer over training steps, per arm",
    "violins": "Fig. 2: FFN activation distributions per layer and arm",
    "accuracy_vs_bits": "Accuracy vs bits per arm and PTQ method (QAT arms at their own bits)",
    "qat": "Fig. 3: QAT vs QAT+S2D accuracy",
    "sensitivity": "Quantization damage per site (each site quantized alone), the baseline's top sites, arms side by side",
}


def accuracy_caption(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> str:
    """One line explaining the main table."""
    n_seeds = len(res["seeds"])
    text = (f"Accuracy (%) per bit setting x PTQ method (rows) and arm (columns): mean over {n_seeds} seed(s) "
            f"± the half-width of its 95 % CI; in parentheses the paired difference to {baseline} in "
            f"percentage points with its 95 % CI, * where the CI excludes 0")
    if qat_kinds(res):
        text += f" (QAT rows: each QAT arm at its own bits, difference to {qat_baseline})"
    return text + ". CIs: bootstrap over seeds and test examples (docs/statistics.md)."


PAPER_ARM = "adamw+s2d"                                  # the paper-faithful S2D arm
SHORT_SCHEDULE_ARMS = ("adamw+s2d-rel", "adamw+condition")  # also compared with PAPER_ARM


def verdict_lines(res: dict, baseline: str = "adamw", qat_baseline: str = "qat") -> list[str]:
    """The report's opening: each arm against the baseline (and the short-schedule arms against the
    paper's S2D arm), from the numbers."""
    lines = []
    arms = float_arms(res)
    for arm in arms:
        if arm != baseline:
            lines += verdict(res, arm, baseline) + perplexity_verdict(res, arm, baseline) + [""]
    for arm in SHORT_SCHEDULE_ARMS:
        if arm in arms and PAPER_ARM in arms and PAPER_ARM != baseline:
            lines += verdict(res, arm, PAPER_ARM) + perplexity_verdict(res, arm, PAPER_ARM) + [""]
    qat = [r for r in accuracy_rows(res, baseline, qat_baseline) if r["method"] == "QAT"]
    for r in qat:
        for kind, c in r["deltas"].items():
            lines += [f"**{kind} vs {qat_baseline}** at {r['bits']}: {100 * c.delta:+.2f} pp "
                      f"[{100 * c.lo:+.2f}, {100 * c.hi:+.2f}], p={c.p:.3g}"
                      + (" (significant)" if c.significant else " (not significant)"), ""]
    return lines


def terminal_summary(res: dict, out_dir: Path | str | None = None, baseline: str = "adamw") -> str:
    """What `s2d run` prints at the end: where the files are, notes, and the main table last."""
    lines = []
    if out_dir is not None:
        lines.append(f"report: {out_dir}/report.md   results: {out_dir}/results.json")
    lines += [f"note: {n}" for n in res["notes"]]
    lines += [""] + [ln for ln in verdict_lines(res, baseline) if ln]
    deployed = format_deployed_table(res, baseline)
    if deployed:
        lines += ["", DEPLOYED_CAPTION.format(baseline=baseline), deployed]
    lines += ["", f"{accuracy_caption(res, baseline)} Wall time {res['wall_s']:.0f} s.",
              format_accuracy_table(res, baseline)]
    ppl = format_perplexity_table(res, baseline)
    if ppl:
        lines += ["", PERPLEXITY_CAPTION.format(baseline=baseline), ppl]
    return "\n".join(lines)


def render_markdown(res: dict, figures: dict[str, str], baseline: str = "adamw") -> str:
    """report.md: header, notes, accuracy table, QAT table, per-layer tables, arms, figures, versions."""
    cfg = res["config"]
    parts = [f"# s2d run: {cfg.get('name', 'experiment')}", "",
             f"Model `{cfg['model']['name']}` on `{cfg['data']['dataset']}`; fingerprint `{res['fingerprint']}`; "
             f"wall time {res['wall_s']:.0f} s (this invocation); machine: {res['machine'].get('platform')}, "
             f"{res['machine'].get('cpu_count')} CPUs{', GPU ' + ', '.join(res['machine']['gpu']) if res['machine'].get('gpu') else ''}.",
             f"PTQ methods: {', '.join(res['methods']) or 'none'}.", ""]
    parts += ["## Verdict", ""] + verdict_lines(res, baseline)
    if res["notes"]:
        parts += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    parts += ["## Accuracy (Table 2 style)", "", accuracy_caption(res, baseline), "",
              format_accuracy_table(res, baseline), ""]
    ppl = format_perplexity_table(res, baseline)
    if ppl:
        parts += ["## Held-out perplexity (causal LM)", "", PERPLEXITY_CAPTION.format(baseline=baseline), "", ppl, ""]
    deployed = format_deployed_table(res, baseline)
    if deployed:
        parts += ["## Deployed (int8)", "", DEPLOYED_CAPTION.format(baseline=baseline), "", deployed, ""]
    qat = format_qat_table(res)
    if qat:
        parts += ["## Quantization-aware training (accuracy % at the arm's own bits, mean ± 95 % CI; paired delta)",
                  "", qat, ""]
    outliers = outlier_reduction(res, baseline)
    if outliers:
        parts += ["## Outliers of the layers PCDR selects", "",
                  f"Per seed, the layers whose largest activation PCDR selects (k_target set, τ of the config) in "
                  f"{baseline}'s model, and the largest max |a| over them on the probe batches, in {baseline} and in "
                  "each arm of the same seed.", "", format_outlier_table(outliers, baseline), ""]
    parts += _sensitivity_section(res)
    parts += ["## FFN layers after fine-tuning (Table 3 style)", "",
              "PCDR_1, max |a| (on the probe batches, padding left out) and σ_max of every FFN Linear, per arm, "
              "mean over the seeds (QAT arms: float weights after training).", "", format_layer_table(res), ""]
    align = format_alignment_table(res)
    if align:
        parts += ["## Pair alignment (Colinearity Decay's measure)", "", ALIGNMENT_CAPTION, "", align, ""]
    parts += _arms_table(res)
    parts += ["", "## Figures", ""]
    for key, rel in figures.items():
        parts += [f"**{FIGURE_CAPTIONS.get(key, key)}**", "", f"![{key}]({rel})", ""]
    parts += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    return "\n".join(parts)


def _sensitivity_section(res: dict, top: int = 10) -> list[str]:
    """The top sites of each arm's sensitivity analysis, joined with that arm's per-layer table."""
    reports = res.get("sensitivity") or {}
    if not reports:
        return []
    first = next(iter(reports.values()))
    parts = ["## Which quantization sites cost the accuracy", "",
             f"Seed {res['seeds'][0]}, {first['method']} at {first['bits']} (the mildest setting at which the baseline "
             f"loses more than 5 pp), {first['examples']} test examples. Each site (a Linear's input or weight, an "
             "attention matmul input) is quantized alone, everything else in float: KL of the class distribution "
             "to the float model, argmax agreement and accuracy; *recovered*: the accuracy gained by keeping only "
             "this site in float. *max |x|*: the site's calibrated range; *module max |a|*, PCDR_1 and *S2D "
             "selects*: the module's row of the per-layer table.", ""]
    for arm, rep in reports.items():
        run = next((r for r in res["runs"] if r["name"] == arm and r["seed"] == res["seeds"][0]), {})
        acc = ("" if rep["quant_accuracy"] is None else
               f" (accuracy {100 * rep['float_accuracy']:.1f}% float, {100 * rep['quant_accuracy']:.1f}% with every site quantized)")
        parts += [f"**{arm}**{acc}", "", format_sensitivity_table(rep, run.get("probes", []), top=top), ""]
    return parts


def _arms_table(res: dict) -> list[str]:
    lines = ["## Arms", "", "| arm | optimizer | S2D | seeds | FP acc (mean) | train s (mean) | final loss (mean) |",
             "|---|---|---|---|---|---|---|"]
    for name, a in res["arms"].items():
        s2d = a["s2d_config"]
        strength = (f"fraction={s2d.get('fraction'):g}" if s2d and s2d["update"] == "relative"
                    else f"λ={s2d['strength']:g} n={s2d['power']:g}" if s2d else "")
        s2d_txt = "-" if not s2d else (f"{strength} τ={s2d['tau']:g} k≤{s2d['k_max']} every {s2d['interval']} "
                                       f"({s2d['selection']}, {s2d['update']})")
        runs = [r for r in res["runs"] if r["name"] == name]
        if runs:
            lines.append(f"| {name} | {a['optimizer']} | {s2d_txt} | {len(runs)} | "
                         f"{100 * _mean(r['fp_accuracy'] for r in runs):.2f} | "
                         f"{_mean(r['train'].get('wall_s', 0) for r in runs):.0f} | "
                         f"{_mean(r['train'].get('final_loss', float('nan')) for r in runs):.4f} |")
    return lines


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _outcome_key(section: str, field_name: str, row: dict) -> str:
    name = row.get("name", row.get("arm"))
    extra = f"|{row['method']}|{row['bits']}" if section == "cells" else ""
    return f"{field_name}|{name}|{row['seed']}{extra}"


def _split_outcomes(res: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """(results without the per-example outcomes, key -> outcomes (n,) bool) for results.json + outcomes.npz."""
    slim = json.loads(json.dumps(res, default=str))
    arrays = {}
    for section, field_name in _OUTCOME_FIELDS:
        for row in slim.get(section, []):
            packed = row.get(field_name)
            if packed:
                arrays[_outcome_key(section, field_name, row)] = unpack_outcomes(packed)
                row[field_name] = OUTCOMES
    return slim, arrays


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:            # a file object: numpy would append ".npz" to a name
        np.savez_compressed(f, **arrays)


def load_results(out_dir: Path | str) -> dict:
    """results.json of a finished run with its outcomes.npz merged back (every table can be recomputed)."""
    out = Path(out_dir)
    res = json.loads((out / "results.json").read_text())
    with np.load(out / OUTCOMES) as z:
        for section, field_name in _OUTCOME_FIELDS:
            for row in res.get(section, []):
                if row.get(field_name) == OUTCOMES:
                    row[field_name] = pack_outcomes(z[_outcome_key(section, field_name, row)])
    return res


def write_report(result: ExperimentResult | dict, out_dir: Path | str, baseline: str = "adamw") -> dict:
    """Write results.json, outcomes.npz, report.md and figures/*.png into ``out_dir``; returns the results
    dict (with its outcomes)."""
    out = Path(out_dir)
    res = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    res["versions"] = res.get("versions") or versions()
    res["machine"] = res.get("machine") or machine()
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, str] = {}
    for key, fn in FIGURES.items():
        path = fn(res, fig_dir / f"{key}.png")
        if path is not None:
            figs[key] = str(Path("figures") / path.name)
    res["figures"] = figs
    slim, arrays = _split_outcomes(res)
    atomic_write(out / OUTCOMES, lambda tmp: _save_npz(tmp, arrays))
    write_json(out / "results.json", slim)
    md = render_markdown(res, figs, baseline)
    write_text(out / "report.md", md)
    return res
