"""distill.report.html: report.html, the offline dashboard, on the fixture sweep with its reference models
(tests.report.sweeps.fixture_sweep: train_log.jsonl and generations for fkl-tau1-s0 and rkl-tau1-s0, and
a teacher and an SFT warm start whose exported `student/` dirs the cells point at)."""

import json
import re

import pytest

from distill.report import html as dashboard
from distill.report.records import scan_sweep
from distill.report.summary import summarize
from distill.report.write import build_report


@pytest.fixture
def sweep(sweep_with_refs):
    """Every test here runs on the fixture sweep with its reference models (tests/report/conftest.py)."""
    return sweep_with_refs


def page_data(html: str) -> dict:
    """The JSON the page hands to plotly (figures and per-cell curves)."""
    blob = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob.replace("<\\/", "</"))


def test_rouge_panel_matches_the_report(sweep):
    cells = scan_sweep(sweep)
    summary = summarize(cells)
    data = page_data(build_report(sweep)["report.html"].read_text())
    traces = data["rouge"]["data"]
    objective = {(t["meta"]["objective"], t["meta"]["benchmark"]): t for t in traces if t["meta"]["kind"] == "objective"}
    # one line per objective and benchmark, its points the report's means, its bars the report's stds
    assert set(objective) == {(o, b) for o in ("fkl", "rkl", "jsd") for b in ("test", "shift_long")}
    for row in summary.rows:
        for bench in summary.benchmarks:
            t = objective[(row.label, bench)]
            stats = [s for tau in summary.taus if (s := summary.get(bench, row, tau)) and s.n]
            assert t["y"] == pytest.approx([s.mean for s in stats])
            assert t["error_y"]["array"] == pytest.approx([0.0 if s.std != s.std else s.std for s in stats])
    # every training seed is a point; tau=4 fkl on test has seeds 0 and 1 (seed 2 is still running)
    seeds = {(t["meta"]["objective"], t["meta"]["benchmark"]): t for t in traces if t["meta"]["kind"] == "seeds"}
    fkl_test = seeds[("fkl", "test")]
    assert sorted(fkl_test["y"]) == sorted(s for tau in summary.taus
                                           for s in summary.get("test", summary.rows[0], tau).by_seed.values())
    refs = {(t["meta"]["reference"], t["meta"]["benchmark"]): t["y"] for t in traces if t["meta"]["kind"] == "reference"}
    assert refs[("teacher", "test")] == [55.0, 55.0] and refs[("SFT warm start", "shift_long")] == [25.0, 25.0]
    layout = data["rouge"]["layout"]
    assert layout["yaxis"]["title"]["text"] == "ROUGE-L F1 x 100" and layout["xaxis"]["type"] == "log"


def test_difference_panel_is_the_paired_fkl_minus_rkl(sweep):
    summary = summarize(scan_sweep(sweep))
    data = page_data(build_report(sweep)["report.html"].read_text())
    (f, r), = summary.fkl_rkl_pairs()
    for t in data["difference"]["data"]:
        bench = t["meta"]["benchmark"]
        expected = [d.mean for tau in summary.taus if (d := summary.difference(bench, f, r, tau)).n]
        assert t["y"] == pytest.approx(expected)


def test_cell_table_and_drill_down(sweep):
    html = build_report(sweep)["report.html"].read_text()
    data = page_data(html)
    rows = re.findall(r"<tr class='cell-row' data-cell='(cell-\d+)'[^>]*><td>([^<]+)</td><td><span class='status (\w+)'",
                      html)
    status = {d: s for _, d, s in rows}
    assert len(rows) == len(scan_sweep(sweep))
    assert status["fkl-tau1-s0-45807ce7"] == "completed" and status["fkl-tau4-s2-832e24eb"] == "stale"
    assert status["jsd-tau4-s2-8f263476"] == "missing" and status["rkl-tau4-s2-8e6c8912"] == "failed"
    cell_id = next(i for i, d, _ in rows if d == "fkl-tau1-s0-45807ce7")
    section = re.search(rf"<section class='drill' id='{cell_id}' hidden>(.*?)</section>", html, re.S).group(1)
    # generations with their scores (escaped), the first eval seed's first examples per benchmark
    assert "The answer is 42." in section and "blue red green" in section and "66.7" in section
    assert "FKL (τ=1)" in section and "0.4000" in section
    curves = {t["meta"]["metric"]: t for t in data["cells"][cell_id]["data"]}
    log = dashboard.read_train_log(sweep / "fkl-tau1-s0-45807ce7" / "train_log.jsonl")
    assert curves["train/loss"]["x"] == sorted(log) and curves["valid/fkl"]["x"] == [50, 100, 150, 200]
    assert curves["valid/fkl"]["y"] == pytest.approx([log[s]["valid/fkl"] for s in (50, 100, 150, 200)])
    no_log_id = next(i for i, d, _ in rows if d == "jsd-tau2-s0-09637d3f")
    assert no_log_id not in data["cells"]
    assert "No train_log.jsonl for this cell." in html


def test_train_log_keeps_one_value_per_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.0}\n'
                    '{"step": 2, "train/loss": 2.5}\n{"step": 3, "train/lo')
    assert dashboard.read_train_log(path) == {1: {"train/loss": 3.0}, 2: {"train/loss": 2.5}}


def test_text_from_generations_cannot_inject_markup(sweep):
    gen = sweep / "fkl-tau1-s0-45807ce7" / "generations" / "test.generations.jsonl"
    evil = {"seed": 10, "prompt": "</script><script>alert(1)</script>", "output": "<b>x</b>", "references": ["y"],
            "rougeL": 1.0}
    gen.write_text(json.dumps(evil) + "\n")
    html = build_report(sweep)["report.html"].read_text()
    assert "<script>alert(1)</script>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
