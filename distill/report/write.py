"""Writing a sweep's report: report.md, report.csv, report.png and report.html, each atomically.

`distill-report SWEEP_DIR` (distill.report.cli), the Hydra callbacks after each job (distill.sweep.callbacks)
and `distill-pipeline` call `build_report`; `distill-report --wandb` calls `write_report` with cells read
from W&B. The one module that writes the report files: the text is distill.report.text, the CSV and the
plot distill.report.render, the dashboard distill.report.html.
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.files import atomic_write_text
from distill.report.html import render_html
from distill.report.records import CellResult, references, scan_sweep, sweep_name
from distill.report.render import render_csv, render_png
from distill.report.summary import summarize
from distill.report.text import render_markdown

REPORT_FILES = ("report.md", "report.csv", "report.png", "report.html")


def write_report(cells: list[CellResult], out_dir: str | os.PathLike, sweep: str | None = None) -> dict[str, Path]:
    """Write report.md/.csv/.png/.html for these cells into out_dir; return the paths.

    `sweep` names the report (default: the sweep name the cells recorded, else the dir's name).
    """
    out = Path(out_dir)
    sweep = sweep_name(cells, out) if sweep is None else sweep
    summary = summarize(cells)
    refs = references(cells, out)
    paths = {name: out / name for name in REPORT_FILES}
    atomic_write_text(paths["report.md"], render_markdown(summary, sweep))
    atomic_write_text(paths["report.csv"], render_csv(summary))
    render_png(summary, sweep, paths["report.png"], refs)
    atomic_write_text(paths["report.html"], render_html(summary, sweep, refs, out))
    return paths


def build_report(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Read a sweep dir's cells and write its report into it. ValueError if there is nothing to read."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep dir '{root}' does not exist or is not a directory")
    cells = scan_sweep(root)
    if not cells:
        raise ValueError(f"no cells under '{root}' (expected <name>-<8-hex>/ dirs or */metrics.json)")
    return write_report(cells, root)
