"""`report.html`: the sweep as an offline dashboard, one self-contained file (plotly.js inlined, no network).

Written by `distill.report.write.write_report` beside report.md, so it is rebuilt after every cell. It shows:

- ROUGE-L vs tau, one panel per benchmark: one line per objective (mean ± std over training seeds,
  as in report.md), each training seed's score as a point, the teacher and the SFT warm start as
  reference lines (`distill.report.records.references`); objectives toggle with the checkboxes or the legend;
- FKL - RKL vs tau per benchmark (paired by training seed, ± std), with the zero line;
- the table of cells with their status; a click on a row opens the cell: its train and validation
  curves (from train_log.jsonl), its final validation CE / FKL / RKL at tau = 1, and sample
  generations with their ROUGE-L.

`distill-dashboard html SWEEP_DIR` rebuilds it (with the rest of the report); `distill-dashboard wandb
SWEEP_DIR --project P` builds the W&B Report of the same sweep (`distill.report.wandb`). plotly is imported
inside the functions that draw (it is heavy).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

from distill.options import SFT
from distill.cell.results import COMPLETED, read_generations
from distill.report.records import CellResult, Reference
from distill.report.render import COLOUR_ORDER, Y_TITLE
from distill.report.summary import Objective, Summary, objectives
from distill.report.tables import number

GENERATIONS_SHOWN = 5   # examples per benchmark in a cell's drill-down (first eval seed)
# matplotlib's tab10, the PNG's colours: one fixed colour per divergence across reports (render.COLOUR_ORDER)
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
REF_STYLE = (("#333333", "dash"), ("#777777", "dot"), ("#999999", "dashdot"))


def _colour(obj: Objective, i: int) -> str:
    return TAB10[(COLOUR_ORDER.index(obj.divergence) if obj.divergence in COLOUR_ORDER else i) % len(TAB10)]


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ----------------------------------------------------------------------------- figures (plotly JSON)

def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(n, 1))
    return math.ceil(max(n, 1) / cols), cols


def _objective_traces(go: Any, summary: Summary, bench: str, first: bool) -> list:
    """Per objective on `bench`: its mean ± std line and its per-seed points (legend on the first panel)."""
    traces, n = [], len(summary.rows)
    for i, obj in enumerate(summary.rows):
        pts = [(t, s) for t in summary.taus if (s := summary.get(bench, obj, t)) and s.n]
        if not pts:
            continue
        jitter = 2 ** (0.03 * (i - (n - 1) / 2))   # error bars at one tau do not hide each other
        colour = _colour(obj, i)
        level = obj.divergence == SFT and len({id(s) for _, s in pts}) == 1   # SFT: no tau, one level
        traces.append(go.Scatter(
            x=[t * jitter for t, _ in pts], y=[s.mean for _, s in pts],
            error_y=dict(type="data", array=[_num(s.std) or 0.0 for _, s in pts], visible=True, thickness=1.2),
            customdata=[[number(t), s.n, "–" if math.isnan(s.std) else f"{s.std:.1f}"] for t, s in pts],
            hovertemplate=f"<b>{html.escape(obj.label)}</b> τ=%{{customdata[0]}}<br>"
                          "ROUGE-L %{y:.1f} ± %{customdata[2]} (n=%{customdata[1]} seeds)<extra></extra>",
            mode="lines+markers", name=obj.label + (" (no τ)" if level else ""), legendgroup=obj.label,
            showlegend=first, line=dict(color=colour, width=2, dash="dash" if level else "solid"),
            marker=dict(size=7, color=colour),
            meta=dict(kind="objective", objective=obj.label, benchmark=bench)))
        seeds = [(t, seed, v) for t, s in pts for seed, v in s.by_seed.items()]
        traces.append(go.Scatter(
            x=[t * jitter for t, _, _ in seeds], y=[v for _, _, v in seeds],
            customdata=[[number(t), seed] for t, seed, _ in seeds],
            hovertemplate=f"{html.escape(obj.label)} τ=%{{customdata[0]}} seed %{{customdata[1]}}: "
                          "%{y:.1f}<extra></extra>",
            mode="markers", name=f"{obj.label} (seeds)", legendgroup=obj.label, showlegend=False,
            marker=dict(size=6, color=colour, opacity=0.6, symbol="circle-open", line=dict(width=1.5)),
            meta=dict(kind="seeds", objective=obj.label, benchmark=bench)))
    return traces


def _reference_traces(go: Any, summary: Summary, refs: Sequence[Reference], benches: Sequence[str], b: int) -> list:
    """The reference models' levels on panel b (each in the legend once, on the first panel that has it)."""
    if not summary.taus:
        return []
    bench = benches[b]
    lo, hi = min(summary.taus) / 1.15, max(summary.taus) * 1.15
    traces = []
    for k, ref in enumerate(refs):
        if bench not in ref.scores:
            continue
        colour, dash = REF_STYLE[k % len(REF_STYLE)]
        traces.append(go.Scatter(
            x=[lo, hi], y=[ref.scores[bench]] * 2, mode="lines", name=ref.label,
            legendgroup=f"ref:{ref.label}", showlegend=b == 0 or not any(bb in ref.scores for bb in benches[:b]),
            line=dict(color=colour, dash=dash, width=1.5),
            hovertemplate=f"{html.escape(ref.label)}: %{{y:.1f}}<extra></extra>",
            meta=dict(kind="reference", reference=ref.label, benchmark=bench)))
    return traces


