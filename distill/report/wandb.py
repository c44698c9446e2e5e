"""The W&B side of a sweep's dashboard: a W&B Report built in code, and the per-sweep summary run.

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

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from distill.report.summary import FINISHED, SUMMARY_JOB_TYPE, Summary, _fmt_value, build_report, scan_sweep
from distill.files import atomic_write_text
from distill.tracking.wandb_run import run_id as cell_run_id

log = logging.getLogger(__name__)

SPEC_FILE = "wandb_report.json"
TRAIN_CURVES = ("train/loss", "train/kd", "train/ce")
VALID_CURVES = ("valid/ce", "valid/fkl", "valid/rkl")
Y_TITLE = "ROUGE-L F1 x 100"


def summary_run_id(sweep: str) -> str:
    """The W&B id of the sweep's summary run."""
    return cell_run_id(sweep, "report", "sweep")


def runs_filter(sweep: str, job_type: str) -> str:
    """W&B filter expression: the runs of one sweep (group) with one job type."""
    return f"Metric('Group') == {json.dumps(sweep)} and Metric('JobType') == {json.dumps(job_type)}"


def build_wandb_report(sweep: str, project: str, entity: str, benchmarks: Sequence[str]):
    """The sweep's W&B Report (a `wandb_workspaces.reports.v2.Report`, not saved)."""
    import wandb_workspaces.reports.v2 as wr

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
    import csv

    import wandb

    from distill.tracking import offline as wandb_offline
    from distill.tracking.wandb_run import _use_own_wandb_service

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
                            "sweep/completed": sum(c.status == FINISHED for c in summary.cells)})
        local = os.path.dirname(run.dir)
    finally:
        run.finish()
    return local


# ----------------------------------------------------------------------------- CLI (distill-dashboard wandb)

def _online(args) -> bool:
    """Publish only when asked to be online (WANDB_MODE=online) and logged in; never hang without a key."""
    if args.offline or os.environ.get("WANDB_MODE", "offline") not in ("online", "run"):
        return False
    import wandb

    try:
        return bool(wandb.Api(timeout=30).api_key)
    except wandb.errors.UsageError as e:   # "No API key configured"
        print(f"distill-dashboard: not publishing ({e}); writing the report spec instead", file=sys.stderr)
        return False


def run(args) -> int:
    """`distill-dashboard wandb SWEEP_DIR --project P [--entity E]`: summary run, then the Report."""
    from distill.report.summary import summarize

    sweep_dir = Path(args.sweep_dir)
    build_report(sweep_dir)                     # report.csv/.png the summary run logs (ValueError if no cells)
    cells = scan_sweep(sweep_dir)
    names = {c.metrics.get("sweep") for c in cells if c.metrics and c.metrics.get("sweep")}
    sweep = names.pop() if len(names) == 1 else sweep_dir.resolve().name
    summary = summarize(cells)
    online = _online(args)
    if not args.no_summary_run:
        where = log_summary_run(sweep_dir, summary, sweep, args.project, args.entity, "online" if online else "offline")
        print(f"summary run of sweep {sweep}: {where}")
    entity = args.entity
    if online and not entity:
        import wandb

        entity = wandb.Api(timeout=30).default_entity
    report = build_wandb_report(sweep, args.project, entity or "", summary.benchmarks)
    spec_path = Path(args.spec) if args.spec else sweep_dir / SPEC_FILE
    atomic_write_text(spec_path, json.dumps(report_spec(report), indent=1) + "\n")
    if online:
        report.save()
        print(f"published W&B report: {report.url}")
    else:
        print(f"wrote the W&B report spec {spec_path} (W&B is offline). To publish: "
              f"wandb sync {sweep_dir}/wandb/offline-run-*  then  WANDB_MODE=online distill-dashboard wandb "
              f"{sweep_dir} --project {args.project}")
    taus = ", ".join(_fmt_value(t) for t in summary.taus)
    log.info("report of sweep %s: benchmarks %s, tau %s", sweep, summary.benchmarks, taus)
    return 0
