"""distill.report.write: the report's files are written together, into the sweep dir."""

import html as html_lib
import json
import shutil

import pytest

from distill.report.write import build_report
from tests.report.sweeps import FIXTURE


def test_report_html_is_written_beside_the_report_and_self_contained(sweep_with_refs):
    paths = build_report(sweep_with_refs)
    html = paths["report.html"].read_text()
    assert paths["report.html"].parent == paths["report.md"].parent
    # plotly.js is inlined: no script or stylesheet is fetched from anywhere
    assert "<script src" not in html and "<link" not in html and "Plotly.newPlot" in html
    assert len(html) > 3_000_000


@pytest.mark.parametrize("name", ["cost$x^$", "run$\\\\foo$", "a <b> & 'c'", "sweep with spaces"])
def test_the_report_accepts_any_sweep_name(tmp_path, name):
    """A sweep dir from before names were checked, or a W&B group, may have any name: `$` is text in the PNG (not
    mathtext), markup is escaped in the HTML."""
    sweep = tmp_path / name
    shutil.copytree(FIXTURE, sweep)
    for metrics in sweep.glob("*/metrics.json"):   # the name the cells recorded is the report's name
        metrics.write_text(metrics.read_text().replace('"sweep": "fixture"', f'"sweep": {json.dumps(name)}'))
    paths = build_report(sweep)
    assert paths["report.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["report.html"].read_text()
    assert f"<code>{html_lib.escape(name)}</code>" in page
    if "<" in name:
        assert name not in page   # never as markup
    assert name in paths["report.md"].read_text()
