"""The sweep's W&B Report built in code (wandb-workspaces) and its summary run, offline."""

import json
import types
from types import SimpleNamespace

import pytest

from distill.report import cli as report_cli
from distill.report import wandb as wandb_report
from distill.report.records import scan_sweep
from distill.report.summary import summarize
from distill.tracking import offline as wandb_offline
from tests.report.sweeps import fixture_sweep, read_csv

BENCHES = ["test", "shift_long"]


def spec_panels(spec: dict) -> list[tuple[dict, list[dict]]]:
    """(runset, panels) of every panel grid in a report spec."""
    return [(b["runsets"][0], b["panels"]) for b in spec["blocks"] if b["type"] == "PanelGrid"]


def test_report_spec_panels_queries_and_grouping():
    spec = wandb_report.report_spec(wandb_report.build_wandb_report("demo", "proj", "ent", BENCHES))
    assert spec["type"] == "Report" and spec["project"] == "proj" and spec["entity"] == "ent"
    grids = spec_panels(spec)
    rouge_runs, rouge = grids[0]
    assert rouge_runs["filters"] == wandb_report.runs_filter("demo", "distill") and rouge_runs["groupby"] == []
    lines = {p["y"][0]: p for p in rouge if p["type"] == "LinePlot"}
    scatters = {p["y"]["name"]: p for p in rouge if p["type"] == "ScatterPlot"}
    assert set(lines) == set(scatters) == {f"eval/{b}/rougeL" for b in BENCHES}
    for line in lines.values():   # one line per divergence over the logged tau: mean ± std over seeds
        assert line["x"] == "tau" and line["groupby"] == {"type": "Config", "name": "divergence.name"}
        assert (line["groupby_aggfunc"], line["groupby_rangefunc"], line["log_x"]) == ("mean", "stddev", True)
        assert line["title_y"] == "ROUGE-L F1 x 100"
    for scatter in scatters.values():   # every seed: config tau vs the summary's final eval
        assert scatter["x"] == {"type": "Config", "name": "tau"} and scatter["y"]["type"] == "SummaryMetric"
    summary_runs, summary_panels = grids[1]
    assert summary_runs["filters"] == wandb_report.runs_filter("demo", "sweep-report")
    (chart,) = [p for p in summary_panels if p["type"] == "CustomChart"]
    assert chart["query"] == {"summaryTable": {"tableKey": "sweep/fkl_minus_rkl"}} and chart["chart_name"] == "wandb/line/v0"
    assert chart["chart_fields"] == {"x": "tau", "y": "fkl_minus_rkl", "stroke": "benchmark"}
    assert {p.get("table_name") for p in summary_panels} >= {"report/table"}
    curve_runs, curves = grids[2]
    assert curve_runs["groupby"] == ["config.divergence.name", "config.tau"]
    assert [p["y"] for p in curves] == [["train/loss"], ["train/kd"], ["train/ce"], ["valid/ce"], ["valid/fkl"], ["valid/rkl"]]
    assert all(p["groupby_rangefunc"] == "stddev" for p in curves)
    _, generations = grids[3]
    assert [p["table_name"] for p in generations] == [f"eval/{b}/generations" for b in BENCHES]


def test_filters_parse_as_wandb_filters():
    from wandb_workspaces import expr

    tree = expr.expr_to_filters(wandb_report.runs_filter("my sweep's", "distill"))
    leaves = {(f.key.name, f.op, f.value) for f in tree.filters}
    assert tree.op == "AND" and leaves == {("group", "=", "my sweep's"), ("jobType", "=", "distill")}