def rouge_figure(summary: Summary, refs: Sequence[Reference]):
    """ROUGE-L vs tau per benchmark: a mean ± std line and the per-seed points of each objective.

    Every trace carries `meta` = {kind: objective|seeds|reference, objective|reference, benchmark}
    (the page's toggles and the tests find traces by it).
    """
    import plotly.graph_objects as go  # plotly is heavy: only when a dashboard is drawn
    from plotly.subplots import make_subplots

    benches = summary.benchmarks or ["(no completed cells)"]
    rows, cols = _grid(len(benches))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=benches, horizontal_spacing=0.06,
                        vertical_spacing=0.16)
    for b, bench in enumerate(benches):
        for trace in _objective_traces(go, summary, bench, b == 0) + _reference_traces(go, summary, refs, benches, b):
            fig.add_trace(trace, row=b // cols + 1, col=b % cols + 1)
    fig.update_xaxes(type="log", title_text="distillation temperature τ (log scale)",
                     tickvals=summary.taus, ticktext=[number(t) for t in summary.taus])
    fig.update_yaxes(title_text=Y_TITLE)
    fig.update_layout(height=380 * rows + 90, margin=dict(t=60, l=60, r=20, b=60), template="plotly_white",
                      legend=dict(orientation="h", y=-0.18 if rows == 1 else -0.08), hovermode="closest")
    return fig


def difference_figure(summary: Summary):
    """FKL - RKL vs tau, paired by training seed, one line per (benchmark, FKL/RKL pair); None if no pair."""
    import plotly.graph_objects as go  # plotly is heavy: only when a dashboard is drawn

    pairs = summary.fkl_rkl_pairs()
    if not pairs or not summary.taus:
        return None
    fig = go.Figure()
    for b, bench in enumerate(summary.benchmarks):
        for f, r in pairs:
            diffs = [(t, d) for t in summary.taus if (d := summary.difference(bench, f, r, t)).n]
            if not diffs:
                continue
            suffix = f.label[len("fkl"):]
            fig.add_trace(go.Scatter(
                x=[t for t, _ in diffs], y=[d.mean for _, d in diffs],
                error_y=dict(type="data", array=[_num(d.std) or 0.0 for _, d in diffs], visible=True),
                customdata=[[number(t), d.n] for t, d in diffs],
                hovertemplate=f"{html.escape(bench)} τ=%{{customdata[0]}}: FKL − RKL %{{y:+.1f}} "
                              "(%{customdata[1]} paired seeds)<extra></extra>",
                mode="lines+markers", name=f"{bench}{suffix}", line=dict(color=TAB10[b % len(TAB10)]),
                meta=dict(kind="difference", benchmark=bench)))
    fig.add_hline(y=0, line=dict(color="#999999", width=1))
    fig.update_xaxes(type="log", title_text="distillation temperature τ (log scale)",
                     tickvals=summary.taus, ticktext=[number(t) for t in summary.taus])
    fig.update_yaxes(title_text="FKL − RKL, ROUGE-L points")
    fig.update_layout(height=380, margin=dict(t=30, l=60, r=20, b=50), template="plotly_white")
    return fig


def read_train_log(path: Path) -> dict[int, dict[str, float]]:
    """train_log.jsonl as {step: {metric: value}}; a step logged twice (a resumed cell) keeps its last value."""
    steps: dict[int, dict[str, float]] = {}
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec.pop("step"))
        except (ValueError, KeyError, TypeError):   # a line cut by a kill
            continue
        steps.setdefault(step, {}).update({k: v for k, v in rec.items() if isinstance(v, (int, float))})
    return steps


