"""The report of an `s2d run`: results.json, report.md (tables of :mod:`s2d.pipeline.tables`) and the
figures of :mod:`s2d.pipeline.figures`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from s2d.pipeline.experiment import ExperimentResult
from s2d.pipeline.figures import FIGURES
from s2d.pipeline.provenance import machine, versions
from s2d.pipeline.tables import format_accuracy_table, format_layer_table, format_qat_table, qat_kinds
from s2d.utils import write_json, write_text

__all__ = ["FIGURE_CAPTIONS", "accuracy_caption", "terminal_summary", "render_markdown", "write_report"]


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
    """report.md: header, notes, accuracy table, QAT table, per-layer tables, arms, figures, versions."""
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
        s2d = a["s2d_config"]
        s2d_txt = "-" if not s2d else (f"λ={s2d['strength']:g} n={s2d['power']:g} τ={s2d['tau']:g} "
                                       f"k≤{s2d['k_max']} every {s2d['interval']} ({s2d['selection']}, {s2d['update']})")
        parts.append(f"| {name} | {a['optimizer']} | {s2d_txt} | {100 * a['fp_accuracy']:.2f} | "
                     f"{a['train'].get('wall_s', 0):.0f} | {a['train'].get('final_loss', float('nan')):.4f} |")
    parts += ["", "## Figures", ""]
    for key, rel in figures.items():
        parts += [f"**{FIGURE_CAPTIONS.get(key, key)}**", "", f"![{key}]({rel})", ""]
    parts += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    return "\n".join(parts)


def write_report(result: ExperimentResult | dict, out_dir: Path | str, baseline: str = "adamw") -> dict:
    """Write results.json, report.md and figures/*.png into ``out_dir``; returns the results dict."""
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
    write_json(out / "results.json", res)
    md = render_markdown(res, figs, baseline)
    write_text(out / "report.md", md)
    return res
