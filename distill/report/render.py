"""report.csv and report.png: a sweep's Summary as a long-form table and as a plot.

- report.csv  the numbers of report.md in long form (one row per benchmark x tau x objective or comparison).
- report.png  ROUGE-L vs tau (log2 axis), one line per objective with ± 1 std error bars, SFT as a level
              with a band, the teacher and the SFT warm start as reference levels, one panel per benchmark.

matplotlib is imported only inside `render_png` (it is heavy; importing the report stays light).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from distill.files import atomic_write_bytes
from distill.options import OBJECTIVE_ORDER, SFT
from distill.report import statistics as stats
from distill.report.records import Reference
from distill.report.summary import Comparison, Objective, Summary
from distill.report.tables import csv_table, number

CSV_COLUMNS = ["benchmark", "row", "divergence", "tau", "rougeL_mean", "rougeL_std", "n", "seeds", "best",
               "eval_seed_std", "n_eval_seeds", "eval_share", "comparison", "ci_low", "ci_high", "boot_low",
               "boot_high", "p_value", "test", "verdict", "seeds_needed"]
MARKERS = "osD^v<>ph*"
Y_TITLE = "ROUGE-L F1 x 100"   # the y axis of every ROUGE-L plot: report.png, report.html, the W&B Report
# a fixed colour per divergence across reports (fkl blue, rkl orange, ...), sft last: matplotlib's tab10 order
COLOUR_ORDER = OBJECTIVE_ORDER[1:] + OBJECTIVE_ORDER[:1]


# ----------------------------------------------------------------------------- report.csv

def _num(x: float | None) -> str:
    """A CSV number: 4 decimals, empty for none or nan."""
    return "" if x is None or not math.isfinite(x) else number(float(x), ".4f")


def _objective_csv_row(summary: Summary, bench: str, o: Objective, t: float, best: list[Objective]) -> list | None:
    s = summary.get(bench, o, t)
    if not (s and s.n):
        return None
    v = s.variance
    return [bench, o.label, o.divergence, number(t), _num(s.mean), _num(s.std), s.n, " ".join(map(str, s.by_seed)),
            int(o in best), _num(v.eval_std), _num(v.n_eval), _num(v.eval_share)] + [""] * 9


def _comparison_csv_row(c: Comparison) -> list:
    pt = c.test
    need = pt.seeds_needed
    need_txt = "" if need is None or pt.resolved else (f">{stats.MAX_SEEDS}" if need > stats.MAX_SEEDS else need)
    return [c.bench, c.csv_row, "", number(c.tau), _num(pt.mean), _num(pt.sd), pt.n, " ".join(map(str, c.diff.by_seed)),
            "", "", "", "", c.kind, _num(pt.ci_low), _num(pt.ci_high), _num(pt.boot_low), _num(pt.boot_high),
            _num(pt.p_value), pt.test, c.verdict, need_txt]


def render_csv(summary: Summary) -> str:
    """Long-form CSV, one row per benchmark x tau x (objective | comparison).

    Objective rows: rougeL_mean/rougeL_std/n over training seeds (rougeL_std is the training-seed
    spread), eval_seed_std (pooled std over eval seeds), n_eval_seeds and eval_share (the share of
    the between-training-seed variance that eval sampling explains). Comparison rows (`comparison`
    = fkl-rkl | best-second | vs-sft): rougeL_mean/rougeL_std/n of the per-seed differences,
    the paired-t CI (ci_low, ci_high), the bootstrap CI (n >= 5), p_value, test, verdict and
    seeds_needed (unresolved only; > MAX_SEEDS written as '>1000').
    """
    rows: list[list[Any]] = []
    for bench in summary.benchmarks:
        comps = summary.comparisons(bench)
        for t in summary.taus:
            best = summary.best(bench, t)
            rows += [r for o in summary.rows if (r := _objective_csv_row(summary, bench, o, t, best)) is not None]
            rows += [_comparison_csv_row(c) for c in comps if c.tau == t]
    return csv_table(CSV_COLUMNS, rows)


# ----------------------------------------------------------------------------- report.png

def plot_caption(summary: Summary, sweep: str) -> str:
    """The plot's title: what the points and the error bars are."""
    ns = sorted({s.n for s in summary.stats.values() if s.n})
    n_txt = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}" if ns else "n = 0"
    return (f"ROUGE-L vs distillation temperature — sweep '{sweep}'\n"
            f"points: mean over training seeds ({n_txt})\n"
            "error bars, SFT band: ± 1 sample std over training seeds (not a CI)")