def curves_figure(steps: dict[int, dict[str, float]]):
    """A cell's training losses and teacher-forced validation metrics vs step; None without a log."""
    import plotly.graph_objects as go  # plotly is heavy: only when a dashboard is drawn
    from plotly.subplots import make_subplots

    panels = (("train", ("train/loss", "train/kd", "train/ce")), ("valid", ("valid/ce", "valid/fkl", "valid/rkl")))
    if not any(k in rec for rec in steps.values() for _, keys in panels for k in keys):
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation (teacher-forced; KL at τ=1)"))
    for c, (_, keys) in enumerate(panels, start=1):
        for j, key in enumerate(keys):
            pts = sorted((s, rec[key]) for s, rec in steps.items() if key in rec)
            if pts:
                fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=[v for _, v in pts], name=key,
                                         mode="lines+markers" if len(pts) < 30 else "lines",
                                         line=dict(color=TAB10[(3 * (c - 1) + j) % len(TAB10)]),
                                         meta=dict(kind="curve", metric=key)), row=1, col=c)
    fig.update_xaxes(title_text="step")
    fig.update_layout(height=320, margin=dict(t=40, l=50, r=20, b=40), template="plotly_white")
    return fig


# ----------------------------------------------------------------------------- HTML

def _esc(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _generations_html(cell_dir: Path, benches: Sequence[str]) -> str:
    parts = []
    for bench in benches:
        lines = read_generations(cell_dir / "generations", bench)
        if not lines:
            continue
        first_seed = lines[0].get("seed")
        shown = [g for g in lines if g.get("seed") == first_seed][:GENERATIONS_SHOWN]
        rows = "".join(
            f"<tr><td><pre>{_esc(g.get('prompt'))}</pre></td><td><pre>{_esc(g.get('output'))}</pre></td>"
            f"<td><pre>{_esc(chr(10).join(g.get('references') or []))}</pre></td>"
            f"<td class='num'>{float(g.get('rougeL', float('nan'))):.1f}</td></tr>" for g in shown)
        parts.append(f"<h4>{_esc(bench)} <small>(eval seed {_esc(first_seed)}, first {len(shown)} of "
                     f"{len(lines)} generations)</small></h4><table class='gen'><thead><tr><th>prompt</th>"
                     f"<th>output</th><th>references</th><th>ROUGE-L</th></tr></thead><tbody>{rows}</tbody></table>")
    return "".join(parts) or "<p class='none'>No generations on disk for this cell.</p>"


def _valid_html(metrics: dict) -> str:
    valid = (metrics or {}).get("valid") or {}
    if not valid:
        return "<p class='none'>No final validation yet.</p>"
    names = {"ce": "CE", "fkl": "FKL (τ=1)", "rkl": "RKL (τ=1)"}
    cells = "".join(f"<td class='num'>{float(v):.4f}</td>" for v in valid.values())
    head = "".join(f"<th>{_esc(names.get(k, k))}</th>" for k in valid)
    return (f"<table class='valid'><thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table>"
            "<p class='note'>Teacher-forced on the validation split; FKL and RKL are the true KL at τ = 1, "
            "comparable across objectives and temperatures.</p>")


def cell_views(cells: Sequence[CellResult], benches: Sequence[str], root: Path | None) -> list[dict[str, Any]]:
    """One entry per cell for the table and its drill-down: row fields, curves figure, HTML blocks."""
    labels = {d: o.label for d, o in objectives(cells).items()}
    views = []
    for i, c in enumerate(cells):
        m = c.metrics or {}
        cell = m.get("cell", {})
        cdir = (root / c.dir) if root is not None else None
        steps = read_train_log(cdir / "train_log.jsonl") if cdir is not None else {}
        fig = curves_figure(steps) if steps else None
        views.append({
            "id": f"cell-{i}", "dir": c.dir, "status": c.status, "error": c.error,
            "objective": labels.get(c.dir, cell.get("divergence", "–")), "tau": cell.get("tau"),
            "seed": cell.get("seed"), "scores": {b: (m.get("eval") or {}).get(b, {}).get("rougeL_mean") for b in benches},
            "valid": m.get("valid") or {}, "last_step": max(steps) if steps else m.get("train", {}).get("steps"),
            "updated": m.get("updated_at", ""), "curves": fig,
            "generations_html": _generations_html(cdir, benches) if cdir is not None else "",
            "valid_html": _valid_html(m),
        })
    return views


def _table_html(views: Sequence[dict], benches: Sequence[str]) -> str:
    head = ("<tr><th>cell</th><th>status</th><th>objective</th><th>τ</th><th>seed</th>"
            + "".join(f"<th>{_esc(b)}</th>" for b in benches)
            + "<th>valid FKL</th><th>valid RKL</th><th>last step</th><th>updated</th></tr>")
    body = []
    for v in views:
        scores = "".join(f"<td class='num'>{'' if s is None else f'{s:.1f}'}</td>" for s in v["scores"].values())
        fkl, rkl = v["valid"].get("fkl"), v["valid"].get("rkl")
        body.append(
            f"<tr class='cell-row' data-cell='{v['id']}' tabindex='0' title='click: curves and generations'>"
            f"<td>{_esc(v['dir'])}</td><td><span class='status {_esc(v['status'])}'>{_esc(v['status'])}</span></td>"
            f"<td>{_esc(v['objective'])}</td><td class='num'>{'' if v['tau'] is None else _esc(number(float(v['tau'])))}</td>"
            f"<td class='num'>{_esc(v['seed'])}</td>{scores}"
            f"<td class='num'>{'' if fkl is None else f'{fkl:.4f}'}</td><td class='num'>{'' if rkl is None else f'{rkl:.4f}'}</td>"
            f"<td class='num'>{_esc(v['last_step'])}</td><td>{_esc(v['updated'])}</td></tr>")
    return f"<table id='cells'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _drill_html(views: Sequence[dict]) -> str:
    out = []
    for v in views:
        err = f"<pre class='error'>{_esc(v['error'])}</pre>" if v["error"] else ""
        curves = (f"<div class='curves' id='{v['id']}-curves'></div>" if v["curves"] is not None
                  else "<p class='none'>No train_log.jsonl for this cell.</p>")
        out.append(f"<section class='drill' id='{v['id']}' hidden><h3>{_esc(v['dir'])} "
                   f"<span class='status {_esc(v['status'])}'>{_esc(v['status'])}</span></h3>{err}"
                   f"<h4>Training and validation curves</h4>{curves}"
                   f"<h4>Final validation</h4>{v['valid_html']}"
                   f"<h4>Sample generations</h4><div class='generations'>{v['generations_html']}</div></section>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.lead{color:#555;max-width:70em} .note{color:#666;font-size:.85em} .none{color:#888;font-style:italic}
table{border-collapse:collapse;font-size:.85em} th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.cell-row{cursor:pointer} tr.cell-row:hover,tr.cell-row.selected{background:#eef4ff}
.status{padding:1px 6px;border-radius:8px;font-size:.9em;background:#eee}
.status.completed{background:#d9f2d9} .status.failed,.status.unreadable{background:#f8d0d0}
.status.running{background:#fff1c2} .status.stale,.status.interrupted{background:#ffd9b3}
.status.missing,.status.superseded{background:#e6e6e6}
#toggles label{margin-right:1em} .drill{border:1px solid #cdd;border-radius:6px;padding:.5em 1em;margin-top:1em}
table.gen pre{white-space:pre-wrap;margin:0;max-width:32em;font-size:.95em} pre.error{color:#a00;white-space:pre-wrap}
"""

_JS = """
(function(){
  const DATA = JSON.parse(document.getElementById('dashboard-data').textContent);
  const CONFIG = {displaylogo: false, responsive: true};
  const rouge = document.getElementById('rouge');
  Plotly.newPlot(rouge, DATA.rouge.data, DATA.rouge.layout, CONFIG);
  if (DATA.difference) {
    Plotly.newPlot('difference', DATA.difference.data, DATA.difference.layout, CONFIG);
  }
  document.querySelectorAll('input.objective-toggle').forEach(function(box){
    box.addEventListener('change', function(){
      const idx = [];
      rouge.data.forEach(function(t, i){ if (t.meta && t.meta.objective === box.value) idx.push(i); });
      Plotly.restyle(rouge, {visible: box.checked ? true : 'legendonly'}, idx);
    });
  });
  function show(id){
    document.querySelectorAll('section.drill').forEach(function(s){ s.hidden = s.id !== id; });
    document.querySelectorAll('tr.cell-row').forEach(function(r){ r.classList.toggle('selected', r.dataset.cell === id); });
    const fig = DATA.cells[id];
    const div = document.getElementById(id + '-curves');
    if (fig && div && !div.dataset.drawn) { Plotly.newPlot(div, fig.data, fig.layout, CONFIG); div.dataset.drawn = '1'; }
    document.getElementById(id).scrollIntoView({block: 'nearest'});
  }
  document.querySelectorAll('tr.cell-row').forEach(function(row){
    row.addEventListener('click', function(){ show(row.dataset.cell); });
    row.addEventListener('keydown', function(e){ if (e.key === 'Enter') show(row.dataset.cell); });
  });
})();
"""


def _json_for_script(obj: Any) -> str:
    import plotly.io as pio  # plotly is heavy: only when a dashboard is drawn

    # `</` would end the <script> element early
    return pio.to_json(obj, validate=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def render_html(summary: Summary, sweep: str, refs: Sequence[Reference], root: Path | None) -> str:
    """The dashboard page for these cells (`root`: the sweep dir holding the cell dirs, or None)."""
    import plotly.offline  # plotly is heavy: only when a dashboard is drawn

    benches = summary.benchmarks
    views = cell_views(summary.cells, benches, root)
    diff = difference_figure(summary)
    data = {"rouge": rouge_figure(summary, refs).to_plotly_json(),
            "difference": None if diff is None else diff.to_plotly_json(),
            "cells": {v["id"]: v["curves"].to_plotly_json() for v in views if v["curves"] is not None}}
    counts: dict[str, int] = {}
    for c in summary.cells:
        counts[c.status] = counts.get(c.status, 0) + 1
    status_line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: kv[0] != COMPLETED))
    toggles = "".join(f"<label><input type='checkbox' class='objective-toggle' value='{_esc(o.label)}' checked> "
                      f"{_esc(o.label)}</label>" for o in summary.rows)
    refs_line = "; ".join(f"{_esc(r.label)} = cell {_esc(Path(r.cell_dir).name)}" for r in refs) or "none found"
    diff_block = ("<div id='difference'></div>" if diff is not None
                  else "<p class='none'>FKL and RKL were not both run: no difference to show.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep {_esc(sweep)}: distillation dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style>
<script>{plotly.offline.get_plotlyjs()}</script></head>
<body>
<h1>Sweep <code>{_esc(sweep)}</code></h1>
<p class="lead">{len(summary.cells)} cells: {_esc(status_line)}. Each line is an objective's ROUGE-L
(F1 x 100) <b>mean ± std over training seeds</b> (sample std; no bar with one seed); the faint points are the
training seeds, each itself a mean over eval seeds. Dashed and dotted levels: reference models ({refs_line}).
Same numbers as report.md.</p>
<h2>ROUGE-L vs distillation temperature</h2>
<div id="toggles">Objectives: {toggles}</div>
<div id="rouge"></div>
<h2>FKL − RKL vs temperature (paired by training seed)</h2>
{diff_block}
<h2>Cells</h2>
<p class="note">Click a row for its curves, final validation and sample generations.</p>
{_table_html(views, benches)}
{_drill_html(views)}
<script type="application/json" id="dashboard-data">{_json_for_script(data)}</script>
<script>{_JS}</script>
</body></html>
"""
