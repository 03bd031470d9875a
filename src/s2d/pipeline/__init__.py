"""The `s2d run` job and the command-line tool, imports flowing down this list:

* :mod:`~s2d.pipeline.config` — the run's config dataclasses; :mod:`~s2d.pipeline.parse` — TOML -> them;
* :mod:`~s2d.pipeline.provenance` — versions and machine of a run;
* :mod:`~s2d.pipeline.experiment` — arms x PTQ cells, resumable, in a run directory;
* :mod:`~s2d.pipeline.tables`, :mod:`~s2d.pipeline.figures` — what a report shows;
  :mod:`~s2d.pipeline.report` — results.json, report.md, figures/;
* :mod:`~s2d.pipeline.cli` — ``s2d run | inspect | finetune | quantize | evaluate | assets | bench``.
"""
