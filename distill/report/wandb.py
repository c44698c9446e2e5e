"""Everything W&B on the report side: the sweep's W&B Report built in code, the per-sweep summary run, and
reading a sweep's cells back from the W&B API (`distill-report --wandb`).

`distill-dashboard wandb SWEEP_DIR --project P` logs the sweep's report (table + plot + the ROUGE-L
and FKL - RKL tables) to the sweep's summary run, then builds the Report with `wandb-workspaces`:
published when W&B is online and logged in, otherwise written as a JSON spec (SWEEP_DIR/wandb_report.json)
to publish later (`wandb sync SWEEP_DIR/wandb/offline-run-*`, then the same command online).

ROUGE-L vs tau, and what W&B supports for it. A cell logs its evaluation once, so W&B has one point
per run; W&B panels do not put a *config* value on a line plot's x axis. Two things it does support:

- a line plot whose x axis is a logged metric: every cell logs `tau` in the same history row as its
  `eval/<benchmark>/rougeL` (`distill.tracking`), and a line plot of `eval/<benchmark>/rougeL` over
  x = `tau`, its runs grouped by `divergence.name` with mean and stddev, draws one line per divergence
  (mean ± std over the seeds at each tau);
- a scatter plot over runs, x = config `tau`, y = summary `eval/<benchmark>/rougeL`: every seed.

FKL - RKL is paired by seed, a computation over runs no panel does: the summary run logs it as a table
(`sweep/fkl_minus_rkl`) and a custom chart (W&B's own `wandb/line/v0` preset, the one `wandb.plot.line`
uses) draws it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from distill.cell.identity import cell_identity
from distill.cell.results import COMPLETED, SCHEMA_VERSION
from distill.report.records import CELL_DIR_RE, CellResult, dedupe
from distill.report.render import Y_TITLE
from distill.report.summary import Summary
from distill.tracking import offline as wandb_offline
from distill.tracking.wandb_run import EVAL_NAMES, _use_own_wandb_service
from distill.tracking.wandb_run import run_id as cell_run_id

SPEC_FILE = "wandb_report.json"
SUMMARY_JOB_TYPE = "sweep-report"   # W&B job_type of the per-sweep summary run
TRAIN_CURVES = ("train/loss", "train/kd", "train/ce")
VALID_CURVES = ("valid/ce", "valid/fkl", "valid/rkl")


def summary_run_id(sweep: str) -> str:
    """The W&B id of the sweep's summary run."""
    return cell_run_id(sweep, "report", "sweep")


def runs_filter(sweep: str, job_type: str) -> str:
    """W&B filter expression: the runs of one sweep (group) with one job type."""
    return f"Metric('Group') == {json.dumps(sweep)} and Metric('JobType') == {json.dumps(job_type)}"