def _draw_objectives(ax: Any, cmap: Any, summary: Summary, bench: str) -> None:
    """One line (± 1 std over training seeds) per objective; an SFT row with one entry is a level with a band."""
    rows = summary.rows
    # small multiplicative offset per line so error bars at the same tau do not hide each other
    offsets = {o: 2 ** (0.035 * (i - (len(rows) - 1) / 2)) for i, o in enumerate(rows)}
    for i, o in enumerate(rows):
        pts = [(t, s) for t in summary.taus if (s := summary.get(bench, o, t)) and s.n]
        if not pts:
            continue
        ci = COLOUR_ORDER.index(o.divergence) if o.divergence in COLOUR_ORDER else i
        if o.divergence == SFT and len({id(s) for _, s in pts}) == 1:
            # tau does not apply to SFT: one level across the plot, its ± 1 std as a band
            s = pts[0][1]
            sd = 0.0 if math.isnan(s.std) else s.std
            ax.axhline(s.mean, color="0.35", linestyle="--", linewidth=1.5, label=f"{o.label} (no τ)")
            ax.axhspan(s.mean - sd, s.mean + sd, color="0.5", alpha=0.15, linewidth=0)
            continue
        xs = [t * offsets[o] for t, _ in pts]
        ys = [s.mean for _, s in pts]
        es = [0.0 if math.isnan(s.std) else s.std for _, s in pts]
        ax.errorbar(xs, ys, yerr=es, label=o.label, color=cmap(ci % 10), marker=MARKERS[i % len(MARKERS)],
                    markersize=5, linewidth=1.8, capsize=3, elinewidth=1.1)


def _draw_panel(ax: Any, cmap: Any, summary: Summary, bench: str, refs: Sequence[Reference]) -> None:
    """One benchmark's panel: the objectives, the reference levels, the log2 tau axis."""
    _draw_objectives(ax, cmap, summary, bench)
    for k, ref in enumerate(refs):
        if bench in ref.scores:
            ax.axhline(ref.scores[bench], color=("0.15", "0.45", "0.6")[k % 3], linestyle=("-.", ":", ":")[k % 3],
                       linewidth=1.3, label=ref.label, zorder=1)
    ax.set_xscale("log", base=2)
    if summary.taus:
        ax.set_xticks(summary.taus)
        ax.set_xticklabels([number(t) for t in summary.taus])
        ax.minorticks_off()
    else:
        ax.text(0.5, 0.5, "no completed cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(bench, fontsize=12)
    ax.set_xlabel("distillation temperature τ (log₂ scale)")
    ax.set_ylabel(Y_TITLE)
    ax.grid(True, which="major", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def render_png(summary: Summary, sweep: str, path: Path, refs: Sequence[Reference] = ()) -> None:
    """ROUGE-L vs tau, one panel per benchmark, one line (± 1 std over training seeds) per objective.

    The teacher (dash-dotted) and the SFT warm start (dotted) of `refs` are levels too.
    An SFT row that fills every tau column is drawn as a dashed level with a ± 1 std band.
    """
    import matplotlib  # heavy: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Names are text, never mathtext: a sweep or model name with `$` must not break the plot.
    with matplotlib.rc_context({"text.parse_math": False}):
        benches = summary.benchmarks or ["(no completed cells)"]
        ncol = min(3, len(benches))
        nrow = math.ceil(len(benches) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow + 0.8), squeeze=False)
        cmap = plt.get_cmap("tab10")
        for ax, bench in zip(axes.flat, benches):
            _draw_panel(ax, cmap, summary, bench, refs)
        for ax in list(axes.flat)[len(benches):]:
            ax.set_visible(False)
        legend = {}   # label -> handle, over every panel (a reference may miss the first benchmark)
        for ax in axes.flat:
            legend.update(zip(*reversed(ax.get_legend_handles_labels())))
        labels, handles = list(legend), list(legend.values())
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False,
                       bbox_to_anchor=(0.5, 0.0))
        fig.suptitle(plot_caption(summary, sweep), fontsize=11 if ncol > 1 else 9.5)
        fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 0.98))
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=130)
        plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
