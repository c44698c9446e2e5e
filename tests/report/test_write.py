"""distill.report.write: the report's files are written together, into the sweep dir."""

from distill.report.write import build_report


def test_report_html_is_written_beside_the_report_and_self_contained(sweep_with_refs):
    paths = build_report(sweep_with_refs)
    html = paths["report.html"].read_text()
    assert paths["report.html"].parent == paths["report.md"].parent
    # plotly.js is inlined: no script or stylesheet is fetched from anywhere
    assert "<script src" not in html and "<link" not in html and "Plotly.newPlot" in html
    assert len(html) > 3_000_000