def build_wandb_report(sweep: str, project: str, entity: str, benchmarks: Sequence[str]):
    """The sweep's W&B Report (a `wandb_workspaces.reports.v2.Report`, not saved)."""
    import wandb_workspaces.reports.v2 as wr  # optional: only when a W&B Report is built

    def runset(name: str, job_type: str, groupby: Sequence[str] = ()):
        return wr.Runset(entity=entity, project=project, name=name, filters=runs_filter(sweep, job_type),
                         groupby=list(groupby))

    cells = runset(f"{sweep}: distillation cells", "distill")
    by_objective = runset(f"{sweep}: cells by divergence and tau", "distill", ["config.divergence.name", "config.tau"])
    summary_run = runset(f"{sweep}: report", SUMMARY_JOB_TYPE)
    rouge_panels = []
    for i, bench in enumerate(benchmarks):
        metric = f"eval/{bench}/rougeL"
        rouge_panels += [
            wr.LinePlot(title=f"{bench}: ROUGE-L vs τ, mean ± std over seeds", x="tau", y=[metric],
                        groupby=wr.Config("divergence.name"), groupby_aggfunc="mean", groupby_rangefunc="stddev",
                        log_x=True, title_x="distillation temperature τ", title_y=Y_TITLE,
                        layout=wr.Layout(x=0, y=8 * i, w=12, h=8)),
            wr.ScatterPlot(title=f"{bench}: every training seed", x=wr.Config("tau"), y=wr.SummaryMetric(metric),
                           log_x=True, layout=wr.Layout(x=12, y=8 * i, w=12, h=8)),
        ]
    curve_panels = [wr.LinePlot(title=f"{key} by divergence and τ (mean ± std over seeds)", x="Step", y=[key],
                                groupby_aggfunc="mean", groupby_rangefunc="stddev", title_y=key,
                                layout=wr.Layout(x=8 * (j % 3), y=6 * (j // 3), w=8, h=6))
                    for j, key in enumerate(TRAIN_CURVES + VALID_CURVES)]
    generation_panels = [wr.WeavePanelSummaryTable(table_name=f"eval/{bench}/generations",
                                                   layout=wr.Layout(x=0, y=10 * i, w=24, h=10))
                         for i, bench in enumerate(benchmarks)]
    blocks = [
        wr.P(f"Sweep {sweep}: every distillation cell is a W&B run of group {sweep} and job type distill; "
             "the sweep's report (the same numbers as report.md) is the run of job type sweep-report."),
        wr.H1("ROUGE-L vs distillation temperature"),
        wr.P("Left: one line per divergence, mean ± std over training seeds; each cell logs tau with its final "
             "evaluation, and the line plot groups the cells by divergence with tau on the x axis. Right: every seed."),
        wr.PanelGrid(runsets=[cells], panels=rouge_panels),
        wr.H1("FKL − RKL vs temperature"),
        wr.P("Paired by training seed (mean ± std in the table), computed by distill-report and logged to the "
             "sweep's summary run, with the report's table and plot."),
        wr.PanelGrid(runsets=[summary_run], panels=[
            wr.CustomChart(query={"summaryTable": {"tableKey": "sweep/fkl_minus_rkl"}}, chart_name="wandb/line/v0",
                           chart_fields={"x": "tau", "y": "fkl_minus_rkl", "stroke": "benchmark"},
                           chart_strings={"title": "FKL − RKL vs τ"}, layout=wr.Layout(x=0, y=0, w=12, h=8)),
            wr.MediaBrowser(title="report.png", media_keys=["report/plot"], layout=wr.Layout(x=12, y=0, w=12, h=8)),
            wr.WeavePanelSummaryTable(table_name="report/table", layout=wr.Layout(x=0, y=8, w=24, h=10)),
        ]),
        wr.H1("Training and validation curves"),
        wr.P("Cells grouped by divergence and τ; validation FKL and RKL are the true KL at τ = 1."),
        wr.PanelGrid(runsets=[by_objective], panels=curve_panels),
        wr.H1("Generations"),
        wr.P("Per benchmark: prompt, output, references and ROUGE-L of every cell (eval/<benchmark>/generations)."),
        wr.PanelGrid(runsets=[cells], panels=generation_panels),
    ]
    return wr.Report(project=project, entity=entity, title=f"distill sweep {sweep}"[:128],
                     description="ROUGE-L vs distillation temperature per divergence, built by distill-dashboard.",
                     blocks=blocks, width="fluid")


def report_spec(obj: Any) -> Any:
    """A JSON-able view of a wandb-workspaces object tree: each object becomes {"type": class, fields...}.

    (`dataclasses.asdict` drops the class names, and the Report's own conversion needs a W&B login.)
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if not f.name.startswith("_"):
                out[f.name] = report_spec(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {str(k): report_spec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [report_spec(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------- the summary run

def summary_tables(summary: Summary) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The ROUGE-L (mean ± std per objective and tau) and FKL - RKL (paired) tables: columns, rows."""
    nan_none = lambda x: None if x != x else x  # noqa: E731 (NaN -> null: one seed has no std)
    rouge = [[b, o.label, o.divergence, t, s.mean, nan_none(s.std), s.n]
             for b in summary.benchmarks for o in summary.rows for t in summary.taus
             if (s := summary.get(b, o, t)) and s.n]
    diff = [[b, "fkl-rkl" + f.label[len("fkl"):], t, d.mean, nan_none(d.std), d.n]
            for b in summary.benchmarks for f, r in summary.fkl_rkl_pairs() for t in summary.taus
            if (d := summary.difference(b, f, r, t)).n]
    return {"sweep/rougeL_vs_tau": (["benchmark", "objective", "divergence", "tau", "mean", "std", "n"], rouge),
            "sweep/fkl_minus_rkl": (["benchmark", "pair", "tau", "fkl_minus_rkl", "std", "n"], diff)}


def log_summary_run(sweep_dir: Path, summary: Summary, sweep: str, project: str, entity: str | None,
                    mode: str) -> str | None:
    """Log the sweep's report (report.csv as a table, report.png, the two tables above) to its summary run.

    One W&B run per sweep (id `<sweep>-report-sweep`, job type sweep-report, group = the sweep), its
    files in SWEEP_DIR/wandb like the cells'; each call is one more attempt of that run, at the next step,
    so the latest report is its summary. Returns the run's local dir.
    """
    import wandb  # optional and heavy: only when a summary run is logged

    _use_own_wandb_service()
    rid = summary_run_id(sweep)
    step = len(wandb_offline.run_files(sweep_dir, rid))
    run = wandb.init(project=project, entity=entity, group=sweep, job_type=SUMMARY_JOB_TYPE, name=f"{sweep} report",
                     id=rid, resume="allow", dir=str(sweep_dir), mode=mode, reinit="finish_previous",
                     config={"sweep": sweep, "benchmarks": summary.benchmarks, "taus": summary.taus},
                     settings=wandb.Settings(console="off", silent=True))
    try:
        rows = list(csv.reader((sweep_dir / "report.csv").read_text().splitlines()))
        data: dict[str, Any] = {"report/table": wandb.Table(columns=rows[0], data=rows[1:]),
                                "report/plot": wandb.Image(str(sweep_dir / "report.png"))}
        for key, (columns, table_rows) in summary_tables(summary).items():
            data[key] = wandb.Table(columns=columns, data=table_rows)
        run.log(data, step=step)
        run.summary.update({"sweep/cells": len(summary.cells),
                            "sweep/completed": sum(c.status == COMPLETED for c in summary.cells)})
        local = os.path.dirname(run.dir)
    finally:
        run.finish()
    return local


# ----------------------------------------------------------------------------- cells from W&B

_WANDB_STATUS = {"finished": COMPLETED, "running": "running", "crashed": "failed", "failed": "failed",
                 "killed": "failed", "preempted": "running", "pending": "running"}


def _wandb_eval_keys() -> dict[str, str]:
    """W&B summary name (distill.tracking.wandb_run) -> metrics.json name, per benchmark."""
    return {w: m for m, w in EVAL_NAMES.items()}


def record_from_wandb(run_id: str, state: str, config: dict, summary: dict) -> CellResult:
    """Rebuild a CellResult from a W&B run's config and summary, as distill.tracking.wandb_run logs them.

    Config: the resolved Hydra config, nested (tau, seed, divergence.name and its params,
    loss.kd_ratio, ..., model.name, data.name). Summary, one slash scheme: the final
    `eval/<benchmark>/rougeL` (+ `rougeL_std`, `exact_match`) and `valid/<ce|fkl|rkl>`.
    """
    # The run id is the job's `<name>-<signature>` (distill.tracking.wandb_run); the cell block is the job's own.
    sig = run_id.rsplit("-", 1)[-1] if CELL_DIR_RE.match(run_id) else None
    cell = cell_identity(config, sig)
    evals: dict[str, dict] = {}
    valid: dict[str, float] = {}
    names = _wandb_eval_keys()
    for k, v in summary.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue   # tables (eval/<b>/generations), images, ...
        parts = str(k).split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in names:
            evals.setdefault(parts[1], {})[names[parts[2]]] = v
        elif len(parts) == 2 and parts[0] == "valid":
            valid[parts[1]] = v
    status = _WANDB_STATUS.get(state, "failed")
    if status == COMPLETED and not evals:
        return CellResult(run_id, "unreadable", None, "finished W&B run without eval/<benchmark>/rougeL in its summary")
    if cell["divergence"] is None or cell["tau"] is None or cell["seed"] is None:
        return CellResult(run_id, "unreadable", None, "W&B run config lacks divergence.name/tau/seed")
    metrics = {"schema_version": SCHEMA_VERSION, "status": status, "name": run_id, "cell": cell,
               "valid": valid, "eval": {b: e for b, e in evals.items() if "rougeL_mean" in e},
               "updated_at": str(summary.get("_timestamp", ""))}
    return CellResult(run_id, status, metrics, None if status != "failed" else f"W&B run state '{state}'")


def records_from_wandb(path: str, group: str, api: Any = None) -> list[CellResult]:
    """Cells of one sweep (a W&B group) from the W&B API; needs network and a logged-in key."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise ValueError(f"--wandb expects ENTITY/PROJECT, got '{path}'")
    if api is None:
        import wandb  # optional and heavy: only when the cells come from W&B

        api = wandb.Api(timeout=30)
    runs = api.runs(path, filters={"group": group})
    # the sweep's summary run (job_type sweep-report) holds the report, not a cell
    cells = [record_from_wandb(r.id, r.state, dict(r.config), dict(r.summary)) for r in runs
             if getattr(r, "job_type", None) != SUMMARY_JOB_TYPE]
    return dedupe(cells)
