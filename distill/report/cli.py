"""The report's command lines: `distill-report` (report.md/csv/png/html of a sweep) and `distill-dashboard`
(`html`: rebuild report.html with the rest of the report; `wandb`: the sweep's W&B summary run and Report)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from distill.files import atomic_write_text
from distill.report import wandb as wandb_report
from distill.report.records import scan_sweep, sweep_name
from distill.report.summary import summarize
from distill.report.tables import number
from distill.report.write import build_report, write_report

log = logging.getLogger(__name__)

REPORT_EXAMPLES = """examples:
  distill-report outputs/demo                                  # the cells' metrics.json files
  distill-report outputs/demo --wandb ENTITY/PROJECT           # the same cells from W&B (group: demo)
  distill-report outputs/demo --wandb ENTITY/PROJECT --group demo_v2
"""
DASHBOARD_EXAMPLES = """examples:
  distill-dashboard html outputs/demo                          # rebuild outputs/demo/report.html
  distill-dashboard wandb outputs/demo --project distill       # summary run + W&B Report (spec when offline)
  WANDB_MODE=online distill-dashboard wandb outputs/demo --project distill --entity ENTITY
"""


# ----------------------------------------------------------------------------- distill-report

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill-report", description="Build report.md/.csv/.png for a sweep dir.",
                                epilog=REPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the sweep dir (<paths.root>/<sweep_name>); the report is written into it")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the cells from W&B instead of metrics.json files")
    p.add_argument("--group", help="W&B group of the sweep (default: the sweep dir's name)")
    args = p.parse_args(argv)
    if args.group and not args.wandb:
        p.error("--group needs --wandb ENTITY/PROJECT")
    return args


def report_from_wandb(sweep_dir: str, path: str, group: str | None) -> dict[str, Path]:
    """Write the report of W&B group `group` (default: the sweep dir's name) of ENTITY/PROJECT `path`."""
    out = Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = group or out.resolve().name
    cells = wandb_report.records_from_wandb(path, group)
    if not cells:
        raise ValueError(f"no W&B runs in group '{group}' of {path}")
    return write_report(cells, out, sweep=group)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `distill-report`."""
    args = parse_args(argv)
    try:
        paths = report_from_wandb(args.sweep_dir, args.wandb, args.group) if args.wandb else build_report(args.sweep_dir)
    except ValueError as e:
        print(f"distill-report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


# ----------------------------------------------------------------------------- distill-dashboard

def parse_dashboard_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill-dashboard", description="Dashboards of a sweep: offline HTML, W&B Report.",
                                epilog=DASHBOARD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("html", help="(re)build SWEEP_DIR/report.html, with the rest of the report")
    h.add_argument("sweep_dir")
    w = sub.add_parser("wandb", help="build the sweep's W&B Report; publish it when online, else write its spec")
    w.add_argument("sweep_dir")
    w.add_argument("--project", required=True, help="W&B project holding the sweep's runs")
    w.add_argument("--entity", default=None, help="W&B entity (default: logger.entity of the cells, else yours)")
    w.add_argument("--spec", default=None, help="where to write the report spec JSON (default SWEEP_DIR/wandb_report.json)")
    w.add_argument("--offline", action="store_true", help="only write the spec, even with WANDB_MODE=online")
    w.add_argument("--no-summary-run", action="store_true",
                   help="do not log the sweep's report table and plot to its W&B summary run")
    return p.parse_args(argv)


def _online(args: argparse.Namespace) -> bool:
    """Publish only when asked to be online (WANDB_MODE=online) and logged in; never hang without a key."""
    if args.offline or os.environ.get("WANDB_MODE", "offline") not in ("online", "run"):
        return False
    import wandb  # optional and heavy: only when asked to publish

    try:
        return bool(wandb.Api(timeout=30).api_key)
    except wandb.errors.UsageError as e:   # "No API key configured"
        print(f"distill-dashboard: not publishing ({e}); writing the report spec instead", file=sys.stderr)
        return False


def _default_entity() -> str | None:
    """The logged-in user's default W&B entity."""
    import wandb  # optional and heavy: only when publishing

    return wandb.Api(timeout=30).default_entity


def dashboard_wandb(args: argparse.Namespace) -> int:
    """`distill-dashboard wandb SWEEP_DIR --project P [--entity E]`: summary run, then the Report."""
    sweep_dir = Path(args.sweep_dir)
    build_report(sweep_dir)                     # report.csv/.png the summary run logs (ValueError if no cells)
    cells = scan_sweep(sweep_dir)
    sweep = sweep_name(cells, sweep_dir)
    summary = summarize(cells)
    online = _online(args)
    if not args.no_summary_run:
        where = wandb_report.log_summary_run(sweep_dir, summary, sweep, args.project, args.entity,
                                             "online" if online else "offline")
        print(f"summary run of sweep {sweep}: {where}")
    entity = args.entity or (_default_entity() if online else None)
    report = wandb_report.build_wandb_report(sweep, args.project, entity or "", summary.benchmarks)
    spec_path = Path(args.spec) if args.spec else sweep_dir / wandb_report.SPEC_FILE
    atomic_write_text(spec_path, json.dumps(wandb_report.report_spec(report), indent=1) + "\n")
    if online:
        report.save()
        print(f"published W&B report: {report.url}")
    else:
        print(f"wrote the W&B report spec {spec_path} (W&B is offline). To publish: "
              f"wandb sync {sweep_dir}/wandb/offline-run-*  then  WANDB_MODE=online distill-dashboard wandb "
              f"{sweep_dir} --project {args.project}")
    log.info("report of sweep %s: benchmarks %s, tau %s", sweep, summary.benchmarks,
             ", ".join(number(t) for t in summary.taus))
    return 0


def dashboard(argv: Sequence[str] | None = None) -> int:
    """Console entry point `distill-dashboard`."""
    args = parse_dashboard_args(argv)
    try:
        if args.command == "html":
            paths = build_report(args.sweep_dir)
            print(f"wrote {paths['report.html']}")
            return 0
        return dashboard_wandb(args)
    except ValueError as e:
        print(f"distill-dashboard: error: {e}", file=sys.stderr)
        return 1
