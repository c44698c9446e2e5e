"""The report's command lines: `distill-report` (report.md/csv/png/html of a sweep) and `distill-dashboard`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from distill.report import wandb as wandb_report
from distill.report.summary import build_report, records_from_wandb, write_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill-report", description="Build report.md/.csv/.png for a sweep dir.")
    p.add_argument("sweep_dir", help="the sweep dir (<paths.root>/<sweep_name>); the report is written into it")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the cells from W&B instead of metrics.json files")
    p.add_argument("--group", help="W&B group of the sweep (default: the sweep dir's name)")
    args = p.parse_args(argv)
    if args.group and not args.wandb:
        p.error("--group needs --wandb ENTITY/PROJECT")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `distill-report`."""
    args = parse_args(argv)
    try:
        if args.wandb:
            out = Path(args.sweep_dir)
            out.mkdir(parents=True, exist_ok=True)
            group = args.group or out.resolve().name
            cells = records_from_wandb(args.wandb, group)
            if not cells:
                raise ValueError(f"no W&B runs in group '{group}' of {args.wandb}")
            paths = write_report(cells, out, sweep=group)
        else:
            paths = build_report(args.sweep_dir)
    except ValueError as e:
        print(f"distill-report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def parse_dashboard_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill-dashboard", description="Dashboards of a sweep: offline HTML, W&B Report.")
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


def dashboard(argv: Sequence[str] | None = None) -> int:
    """Console entry point `distill-dashboard`."""
    args = parse_dashboard_args(argv)
    try:
        if args.command == "html":
            paths = build_report(args.sweep_dir)
            print(f"wrote {paths['report.html']}")
            return 0
        return wandb_report.run(args)
    except ValueError as e:
        print(f"distill-dashboard: error: {e}", file=sys.stderr)
        return 1
