"""distill.report.render: report.png is a real plot and its caption says what the error bars are."""

from distill.report.records import references, scan_sweep
from distill.report.render import plot_caption, render_png
from distill.report.summary import summarize
from distill.report.write import build_report
from tests.report.sweeps import constructed_sweep


def test_png_is_a_real_plot(sweep):
    from PIL import Image

    build_report(sweep)
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.load()
        w, h = im.size
        assert w > 800 and h > 400
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, text and anti-aliasing, not a blank canvas
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing behind


def test_plot_caption_says_what_the_error_bars_are(tmp_path):
    constructed_sweep(tmp_path)
    summary = summarize(scan_sweep(tmp_path))
    caption = plot_caption(summary, "stat")
    assert "± 1 sample std over training seeds (not a CI)" in caption and "n = 5" in caption


def test_png_has_reference_lines_and_says_what_its_y_axis_is(sweep_with_refs, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    cells = scan_sweep(sweep_with_refs)
    render_png(summarize(cells), "fixture", sweep_with_refs / "x.png", references(cells, sweep_with_refs))
    (fig,) = figures
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert {ax.get_title() for ax in axes} == {"test", "shift_long"}
    for ax in axes:
        assert ax.get_ylabel() == "ROUGE-L F1 x 100"
        levels = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()}
        expected = {"test": (55.0, 30.0), "shift_long": (41.0, 25.0)}[ax.get_title()]
        assert (levels["teacher"], levels["SFT warm start"]) == expected
    plt.close(fig)
