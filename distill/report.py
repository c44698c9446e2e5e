"""Sweep report: a sweep dir of cells -> report.md, report.csv and report.png.

`distill-report SWEEP_DIR` reads every `<cell>/metrics.json` (schema_version 1, written by
`distill-train`) and writes, atomically, into SWEEP_DIR:

- report.md   per benchmark: objective x tau table of ROUGE-L mean ± std over training seeds,
              best objective per tau in bold, FKL - RKL per tau (paired over seeds), one
              sentence saying what the numbers say, and every unfinished / failed / missing
              cell with its error (nothing is dropped silently).
- report.csv  the same numbers in long form (one row per benchmark x row x tau).
- report.png  ROUGE-L vs tau (log2 axis), one line per objective with std error bars,
              one panel per benchmark.

Statistics (stated in report.md too): a cell's score on a benchmark is its `rougeL_mean`, the
mean over its *evaluation* seeds. An entry is the mean of those scores over the cell's
*training* seeds, ± their sample std (ddof=1; "–" with one seed). FKL - RKL is computed per
training seed present in both (paired), reported as mean ± sample std of the paired
differences.

With `--wandb ENTITY/PROJECT --group SWEEP` the same fields come from the W&B API instead
of the files (see `records_from_wandb`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 1
FINISHED = "completed"
# status of a cell as the report sees it: the three metrics.json states plus what the
# report itself can find wrong with a cell dir.
PROBLEM_STATUSES = ("running", "failed", "missing", "unreadable", "superseded")
CELL_DIR_RE = re.compile(r"^.+-[0-9a-f]{8}$")  # <name>-<8-hex signature>
# canonical order (and colour) of the objectives, as in the paper's tables
DIVERGENCE_ORDER = ("sft", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "akl", "ab")
# per-cell identifiers inside `cell` that say nothing about the objective (never grouped on)
IDENTITY_KEYS = ("signature", "name")
REPORT_FILES = ("report.md", "report.csv", "report.png", "report.html")
SUMMARY_JOB_TYPE = "sweep-report"   # W&B job_type of the per-sweep summary run (distill.wandb_report)


# ----------------------------------------------------------------------------- records

@dataclass
class Cell:
    """One cell of the sweep as found on disk (or in W&B)."""

    dir: str                      # cell dir name relative to the sweep dir (or W&B run name)
    status: str                   # completed | running | failed | missing | unreadable | superseded
    metrics: dict[str, Any] | None = None
    error: str | None = None      # the job's error, or why the report could not use the cell

    @property
    def label_source(self) -> dict[str, Any]:
        """The cell description without per-cell identifiers (signature)."""
        return {k: v for k, v in (self.metrics or {}).get("cell", {}).items() if k not in IDENTITY_KEYS}


def parse_metrics(text: str, source: str) -> dict[str, Any]:
    """Parse and check one metrics.json; raise ValueError saying what is wrong."""
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(m).__name__}")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{source}: schema_version {m.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if m.get("status") not in ("running", "completed", "failed"):
        raise ValueError(f"{source}: status {m.get('status')!r}, expected running|completed|failed")
    cell = m.get("cell")
    if not isinstance(cell, dict) or not {"divergence", "tau", "seed"} <= cell.keys():
        raise ValueError(f"{source}: 'cell' must hold at least divergence, tau and seed")
    if m["status"] == FINISHED and not isinstance(m.get("eval"), dict):
        raise ValueError(f"{source}: completed cell without an 'eval' object")
    return m


def scan_sweep(sweep_dir: str | os.PathLike) -> list[Cell]:
    """Find the cells of a sweep dir: subdirs named `<name>-<8hex>` or holding a metrics.json.

    Hidden dirs (.hydra-jobs, .submitit) are not cells. A cell dir without metrics.json is
    'missing'; one whose metrics.json cannot be parsed is 'unreadable'.
    """
    root = Path(sweep_dir)
    cells = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = d / "metrics.json"
        if not path.is_file():
            if CELL_DIR_RE.match(d.name):
                cells.append(Cell(d.name, "missing", error="no metrics.json (never started or killed before writing)"))
            continue
        try:
            m = parse_metrics(path.read_text(), f"{d.name}/metrics.json")
        except (ValueError, OSError) as e:
            cells.append(Cell(d.name, "unreadable", error=str(e)))
            continue
        cells.append(Cell(d.name, m["status"], m, m.get("error")))
    return dedupe(cells)


def dedupe(cells: list[Cell]) -> list[Cell]:
    """Keep one completed cell per identical `cell` description (the latest `updated_at`).

    Two completed dirs with the same cell (e.g. a rerun after a config change the cell
    description does not show) would otherwise count twice as seeds; the older ones are
    marked 'superseded' and listed, not averaged.
    """
    latest: dict[str, Cell] = {}
    for c in cells:
        if c.status != FINISHED:
            continue
        key = json.dumps(c.label_source, sort_keys=True)
        other = latest.get(key)
        if other is None or str(c.metrics.get("updated_at", "")) > str(other.metrics.get("updated_at", "")):
            latest[key] = c
    keep = {id(c) for c in latest.values()}
    out = []
    for c in cells:
        if c.status == FINISHED and id(c) not in keep:
            key = json.dumps(c.label_source, sort_keys=True)
            c = Cell(c.dir, "superseded", c.metrics, f"same cell as {latest[key].dir}, which is newer")
        out.append(c)
    return out


@dataclass(frozen=True)
class Reference:
    """A model the sweep's students are compared with: its own cell's scores per benchmark."""

    label: str                  # "teacher" or "SFT baseline" (+ the cell dir when there are several)
    cell_dir: str               # the reference's own run dir
    scores: dict[str, float]    # benchmark -> rougeL_mean


def _model_run_dir(model_path: str, root: Path) -> Path | None:
    """The run dir that exported `model_path` (`<run_dir>/student`), if it is one of ours."""
    p = Path(model_path)
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, root.parent / p]):
        if cand.name == "student" and (cand.parent / "metrics.json").is_file():
            return cand.parent
    return None


def references(cells: Iterable[Cell], root: str | os.PathLike) -> list[Reference]:
    """The teacher and the SFT warm start of the sweep's completed cells, read from their own cells.

    `cell.teacher` / `cell.student` are model paths; when a path is a `<run_dir>/student` exported
    by `distill-train` (absolute, or relative to the working dir or to the sweep's output root) and
    that run completed, its scores become a reference line. Hub models and random inits have none.
    """
    found: dict[tuple[str, Path], dict[str, float]] = {}
    for c in cells:
        if c.status != FINISHED:
            continue
        for role in ("teacher", "student"):
            path = (c.metrics or {}).get("cell", {}).get(role)
            run_dir = _model_run_dir(str(path), Path(root)) if path else None
            if run_dir is None or (role, run_dir) in found:
                continue
            try:
                m = parse_metrics((run_dir / "metrics.json").read_text(), str(run_dir / "metrics.json"))
            except (ValueError, OSError):
                continue
            if m["status"] == FINISHED and (role == "teacher" or m["cell"]["divergence"] == "sft"):
                found[(role, run_dir)] = {b: float(e["rougeL_mean"]) for b, e in m["eval"].items()}
    out = []
    for (role, run_dir), scores in sorted(found.items(), key=lambda kv: (kv[0][0] != "teacher", str(kv[0][1]))):
        label = "teacher" if role == "teacher" else "SFT baseline"
        if sum(r == role for r, _ in found) > 1:
            label += f" ({run_dir.name})"
        out.append(Reference(label, str(run_dir), scores))
    return out


# ----------------------------------------------------------------------------- statistics

@dataclass
class Stat:
    """Scores of one (benchmark, objective, tau) entry, one per training seed."""

    by_seed: dict[int, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return _mean(list(self.by_seed.values()))

    @property
    def std(self) -> float:
        return _std(list(self.by_seed.values()))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    if len(xs) < 2:
        return math.nan
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class Objective:
    """A row of the tables: a divergence, plus whatever else varies in the sweep."""

    divergence: str
    params: tuple[tuple[str, Any], ...] = ()    # divergence params that vary within the sweep
    context: tuple[tuple[str, Any], ...] = ()   # other cell fields that vary (kd_ratio, model, ...)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={_fmt_value(v)}" for k, v in self.params + self.context)
        return f"{self.divergence} ({extra})" if extra else self.divergence

    def sort_key(self) -> tuple:
        order = DIVERGENCE_ORDER.index(self.divergence) if self.divergence in DIVERGENCE_ORDER else len(DIVERGENCE_ORDER)
        return (repr(self.context), order, self.divergence, repr(self.params))


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def objectives(cells: Iterable[Cell]) -> dict[str, Objective]:
    """Map each completed cell dir to its Objective (row label).

    Only fields that take more than one value across the completed cells show up in the
    label, so a plain divergence x tau x seed sweep has rows 'fkl', 'rkl', ...
    """
    done = [c for c in cells if c.status == FINISHED]
    skip = {"divergence", "divergence_params", "tau", "seed"}
    keys = sorted({k for c in done for k in c.label_source} - skip)
    # a field varies if it takes two values (absent counts as a value) across completed cells
    ctx_keys = [k for k in keys if len({json.dumps(c.label_source.get(k), sort_keys=True) for c in done}) > 1]
    params_seen: dict[tuple[str, str], set[str]] = {}
    for c in done:
        div = c.label_source["divergence"]
        for k, v in (c.label_source.get("divergence_params") or {}).items():
            params_seen.setdefault((div, k), set()).add(json.dumps(v, sort_keys=True))
    out = {}
    for c in done:
        src = c.label_source
        div = src["divergence"]
        params = tuple(sorted((k, v) for k, v in (src.get("divergence_params") or {}).items()
                              if len(params_seen[(div, k)]) > 1))
        context = tuple((k, src.get(k)) for k in ctx_keys)
        out[c.dir] = Objective(div, params, context)
    return out


@dataclass
class Summary:
    """Everything the report shows, computed from the cells (no I/O)."""

    benchmarks: list[str]
    taus: list[float]
    rows: list[Objective]
    stats: dict[tuple[str, Objective, float], Stat]   # (benchmark, objective, tau) -> Stat
    cells: list[Cell]

    def get(self, bench: str, obj: Objective, tau: float) -> Stat | None:
        return self.stats.get((bench, obj, tau))

    def best(self, bench: str, tau: float) -> list[Objective]:
        """Objectives with the highest mean at this tau (ties all count)."""
        entries = [(s.mean, o) for o in self.rows if (s := self.get(bench, o, tau)) and s.n]
        if not entries:
            return []
        top = max(m for m, _ in entries)
        return [o for m, o in entries if m == top]

    def fkl_rkl_pairs(self) -> list[tuple[Objective, Objective]]:
        """(FKL, RKL) rows that differ only in the divergence."""
        pairs = []
        for f in self.rows:
            if f.divergence == "fkl":
                for r in self.rows:
                    if r.divergence == "rkl" and r.params == f.params and r.context == f.context:
                        pairs.append((f, r))
        return pairs

    def difference(self, bench: str, a: Objective, b: Objective, tau: float) -> Stat:
        """a - b per training seed present in both (paired); empty Stat if none."""
        sa, sb = self.get(bench, a, tau), self.get(bench, b, tau)
        if sa is None or sb is None:
            return Stat()
        return Stat({s: sa.by_seed[s] - sb.by_seed[s] for s in sorted(sa.by_seed.keys() & sb.by_seed.keys())})


def summarize(cells: list[Cell]) -> Summary:
    """Group completed cells into (benchmark, objective, tau) entries over training seeds."""
    objs = objectives(cells)
    stats: dict[tuple[str, Objective, float], Stat] = {}
    benchmarks: list[str] = []
    for c in cells:
        if c.status != FINISHED:
            continue
        tau, seed = float(c.label_source["tau"]), int(c.label_source["seed"])
        for bench, ev in c.metrics["eval"].items():
            if bench not in benchmarks:
                benchmarks.append(bench)
            stats.setdefault((bench, objs[c.dir], tau), Stat()).by_seed[seed] = float(ev["rougeL_mean"])
    rows = sorted(set(objs.values()), key=Objective.sort_key)
    taus = sorted({k[2] for k in stats})
    return Summary(benchmarks, taus, rows, stats, cells)


# ----------------------------------------------------------------------------- words

def _pm(s: Stat, signed: bool = False) -> str:
    """'41.0 ± 1.4' ('41.0' with one seed, no spread; '–' with none)."""
    if not s.n:
        return "–"
    mean = _signed(s.mean) if signed else f"{s.mean:.1f}"
    return mean if math.isnan(s.std) else f"{mean} ± {s.std:.1f}"


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def _vs_spread(d: Stat) -> str:
    """'+1.2 ± 1.1 over 2 paired seeds, beyond the spread': a paired difference and its std.

    'beyond the spread' means |mean difference| > std of the per-seed differences.
    """
    if d.n < 2:
        return f"{_signed(d.mean)}, one seed: no spread"
    where = "beyond" if abs(d.mean) > d.std else "within"
    return f"{_signed(d.mean)} ± {d.std:.1f} over {d.n} paired seeds, {where} the spread"


def describe(summary: Summary, bench: str, fkl: Objective, rkl: Objective) -> str:
    """One sentence on FKL vs RKL for a benchmark: who leads at tau=1, does FKL overtake later."""
    taus = [t for t in summary.taus if summary.difference(bench, fkl, rkl, t).n]
    if not taus:
        return f"No training seed has both {fkl.label} and {rkl.label} completed on {bench}, so they cannot be compared."
    ref = 1.0 if 1.0 in taus else taus[0]
    d = summary.difference(bench, fkl, rkl, ref)
    at = f"τ={_fmt_value(ref)}" + ("" if ref == 1.0 else " (the lowest τ with both; τ=1 was not run)")
    lead = round(d.mean, 1)   # what the table shows: a 0.0 difference is a tie
    if lead < 0:
        first = f"At {at} RKL leads FKL by {-d.mean:.1f} ROUGE-L (FKL − RKL = {_vs_spread(d)})"
    elif lead > 0:
        first = f"At {at} RKL does not lead: FKL is ahead by {d.mean:.1f} ROUGE-L (FKL − RKL = {_vs_spread(d)})"
    else:
        first = f"At {at} FKL and RKL tie (FKL − RKL = {_vs_spread(d)})"
    higher = [t for t in taus if t > ref]
    if not higher:
        return first + "; no higher τ was run with both."
    diffs = {t: summary.difference(bench, fkl, rkl, t) for t in higher}
    listing = lambda ts: ", ".join(f"τ={_fmt_value(t)} ({_vs_spread(diffs[t])})" for t in ts)
    ahead = [t for t in higher if round(diffs[t].mean, 1) > 0]
    rest = [t for t in higher if t not in ahead]
    if lead > 0:
        tail = f"; at higher τ FKL − RKL is {listing(higher)}"
    elif ahead:
        tail = f"; FKL overtakes RKL at {listing(ahead)}" + (f", but not at {listing(rest)}" if rest else "")
    else:
        tail = f"; FKL does not overtake RKL at any higher τ: {listing(higher)}"
    return first + tail + "."


# ----------------------------------------------------------------------------- rendering

def render_markdown(summary: Summary, sweep: str) -> str:
    """The report as markdown."""
    cells = summary.cells
    counts = {s: sum(c.status == s for c in cells) for s in (FINISHED,) + PROBLEM_STATUSES}
    lines = [f"# Sweep report: {sweep}", ""]
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    lines += ["", "Each entry is ROUGE-L (F1 x 100) **mean ± std over training seeds** (sample std, ddof=1; "
              "no ± with one seed) with the number of seeds n; a cell's score is itself the mean over its "
              "evaluation seeds (`rougeL_mean`). **Bold** = best objective at that τ (highest mean). "
              "FKL − RKL is paired by training seed: mean ± std of the per-seed differences, n = pairs; "
              "a difference is 'beyond the spread' when its |mean| exceeds that std.", ""]
    taus = summary.taus
    head = "| objective | " + " | ".join(f"τ={_fmt_value(t)}" for t in taus) + " |"
    rule = "|---|" + "---|" * len(taus)
    for bench in summary.benchmarks:
        lines += [f"## {bench}", "", head, rule]
        best = {t: summary.best(bench, t) for t in taus}
        for o in summary.rows:
            row = []
            for t in taus:
                s = summary.get(bench, o, t)
                if s is None or not s.n:
                    row.append("–")
                    continue
                txt = f"{_pm(s)} (n={s.n})"
                row.append(f"**{txt}**" if o in best[t] else txt)
            lines.append(f"| {o.label} | " + " | ".join(row) + " |")
        pairs = summary.fkl_rkl_pairs()
        for f, r in pairs:
            row = []
            for t in taus:
                d = summary.difference(bench, f, r, t)
                row.append("–" if not d.n else f"{_pm(d, signed=True)} (n={d.n})")
            name = "FKL − RKL" + (f" ({', '.join(f'{k}={_fmt_value(v)}' for k, v in f.params + f.context)})"
                                  if f.params or f.context else "")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
        for f, r in pairs:
            lines.append(describe(summary, bench, f, r))
        if not pairs:
            lines.append("FKL and RKL were not both run, so there is no FKL − RKL comparison.")
        lines.append("")
    if not summary.benchmarks:
        lines += ["No completed cell yet, so there are no scores.", ""]
    lines += render_problems(cells)
    return "\n".join(lines).rstrip() + "\n"


def render_problems(cells: list[Cell]) -> list[str]:
    """Markdown list of every cell that is not a usable completed result."""
    bad = [c for c in cells if c.status != FINISHED]
    if not bad:
        return ["## Unfinished cells", "", "None: every cell completed.", ""]
    lines = ["## Unfinished cells", "", "Not in the tables above:", "",
             "| cell | status | step | updated | error / note |", "|---|---|---|---|---|"]
    for c in sorted(bad, key=lambda c: (PROBLEM_STATUSES.index(c.status), c.dir)):
        step = (c.metrics or {}).get("train", {}).get("steps", "")
        err = (c.error or "").strip().splitlines()
        note = (err[-1] if err else "").replace("|", "\\|")[:200]   # last line of a traceback says most
        updated = (c.metrics or {}).get("updated_at", "")
        lines.append(f"| {c.dir} | {c.status} | {step} | {updated} | {note} |")
    return lines + [""]


def render_csv(summary: Summary) -> str:
    """Long-form CSV: benchmark, row, divergence, tau, mean, std, n, seeds, best."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["benchmark", "row", "divergence", "tau", "rougeL_mean", "rougeL_std", "n", "seeds", "best"])
    num = lambda x: "" if math.isnan(x) else f"{x:.4f}"
    for bench in summary.benchmarks:
        for t in summary.taus:
            best = summary.best(bench, t)
            for o in summary.rows:
                s = summary.get(bench, o, t)
                if s and s.n:
                    w.writerow([bench, o.label, o.divergence, _fmt_value(t), num(s.mean), num(s.std), s.n,
                                " ".join(map(str, s.by_seed)), int(o in best)])
            for f, r in summary.fkl_rkl_pairs():
                d = summary.difference(bench, f, r, t)
                if d.n:
                    label = "fkl-rkl" + f.label[len("fkl"):]
                    w.writerow([bench, label, "", _fmt_value(t), num(d.mean), num(d.std), d.n,
                                " ".join(map(str, d.by_seed)), ""])
    return buf.getvalue()


def render_png(summary: Summary, sweep: str, path: Path, refs: Sequence[Reference] = ()) -> None:
    """ROUGE-L vs tau, one panel per benchmark, one line (± std) per objective, references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = summary.benchmarks or ["(no completed cells)"]
    ncol = min(3, len(benches))
    nrow = math.ceil(len(benches) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 4.0 * nrow + 0.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    rows = summary.rows
    # small multiplicative offset per line so error bars at the same tau do not hide each other
    offsets = {o: 2 ** (0.035 * (i - (len(rows) - 1) / 2)) for i, o in enumerate(rows)}
    markers = "osD^v<>ph*"
    for ax, bench in zip(axes.flat, benches):
        for i, o in enumerate(rows):
            pts = [(t, s) for t in summary.taus if (s := summary.get(bench, o, t)) and s.n]
            if not pts:
                continue
            # a fixed colour per divergence across reports (fkl blue, rkl orange, ...), sft last
            colours = DIVERGENCE_ORDER[1:] + DIVERGENCE_ORDER[:1]
            ci = colours.index(o.divergence) if o.divergence in colours else i
            xs = [t * offsets[o] for t, _ in pts]
            ys = [s.mean for _, s in pts]
            es = [0.0 if math.isnan(s.std) else s.std for _, s in pts]
            ax.errorbar(xs, ys, yerr=es, label=o.label, color=cmap(ci % 10), marker=markers[i % len(markers)],
                        markersize=5, linewidth=1.8, capsize=3, elinewidth=1.1)
        for k, ref in enumerate(refs):
            if bench in ref.scores:
                ax.axhline(ref.scores[bench], color=("0.25", "0.55", "0.7")[k % 3], linestyle=("--", ":", "-.")[k % 3],
                           linewidth=1.3, label=ref.label, zorder=1)
        ax.set_xscale("log", base=2)
        if summary.taus:
            ax.set_xticks(summary.taus)
            ax.set_xticklabels([_fmt_value(t) for t in summary.taus])
            ax.minorticks_off()
        else:
            ax.text(0.5, 0.5, "no completed cells", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(bench, fontsize=12)
        ax.set_xlabel("distillation temperature τ (log₂ scale)")
        ax.set_ylabel("ROUGE-L F1 x 100")
        ax.grid(True, which="major", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(benches):]:
        ax.set_visible(False)
    legend = {}   # label -> handle, over every panel (a reference may miss the first benchmark)
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    labels, handles = list(legend), list(legend.values())
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"ROUGE-L vs distillation temperature — sweep '{sweep}'\n"
                 "mean over training seeds, error bars ± 1 std", fontsize=12)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 0.98))
    with _atomic(path, "wb") as f:
        fig.savefig(f, format="png", dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- I/O edges

class _atomic:
    """Write to a temp file in the same dir, then os.replace it into place."""

    def __init__(self, path: Path, mode: str = "w"):
        self.path, self.mode = Path(path), mode

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8", "newline": ""}))
        return self.f

    def __exit__(self, exc_type, *_):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def write_report(cells: list[Cell], out_dir: str | os.PathLike, sweep: str | None = None) -> dict[str, Path]:
    """Write report.md/.csv/.png for these cells into out_dir; return the paths."""
    out = Path(out_dir)
    if sweep is None:   # the sweep name the cells recorded, else the dir's name
        names = {c.metrics.get("sweep") for c in cells if c.metrics and c.metrics.get("sweep")}
        sweep = names.pop() if len(names) == 1 else out.resolve().name
    summary = summarize(cells)
    refs = references(cells, out)
    paths = {name: out / name for name in REPORT_FILES}
    with _atomic(paths["report.md"]) as f:
        f.write(render_markdown(summary, sweep))
    with _atomic(paths["report.csv"]) as f:
        f.write(render_csv(summary))
    render_png(summary, sweep, paths["report.png"], refs)
    from distill.dashboard import render_html   # plotly only when a report is due

    with _atomic(paths["report.html"]) as f:
        f.write(render_html(summary, sweep, refs, out))
    return paths


def build_report(sweep_dir: str | os.PathLike) -> dict[str, Path]:
    """Read a sweep dir's cells and write its report into it. ValueError if there is nothing to read."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ValueError(f"sweep dir '{root}' does not exist or is not a directory")
    cells = scan_sweep(root)
    if not cells:
        raise ValueError(f"no cells under '{root}' (expected <name>-<8-hex>/ dirs or */metrics.json)")
    return write_report(cells, root)


# ----------------------------------------------------------------------------- W&B

_WANDB_STATUS = {"finished": "completed", "running": "running", "crashed": "failed", "failed": "failed",
                 "killed": "failed", "preempted": "running", "pending": "running"}


# W&B summary name (distill.tracking) -> metrics.json name, per benchmark
_WANDB_EVAL_KEYS = {"rougeL": "rougeL_mean", "rougeL_std": "rougeL_std", "exact_match": "exact_match_mean"}


def record_from_wandb(run_id: str, state: str, config: dict, summary: dict) -> Cell:
    """Rebuild a Cell from a W&B run's config and summary, as `distill.tracking` logs them.

    Config: the resolved Hydra config, nested (tau, seed, divergence.name and its params,
    loss.kd_ratio, ..., model.name, data.name). Summary, one slash scheme: the final
    `eval/<benchmark>/rougeL` (+ `rougeL_std`, `exact_match`) and `valid/<ce|fkl|rkl>`.
    """
    div = dict(config.get("divergence") or {})
    loss = config.get("loss") or {}
    kd_ratio = loss.get("kd_ratio", 1.0)
    cell = {"divergence": div.pop("name", None) if kd_ratio else "sft", "divergence_params": div,
            "tau": config.get("tau"), "seed": config.get("seed"), "tau_target": loss.get("tau_target"),
            "tau_squared": loss.get("tau_squared"), "kd_ratio": kd_ratio,
            "model": (config.get("model") or {}).get("name"), "dataset": (config.get("data") or {}).get("name")}
    evals: dict[str, dict] = {}
    valid: dict[str, float] = {}
    for k, v in summary.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue   # tables (eval/<b>/generations), images, ...
        parts = str(k).split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in _WANDB_EVAL_KEYS:
            evals.setdefault(parts[1], {})[_WANDB_EVAL_KEYS[parts[2]]] = v
        elif len(parts) == 2 and parts[0] == "valid":
            valid[parts[1]] = v
    status = _WANDB_STATUS.get(state, "failed")
    if status == FINISHED and not evals:
        return Cell(run_id, "unreadable", None, "finished W&B run without eval/<benchmark>/rougeL in its summary")
    if cell["divergence"] is None or cell["tau"] is None or cell["seed"] is None:
        return Cell(run_id, "unreadable", None, "W&B run config lacks divergence.name/tau/seed")
    metrics = {"schema_version": SCHEMA_VERSION, "status": status, "name": run_id, "cell": cell,
               "valid": valid, "eval": {b: e for b, e in evals.items() if "rougeL_mean" in e},
               "updated_at": str(summary.get("_timestamp", ""))}
    return Cell(run_id, status, metrics, None if status != "failed" else f"W&B run state '{state}'")


def records_from_wandb(path: str, group: str, api: Any = None) -> list[Cell]:
    """Cells of one sweep (a W&B group) from the W&B API; needs network and a logged-in key."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise ValueError(f"--wandb expects ENTITY/PROJECT, got '{path}'")
    if api is None:
        import wandb

        api = wandb.Api(timeout=30)
    runs = api.runs(path, filters={"group": group})
    # the sweep's summary run (job_type sweep-report) holds the report, not a cell
    cells = [record_from_wandb(r.id, r.state, dict(r.config), dict(r.summary)) for r in runs
             if getattr(r, "job_type", None) != SUMMARY_JOB_TYPE]
    return dedupe(cells)


# ----------------------------------------------------------------------------- CLI

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


if __name__ == "__main__":
    sys.exit(main())