def test_report_converts_to_the_wandb_model_it_would_publish(monkeypatch):
    """`Report.save()` uploads `_to_model()`: build that model with a fake W&B transport (no network)."""
    import wandb_workspaces.reports.v2.interface as wr_interface

    class Transport:
        app_url = "https://wandb.invalid"

        def execute_graphql(self, query, variables=None):
            return {"project": {"internalId": "project-1"}}

    monkeypatch.setattr(wr_interface, "_get_api", lambda: types.SimpleNamespace(_service_api=Transport(),
                                                                                default_entity="ent"))
    model = wandb_report.build_wandb_report("demo", "proj", "ent", BENCHES)._to_model()
    spec = json.loads(model.spec.model_dump_json(by_alias=True, exclude_none=True))
    panels, runsets = [], []

    def walk(node):
        if isinstance(node, dict):
            if "viewType" in node:
                panels.append(node)
            if "grouping" in node and "filters" in node:
                runsets.append(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    rouge = [p["config"] for p in panels if p["viewType"] == "Run History Line Plot" and p["config"]["xAxis"] == "tau"]
    assert sorted(c["metrics"][0] for c in rouge) == sorted(f"eval/{b}/rougeL" for b in BENCHES)
    assert all(c["groupBy"] == "divergence.value.name" and c["groupArea"] == "stddev" for c in rouge)  # nested config
    assert {p["viewType"] for p in panels} >= {"Scatter Plot", "Vega2", "Media Browser", "Weave"}
    grouped = [r for r in runsets if r["grouping"]]
    assert [[g["name"] for g in r["grouping"]] for r in grouped] == [["divergence.value.name", "tau.value"]]
    assert all({f["key"]["name"] for f in r["filters"]["filters"]} == {"group", "jobType"} for r in runsets)


def test_cli_offline_writes_the_spec_and_logs_the_summary_run(tmp_path, capsys, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = fixture_sweep(tmp_path)
    assert report_cli.dashboard(["wandb", str(sweep), "--project", "distill-test"]) == 0
    wandb.teardown()
    out = capsys.readouterr().out
    assert f"wandb sync {sweep}/wandb/offline-run-*" in out
    spec = json.loads((sweep / wandb_report.SPEC_FILE).read_text())
    assert spec == wandb_report.report_spec(wandb_report.build_wandb_report("fixture", "distill-test", "", BENCHES))
    # the summary run: one per sweep, in the sweep's W&B folder, with the report's tables and plot
    (path,) = wandb_offline.run_files(sweep, wandb_report.summary_run_id("fixture"))
    info, _ = wandb_offline.run_info(path)
    assert (info["group"], info["job_type"]) == ("fixture", wandb_report.SUMMARY_JOB_TYPE)
    (row,) = wandb_offline.history_rows(path)
    assert {"report/table", "report/plot", "sweep/rougeL_vs_tau", "sweep/fkl_minus_rkl"} <= set(row)
    logged = json.loads((path.parent / "files" / row["sweep/fkl_minus_rkl"]["path"]).read_text())
    summary = summarize(scan_sweep(sweep))
    columns, rows = wandb_report.summary_tables(summary)["sweep/fkl_minus_rkl"]
    assert logged["columns"] == columns and logged["data"] == rows
    (f, r), = summary.fkl_rkl_pairs()
    assert [d[3] for d in rows if d[0] == "test"] == pytest.approx(
        [summary.difference("test", f, r, t).mean for t in summary.taus])
    # --no-summary-run only rebuilds the spec
    assert report_cli.dashboard(["wandb", str(sweep), "--project", "distill-test", "--no-summary-run"]) == 0
    assert len(wandb_offline.run_files(sweep, wandb_report.summary_run_id("fixture"))) == 1


def test_records_from_wandb_skips_the_summary_run():
    cell_config = {"tau": 1.0, "seed": 0, "divergence": {"name": "fkl"}, "loss": {"kd_ratio": 1.0},
                   "model": {"name": "toy"}, "data": {"name": "embedded"}}
    runs = [types.SimpleNamespace(id="demo-fkl-tau1-s0-1", state="finished", job_type="distill", config=cell_config,
                                  summary={"eval/test/rougeL": 40.0, "valid/ce": 2.0}),
            types.SimpleNamespace(id="demo-report-sweep", state="finished", job_type="sweep-report",
                                  config={"sweep": "demo"}, summary={"sweep/cells": 1})]
    api = types.SimpleNamespace(runs=lambda path, filters: runs)
    (cell,) = wandb_report.records_from_wandb("ent/proj", "demo", api=api)
    assert cell.status == "completed" and cell.metrics["eval"]["test"]["rougeL_mean"] == 40.0


def fake_run(name, state, div, tau, seed, score):
    """A W&B run as distill.tracking logs it: nested resolved config, slash-named final summary."""
    config = {"tau": tau, "seed": seed, "divergence": {"name": div}, "loss": {"kd_ratio": 1.0},
              "model": {"name": "toy"}, "data": {"name": "embedded"}}
    summary = {} if score is None else {"eval/test/rougeL": score, "eval/test/rougeL_std": 1.0, "valid/ce": 2.0,
                                        "eval/test/generations": {"_type": "table-file"}}
    return SimpleNamespace(id=f"{name}-0000abcd", name=name, state=state, job_type="distill", config=config,
                           summary=summary)


def test_wandb_source_with_mocked_api(tmp_path, monkeypatch):
    import wandb

    runs = [fake_run("fkl-tau1-s0", "finished", "fkl", 1.0, 0, 40.0),
            fake_run("fkl-tau1-s1", "finished", "fkl", 1.0, 1, 42.0),
            fake_run("rkl-tau1-s0", "finished", "rkl", 1.0, 0, 45.0),
            fake_run("rkl-tau1-s1", "crashed", "rkl", 1.0, 1, None)]
    calls = []

    class FakeApi:
        def __init__(self, **kw):
            pass

        def runs(self, path, filters):
            calls.append((path, filters))
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = tmp_path / "out"
    assert report_cli.main([str(out), "--wandb", "ent/proj", "--group", "demo"]) == 0
    assert calls == [("ent/proj", {"group": "demo"})]
    rows = read_csv(out / "report.csv")
    assert float(rows[("test", "fkl", 1.0)]["rougeL_mean"]) == pytest.approx(41.0)
    assert rows[("test", "rkl", 1.0)]["n"] == "1"
    assert float(rows[("test", "fkl-rkl", 1.0)]["rougeL_mean"]) == pytest.approx(-5.0)
    md = (out / "report.md").read_text()
    assert "# Sweep report: demo" in md and "| rkl-tau1-s1-0000abcd | failed |" in md
