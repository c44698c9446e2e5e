"""Sweep report: a sweep dir of cells -> report.md, report.csv, report.png and report.html.

`distill-report SWEEP_DIR` reads every `<cell>/metrics.json` (schema_version 1, written by
`distill-train`) and writes, atomically, into SWEEP_DIR:

- report.md   per benchmark: objective x tau table of ROUGE-L mean ± std over training seeds,
              best objective per tau in bold, FKL - RKL per tau with its 95% CI, one sentence
              saying what the numbers say, every paired comparison (FKL - RKL, best - second,
              each objective - SFT) with CI, verdict and seeds needed, a sentence on which
              source of variance dominates, and every unfinished / failed / missing cell with
              its error (nothing is dropped silently).
- report.csv  the same numbers in long form (one row per benchmark x tau x objective or comparison).
- report.png  ROUGE-L vs tau (log2 axis), one line per objective with ± 1 std error bars, SFT as
              a level with a band, the teacher and the SFT warm start as reference levels
              (`references`), one panel per benchmark.
- report.html the same as an offline interactive dashboard with per-cell drill-down
              (distill.dashboard).

Statistics (stated in report.md too; the math lives in distill.stats): a cell's score on a
benchmark is its `rougeL_mean`, the mean over its *evaluation* seeds. An entry is the mean of
those scores over the cell's *training* seeds, ± their sample std (ddof=1; "–" with one seed).
Comparisons are paired by training seed: mean per-seed difference, 95% t interval (n-1 df),
bootstrap interval when n >= 5, a verdict naming the test, and for unresolved ones the training
seeds a paired t-test would need for 80% power at the observed difference and spread.

With `--wandb ENTITY/PROJECT --group SWEEP` the same fields come from the W&B API instead
of the files (see `records_from_wandb`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from distill.options import OBJECTIVE_ORDER, SFT
from distill.report import statistics as stats
from distill.cell.results import SCHEMA_VERSION
from distill.files import atomic_write_bytes, atomic_write_text
from distill.cell.identity import cell_identity
FINISHED = "completed"
# status of a cell as the report sees it: the three metrics.json states plus what the
# report itself can find wrong with a cell dir.
PROBLEM_STATUSES = ("running", "stale", "interrupted", "failed", "missing", "unreadable", "superseded")
RECORDED_STATUSES = ("running", "completed", "failed", "interrupted")  # what distill-train writes
CELL_DIR_RE = re.compile(r"^.+-[0-9a-f]{8}$")  # <name>-<8-hex signature>
# canonical order (and colour) of the objectives, as in the paper's tables
# cell fields that mean nothing for an SFT cell (never part of its row label)
SFT_MOOT_KEYS = ("kd_ratio", "teacher", "tau_target", "tau_squared")
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
        """The cell description without per-cell identifiers (signature); cells written before rollouts
        existed trained on the references: their rollout is 'offline'."""
        cell = {k: v for k, v in (self.metrics or {}).get("cell", {}).items() if k not in IDENTITY_KEYS}
        return {**cell, "rollout": cell.get("rollout") or "offline"} if cell else cell


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
    if m.get("status") not in RECORDED_STATUSES:
        raise ValueError(f"{source}: status {m.get('status')!r}, expected {'|'.join(RECORDED_STATUSES)}")
    cell = m.get("cell")
    if not isinstance(cell, dict) or not {"divergence", "tau", "seed"} <= cell.keys():
        raise ValueError(f"{source}: 'cell' must hold at least divergence, tau and seed")
    if m["status"] == FINISHED and not isinstance(m.get("eval"), dict):
        raise ValueError(f"{source}: completed cell without an 'eval' object")
    return m


def scan_sweep(sweep_dir: str | os.PathLike) -> list[Cell]:
    """Find the cells of a sweep dir: subdirs named `<name>-<8hex>` or holding a metrics.json.

    Hidden dirs (.hydra-jobs, .submitit) are not cells. A cell dir without metrics.json is
    'missing'; one whose metrics.json cannot be parsed is 'unreadable'; a 'running' one whose cell
    lock has no live holder (a SIGKILLed job, a dead node: distill.locks) is 'stale'.
    """
    from distill.cell.lock import liveness

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
        dead = liveness(d) if m["status"] == "running" else None
        cells.append(Cell(d.name, "stale", m, f"not running: {dead}") if dead else Cell(d.name, m["status"], m, m.get("error")))
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

    label: str                  # "teacher" or "SFT warm start" (+ the cell dir when there are several)
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
        label = "teacher" if role == "teacher" else "SFT warm start"
        if sum(r == role for r, _ in found) > 1:
            label += f" ({run_dir.name})"
        out.append(Reference(label, str(run_dir), scores))
    return out


# ----------------------------------------------------------------------------- statistics

@dataclass
class Stat:
    """Scores of one (benchmark, objective, tau) entry, one per training seed.

    `eval_by_seed[s]` holds training seed s's scores per evaluation seed (`rougeL_per_seed`), whose
    mean is `by_seed[s]`; empty for differences and for cells that did not record them.
    """

    by_seed: dict[int, float] = field(default_factory=dict)
    eval_by_seed: dict[int, list[float]] = field(default_factory=dict)

    @property
    def variance(self) -> stats.VarianceSplit:
        """Training-seed spread next to eval-seed spread (see distill.stats.variance_split)."""
        return stats.variance_split([self.eval_by_seed.get(s) or [v] for s, v in self.by_seed.items()])

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
        order = OBJECTIVE_ORDER.index(self.divergence) if self.divergence in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        return (repr(self.context), order, self.divergence, repr(self.params))


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def objectives(cells: Iterable[Cell]) -> dict[str, Objective]:
    """Map each completed cell dir to its Objective (row label).

    Only fields that take more than one value across the completed cells show up in the
    label, so a plain divergence x tau x seed sweep has rows 'fkl', 'rkl', ... SFT cells
    (kd_ratio=0, divergence 'sft') and distilled cells are looked at apart: that an SFT cell has
    kd_ratio 0 and no teacher is what makes it SFT, not a field that varies in the sweep.
    """
    done = [c for c in cells if c.status == FINISHED]
    skip = {"divergence", "divergence_params", "tau", "seed"}

    def varying(group: list[Cell], ignore: Iterable[str] = ()) -> list[str]:
        # a field varies if it takes two values across the cells that record it: a field that newer
        # code added (e.g. max_steps) does not split a sweep whose older cells lack it
        keys = sorted({k for c in group for k in c.label_source} - skip - set(ignore))
        return [k for k in keys
                if len({json.dumps(c.label_source[k], sort_keys=True) for c in group if k in c.label_source}) > 1]

    sft = [c for c in done if c.label_source["divergence"] == SFT]
    distilled = [c for c in done if c.label_source["divergence"] != SFT]
    ctx_keys = {SFT: varying(sft, SFT_MOOT_KEYS), "distilled": varying(distilled)}
    params_seen: dict[tuple[str, str], set[str]] = {}
    for c in done:
        div = c.label_source["divergence"]
        for k, v in (c.label_source.get("divergence_params") or {}).items():
            params_seen.setdefault((div, k), set()).add(json.dumps(v, sort_keys=True))
    out = {}
    for c in done:
        src = c.label_source
        div = src["divergence"]
        params = () if div == SFT else tuple(sorted((k, v) for k, v in (src.get("divergence_params") or {}).items()
                                                   if len(params_seen[(div, k)]) > 1))
        context = tuple((k, src.get(k)) for k in ctx_keys[SFT if div == SFT else "distilled"])
        out[c.dir] = Objective(div, params, context)
    return out


@dataclass(frozen=True)
class Comparison:
    """One paired comparison the report makes: a - b at one tau on one benchmark."""

    kind: str              # 'fkl-rkl' | 'best-second' | 'vs-sft'
    bench: str
    tau: float
    a: Objective
    b: Objective
    diff: Stat             # per training seed a - b
    test: stats.PairedTest

    @property
    def name(self) -> str:
        """'fkl − rkl'; the row label of report.csv uses `csv_row`."""
        return f"{self.a.label} − {self.b.label}"

    @property
    def csv_row(self) -> str:
        if self.kind == "fkl-rkl":   # the historical label, e.g. 'fkl-rkl (model=x)'
            return "fkl-rkl" + self.a.label[len("fkl"):]
        if self.kind == "best-second":
            return f"best-second ({self.a.label} - {self.b.label})"
        return f"{self.a.label} - {self.b.label}"

    @property
    def verdict(self) -> str:
        return stats.verdict(self.test, self.a.label, self.b.label)


COMPARISON_KINDS = {"fkl-rkl": "FKL − RKL", "best-second": "best − second", "vs-sft": "objective − SFT"}


@dataclass
class Summary:
    """Everything the report shows, computed from the cells (no I/O)."""

    benchmarks: list[str]
    taus: list[float]
    rows: list[Objective]
    stats: dict[tuple[str, Objective, float], Stat]   # (benchmark, objective, tau) -> Stat
    cells: list[Cell]
    _comparisons: dict[str, list[Comparison]] = field(default_factory=dict, repr=False)

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

    def baseline(self, obj: Objective) -> Objective | None:
        """The SFT row `obj` is compared with: the one whose varying fields `obj`'s cells share.

        With one SFT row (the usual case) that row; None when there is none or no unique match.
        """
        if obj.divergence == SFT:
            return None
        sft_rows = [o for o in self.rows if o.divergence == SFT]
        if len(sft_rows) <= 1:
            return sft_rows[0] if sft_rows else None
        objs = objectives(self.cells)
        srcs = [c.label_source for c in self.cells if c.dir in objs and objs[c.dir] == obj]
        match = [r for r in sft_rows if all(all(src.get(k) == v for k, v in r.context) for src in srcs)]
        return match[0] if len(match) == 1 else None

    def difference(self, bench: str, a: Objective, b: Objective, tau: float) -> Stat:
        """a - b per training seed present in both (paired); empty Stat if none."""
        sa, sb = self.get(bench, a, tau), self.get(bench, b, tau)
        if sa is None or sb is None:
            return Stat()
        return Stat({s: sa.by_seed[s] - sb.by_seed[s] for s in sorted(sa.by_seed.keys() & sb.by_seed.keys())})

    def compare(self, kind: str, bench: str, a: Objective, b: Objective, tau: float) -> Comparison:
        """The paired comparison a - b (per-seed differences, t test, bootstrap, seeds needed)."""
        d = self.difference(bench, a, b, tau)
        return Comparison(kind, bench, tau, a, b, d, stats.paired_test(list(d.by_seed.values())))

    def comparisons(self, bench: str) -> list[Comparison]:
        """Every paired comparison the report makes on `bench`, in report order (computed once).

        Per tau: FKL - RKL (each matching pair of rows), best - second (the two highest means; SFT
        counts as a row), and every distilled objective - its SFT baseline. Only comparisons with at
        least one paired seed.
        """
        if bench not in self._comparisons:
            out = []
            for t in self.taus:
                for f, r in self.fkl_rkl_pairs():
                    out.append(self.compare("fkl-rkl", bench, f, r, t))
                ranked = sorted(((s.mean, i, o) for i, o in enumerate(self.rows)
                                 if (s := self.get(bench, o, t)) and s.n), key=lambda e: (-e[0], e[1]))
                if len(ranked) >= 2:
                    out.append(self.compare("best-second", bench, ranked[0][2], ranked[1][2], t))
                for o in self.rows:
                    if (base := self.baseline(o)) is not None:
                        out.append(self.compare("vs-sft", bench, o, base, t))
            self._comparisons[bench] = [c for c in out if c.diff.n]
        return self._comparisons[bench]


def summarize(cells: list[Cell]) -> Summary:
    """Group completed cells into (benchmark, objective, tau) entries over training seeds.

    An SFT row run at a single tau (tau does not apply to it) fills every tau column, so each
    distilled objective can be compared with it at each tau, paired by training seed.
    """
    objs = objectives(cells)
    entries: dict[tuple[str, Objective, float], Stat] = {}
    benchmarks: list[str] = []
    for c in cells:
        if c.status != FINISHED:
            continue
        tau, seed = float(c.label_source["tau"]), int(c.label_source["seed"])
        for bench, ev in c.metrics["eval"].items():
            if bench not in benchmarks:
                benchmarks.append(bench)
            st = entries.setdefault((bench, objs[c.dir], tau), Stat())
            st.by_seed[seed] = float(ev["rougeL_mean"])
            per_eval_seed = ev.get("rougeL_per_seed")
            if isinstance(per_eval_seed, list) and per_eval_seed:
                st.eval_by_seed[seed] = [float(x) for x in per_eval_seed]
    rows = sorted(set(objs.values()), key=Objective.sort_key)
    distilled_taus = sorted({k[2] for k in entries if k[1].divergence != SFT})
    for o in rows:
        sft_taus = {k[2] for k in entries if k[1] == o} if o.divergence == SFT else set()
        if len(sft_taus) == 1 and distilled_taus:
            (own,) = sft_taus
            for bench in benchmarks:
                if (st := entries.get((bench, o, own))) is not None:
                    for t in distilled_taus:
                        entries[(bench, o, t)] = st
            if own not in distilled_taus:
                for bench in benchmarks:
                    entries.pop((bench, o, own), None)
    taus = sorted({k[2] for k in entries})
    return Summary(benchmarks, taus, rows, entries, cells)


# ----------------------------------------------------------------------------- words

def _pm(s: Stat, signed: bool = False) -> str:
    """'41.0 ± 1.4' ('41.0' with one seed, no spread; '–' with none)."""
    if not s.n:
        return "–"
    mean = _signed(s.mean) if signed else f"{s.mean:.1f}"
    return mean if math.isnan(s.std) else f"{mean} ± {s.std:.1f}"


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def _ci(t: stats.PairedTest, boot: bool = False) -> str:
    """'[-10.1, -3.5]': the t interval (or the bootstrap one); '–' when there is none."""
    lo, hi = (t.boot_low, t.boot_high) if boot else (t.ci_low, t.ci_high)
    return "–" if math.isnan(lo) else f"[{_signed(lo)}, {_signed(hi)}]"


def _diff_words(t: stats.PairedTest) -> str:
    """'-6.8, 95% CI [-10.1, -3.5], excludes 0 (paired t, n=3)' or the unresolved form with seeds needed."""
    if t.n < 2 or t.sd == 0.0:
        return f"{_signed(t.mean)}, {stats.verdict(t, 'a', 'b')}"
    head = f"{_signed(t.mean)}, 95% CI {_ci(t)}"
    if t.resolved:
        return f"{head}, excludes 0 ({stats.T_TEST}, n={t.n})"
    need = stats.seeds_phrase(t)
    return f"{head}, not resolved with {t.n} seeds ({stats.T_TEST})" + (f"; power: {need}" if need else "")


def describe(summary: Summary, bench: str, fkl: Objective, rkl: Objective) -> str:
    """One sentence on FKL vs RKL for a benchmark: who leads at tau=1, does FKL overtake later.

    Leads and overtakes are about the means; each difference carries its paired-t CI and verdict.
    """
    taus = [t for t in summary.taus if summary.difference(bench, fkl, rkl, t).n]
    if not taus:
        return f"No training seed has both {fkl.label} and {rkl.label} completed on {bench}, so they cannot be compared."
    tests = {t: summary.compare("fkl-rkl", bench, fkl, rkl, t).test for t in taus}
    ref = 1.0 if 1.0 in taus else taus[0]
    d = tests[ref]
    at = f"τ={_fmt_value(ref)}" + ("" if ref == 1.0 else " (the lowest τ with both; τ=1 was not run)")
    lead = round(d.mean, 1)   # what the table shows: a 0.0 difference is a tie
    if lead < 0:
        first = f"At {at} RKL leads FKL by {-d.mean:.1f} ROUGE-L on the mean (FKL − RKL = {_diff_words(d)})"
    elif lead > 0:
        first = f"At {at} RKL does not lead: FKL is ahead by {d.mean:.1f} ROUGE-L on the mean (FKL − RKL = {_diff_words(d)})"
    else:
        first = f"At {at} FKL and RKL tie (FKL − RKL = {_diff_words(d)})"
    higher = [t for t in taus if t > ref]
    if not higher:
        return first + "; no higher τ was run with both."
    listing = lambda ts: ", ".join(f"τ={_fmt_value(t)} ({_diff_words(tests[t])})" for t in ts)
    ahead = [t for t in higher if round(tests[t].mean, 1) > 0]
    rest = [t for t in higher if t not in ahead]
    if lead > 0:
        tail = f"; at higher τ FKL − RKL is {listing(higher)}"
    elif ahead:
        tail = f"; FKL's mean overtakes RKL's at {listing(ahead)}" + (f", but not at {listing(rest)}" if rest else "")
    else:
        tail = f"; FKL's mean does not overtake RKL's at any higher τ: {listing(higher)}"
    return first + tail + "."


def describe_variance(summary: Summary, bench: str) -> str:
    """A sentence on which source of variance dominates the entries of `bench` (see stats.variance_split)."""
    seen, splits = set(), []
    for o in summary.rows:
        for t in summary.taus:
            s = summary.get(bench, o, t)
            if s is None or id(s) in seen:   # the SFT row is the same entry in every tau column
                continue
            seen.add(id(s))
            v = s.variance
            if v.n_train >= 2 and v.n_eval >= 2 and math.isfinite(v.eval_share):
                splits.append(v)
    if not splits:
        return ("Variance: the two sources cannot be told apart here (it needs ≥ 2 training seeds and ≥ 2 "
                "eval seeds per entry, with per-eval-seed scores in metrics.json).")
    med = lambda xs: float(np.median(xs))
    share = med([v.eval_share for v in splits])
    k = med([v.n_eval for v in splits])
    eval_std, train_std = med([v.eval_std for v in splits]), med([v.train_std for v in splits])
    who = stats.dominant_source(share)
    agree = sum(v.dominant == who for v in splits)
    what = (f"over the {len(splits)} entries with ≥ 2 training and ≥ 2 eval seeds, the median spread over "
            f"training seeds is {train_std:.2f} (std of the cell scores) and over eval seeds {eval_std:.2f} "
            f"(pooled std within a training seed, {k:g} eval seeds, so ± {eval_std / math.sqrt(k):.2f} on a cell's "
            f"score): eval sampling explains a median {share:.0%} of the variance between training seeds"
            + (" (100%: eval sampling alone predicts as much variation between training seeds as was seen, or more)"
               if share >= 1.0 else ""))
    if who == "training seeds":
        verdict = (f"**training seeds dominate** ({agree} of {len(splits)} entries taken one by one): more training seeds, not "
                   "more eval seeds, would narrow the comparisons")
    elif who == "eval sampling":
        verdict = (f"**eval sampling dominates** ({agree} of {len(splits)} entries taken one by one): more eval seeds or examples "
                   "would narrow the comparisons as much as more training seeds")
    else:
        verdict = (f"neither source dominates (each within 3x of the other; {agree} of {len(splits)} entries "
                   "taken one by one)")
    return f"Variance: {what}; {verdict}."


# ----------------------------------------------------------------------------- rendering

def render_markdown(summary: Summary, sweep: str) -> str:
    """The report as markdown."""
    cells = summary.cells
    counts = {s: sum(c.status == s for c in cells) for s in (FINISHED,) + PROBLEM_STATUSES}
    lines = [f"# Sweep report: {sweep}", ""]
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    n_comp = sum(len(summary.comparisons(b)) for b in summary.benchmarks)
    has_sft = any(o.divergence == SFT for o in summary.rows)
    lines += ["", "Each entry is ROUGE-L (F1 x 100) **mean ± std over training seeds** (sample std, ddof=1; "
              "no ± with one seed) with the number of seeds n; a cell's score is itself the mean over its "
              "evaluation seeds (`rougeL_mean`). **Bold** = best objective at that τ (highest mean)."
              + (" `sft` = the cells trained with cross-entropy only (kd_ratio=0, no teacher): τ does not apply "
                 "to them, so the same cells fill every τ column." if has_sft else ""), "",
              "Comparisons are **paired by training seed**: the mean of the per-seed differences a − b with its "
              f"**95% CI from the t distribution with n − 1 df** (`scipy.stats.ttest_rel`), a paired bootstrap CI "
              f"beside it when n ≥ {stats.BOOTSTRAP_MIN_N} (`scipy.stats.bootstrap`, BCa, resampling seeds), and "
              "a verdict naming the test: resolved when the t interval excludes 0. For an unresolved comparison, "
              f"*seeds for {stats.POWER:.0%} power* is a standard power calculation (two-sided paired t-test, "
              f"α = {stats.ALPHA:g}, power from the noncentral t, `scipy.stats.nct`): roughly how many training "
              "seeds would resolve a true difference of the observed size at the observed spread; with few seeds "
              "the spread is itself uncertain, so read it as an order of magnitude. Each interval is for its own "
              f"comparison, not corrected for the {n_comp} comparisons in this report (at 95%, about 1 in 20 "
              "would exclude 0 by chance if nothing differed).", ""]
    taus = summary.taus
    head = "| objective | " + " | ".join(f"τ={_fmt_value(t)}" for t in taus) + " |"
    rule = "|---|" + "---|" * len(taus)
    any_boot = any(c.test.has_bootstrap for b in summary.benchmarks for c in summary.comparisons(b))
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
                c = summary.compare("fkl-rkl", bench, f, r, t)
                row.append("–" if not c.diff.n else
                           f"{_signed(c.test.mean)}" + (f" {_ci(c.test)}" if math.isfinite(c.test.ci_low) else "")
                           + f" (n={c.diff.n})")
            name = "FKL − RKL" + (f" ({', '.join(f'{k}={_fmt_value(v)}' for k, v in f.params + f.context)})"
                                  if f.params or f.context else "") + " [95% CI]"
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
        for f, r in pairs:
            lines.append(describe(summary, bench, f, r))
        if not pairs:
            lines.append("FKL and RKL were not both run, so there is no FKL − RKL comparison.")
        lines.append("")
        lines += render_comparisons(summary.comparisons(bench), any_boot)
        lines += [describe_variance(summary, bench), ""]
    if not summary.benchmarks:
        lines += ["No completed cell yet, so there are no scores.", ""]
    lines += render_attempts(cells)
    lines += render_problems(cells)
    return "\n".join(lines).rstrip() + "\n"


def render_comparisons(comps: list[Comparison], bootstrap_column: bool) -> list[str]:
    """Markdown table of a benchmark's paired comparisons."""
    if not comps:
        return []
    power = f"seeds for {stats.POWER:.0%} power"
    head = ["τ", "comparison", "mean a − b", "95% CI (paired t)"] + (["95% CI (bootstrap)"] if bootstrap_column else [])
    lines = ["Paired comparisons:", "", "| " + " | ".join(head + ["verdict", power]) + " |",
             "|" + "---|" * (len(head) + 2)]
    # a best - second pair that is also an FKL - RKL or objective - SFT pair is one row with both names
    pair = lambda c: (c.tau, frozenset((c.a, c.b)))
    also_best = {pair(c) for c in comps if c.kind == "best-second"}
    shown = {pair(c) for c in comps if c.kind != "best-second"}
    for c in comps:
        if c.kind == "best-second" and pair(c) in shown:
            continue
        kind = COMPARISON_KINDS[c.kind] + ("; best − second" if c.kind != "best-second" and pair(c) in also_best else "")
        cols = [f"τ={_fmt_value(c.tau)}", f"{c.name} ({kind})", _signed(c.test.mean), _ci(c.test)]
        if bootstrap_column:
            cols.append(_ci(c.test, boot=True) if c.test.has_bootstrap else f"– (n < {stats.BOOTSTRAP_MIN_N})")
        cols += [c.verdict, stats.seeds_phrase(c.test) or "–"]
        lines.append("| " + " | ".join(cols) + " |")
    if not bootstrap_column:
        lines += ["", f"(No bootstrap column: every comparison has fewer than {stats.BOOTSTRAP_MIN_N} paired seeds.)"]
    return lines + [""]


def render_problems(cells: list[Cell]) -> list[str]:
    """Markdown list of every cell that is not a usable completed result."""
    bad = [c for c in cells if c.status != FINISHED]
    if not bad:
        return ["## Unfinished cells", "", "None: every cell completed.", ""]
    lines = ["## Unfinished cells", "", "Not in the tables above:", "",
             "| cell | status | step | attempts | updated | error / note |", "|---|---|---|---|---|---|"]
    for c in sorted(bad, key=lambda c: (PROBLEM_STATUSES.index(c.status), c.dir)):
        m = c.metrics or {}
        last = (m.get("attempts") or [{}])[-1]
        step = m.get("train", {}).get("steps", last.get("end_step", last.get("start_step", "")))
        err = (c.error or "").strip().splitlines()
        note = (err[-1] if err else "").replace("|", "\\|")[:200]   # last line of a traceback says most
        lines.append(f"| {c.dir} | {c.status} | {step} | {attempts(c) or ''} | {m.get('updated_at', '')} | {note} |")
    return lines + [""]


def attempts(cell: Cell) -> int:
    """How many attempts (first run + resumes after a preemption, a kill or a failure) a cell took; 0 = unknown."""
    return len((cell.metrics or {}).get("attempts") or [])


def render_attempts(cells: list[Cell]) -> list[str]:
    """One line naming the completed cells that took more than one attempt (the rest took one)."""
    done = [c for c in cells if c.status == FINISHED and attempts(c)]
    resumed = sorted((c for c in done if attempts(c) > 1), key=lambda c: c.dir)
    if not done:
        return []
    listed = ", ".join(f"{c.dir} ({attempts(c)})" for c in resumed) or "none"
    return [f"Attempts: {len(done) - len(resumed)} completed cells took one attempt; more than one: {listed}.", ""]


CSV_COLUMNS = ["benchmark", "row", "divergence", "tau", "rougeL_mean", "rougeL_std", "n", "seeds", "best",
               "eval_seed_std", "n_eval_seeds", "eval_share", "comparison", "ci_low", "ci_high", "boot_low",
               "boot_high", "p_value", "test", "verdict", "seeds_needed"]


def render_csv(summary: Summary) -> str:
    """Long-form CSV, one row per benchmark x tau x (objective | comparison).

    Objective rows: rougeL_mean/rougeL_std/n over training seeds (rougeL_std is the training-seed
    spread), eval_seed_std (pooled std over eval seeds), n_eval_seeds and eval_share (the share of
    the between-training-seed variance that eval sampling explains). Comparison rows (`comparison`
    = fkl-rkl | best-second | vs-sft): rougeL_mean/rougeL_std/n of the per-seed differences,
    the paired-t CI (ci_low, ci_high), the bootstrap CI (n >= 5), p_value, test, verdict and
    seeds_needed (unresolved only; > MAX_SEEDS written as '>1000').
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    num = lambda x: "" if x is None or not math.isfinite(x) else f"{x:.4f}"
    for bench in summary.benchmarks:
        comps = summary.comparisons(bench)
        for t in summary.taus:
            best = summary.best(bench, t)
            for o in summary.rows:
                s = summary.get(bench, o, t)
                if s and s.n:
                    v = s.variance
                    w.writerow([bench, o.label, o.divergence, _fmt_value(t), num(s.mean), num(s.std), s.n,
                                " ".join(map(str, s.by_seed)), int(o in best), num(v.eval_std),
                                num(v.n_eval), num(v.eval_share)] + [""] * 9)
            for c in comps:
                if c.tau != t:
                    continue
                pt = c.test
                need = pt.seeds_needed
                need_txt = "" if need is None or pt.resolved else (f">{stats.MAX_SEEDS}" if need > stats.MAX_SEEDS else need)
                w.writerow([bench, c.csv_row, "", _fmt_value(t), num(pt.mean), num(pt.sd), pt.n,
                            " ".join(map(str, c.diff.by_seed)), "", "", "", "", c.kind, num(pt.ci_low),
                            num(pt.ci_high), num(pt.boot_low), num(pt.boot_high), num(pt.p_value), pt.test,
                            c.verdict, need_txt])
    return buf.getvalue()


def plot_caption(summary: Summary, sweep: str) -> str:
    """The plot's title: what the points and the error bars are."""
    ns = sorted({s.n for s in summary.stats.values() if s.n})
    n_txt = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]}" if ns else "n = 0"
    return (f"ROUGE-L vs distillation temperature — sweep '{sweep}'\n"
            f"points: mean over training seeds ({n_txt})\n"
            "error bars, SFT band: ± 1 sample std over training seeds (not a CI)")


def render_png(summary: Summary, sweep: str, path: Path, refs: Sequence[Reference] = ()) -> None:
    """ROUGE-L vs tau, one panel per benchmark, one line (± 1 std over training seeds) per objective.

    The teacher (dash-dotted) and the SFT warm start (dotted) of `refs` are levels too.
    An SFT row that fills every tau column is drawn as a dashed level with a ± 1 std band.
    """
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
            colours = OBJECTIVE_ORDER[1:] + OBJECTIVE_ORDER[:1]
            ci = colours.index(o.divergence) if o.divergence in colours else i
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
            ax.errorbar(xs, ys, yerr=es, label=o.label, color=cmap(ci % 10), marker=markers[i % len(markers)],
                        markersize=5, linewidth=1.8, capsize=3, elinewidth=1.1)
        for k, ref in enumerate(refs):
            if bench in ref.scores:
                ax.axhline(ref.scores[bench], color=("0.15", "0.45", "0.6")[k % 3], linestyle=("-.", ":", ":")[k % 3],
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
    fig.suptitle(plot_caption(summary, sweep), fontsize=11 if ncol > 1 else 9.5)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 0.98))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


# ----------------------------------------------------------------------------- I/O edges

def write_report(cells: list[Cell], out_dir: str | os.PathLike, sweep: str | None = None) -> dict[str, Path]:
    """Write report.md/.csv/.png for these cells into out_dir; return the paths."""
    out = Path(out_dir)
    if sweep is None:   # the sweep name the cells recorded, else the dir's name
        names = {c.metrics.get("sweep") for c in cells if c.metrics and c.metrics.get("sweep")}
        sweep = names.pop() if len(names) == 1 else out.resolve().name
    summary = summarize(cells)
    refs = references(cells, out)
    paths = {name: out / name for name in REPORT_FILES}
    atomic_write_text(paths["report.md"], render_markdown(summary, sweep))
    atomic_write_text(paths["report.csv"], render_csv(summary))
    render_png(summary, sweep, paths["report.png"], refs)
    from distill.report.html import render_html   # plotly only when a report is due

    atomic_write_text(paths["report.html"], render_html(summary, sweep, refs, out))
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


def _wandb_eval_keys() -> dict[str, str]:
    """W&B summary name (distill.tracking) -> metrics.json name, per benchmark."""
    from distill.tracking.wandb_run import EVAL_NAMES

    return {w: m for m, w in EVAL_NAMES.items()}


def record_from_wandb(run_id: str, state: str, config: dict, summary: dict) -> Cell:
    """Rebuild a Cell from a W&B run's config and summary, as `distill.tracking` logs them.

    Config: the resolved Hydra config, nested (tau, seed, divergence.name and its params,
    loss.kd_ratio, ..., model.name, data.name). Summary, one slash scheme: the final
    `eval/<benchmark>/rougeL` (+ `rougeL_std`, `exact_match`) and `valid/<ce|fkl|rkl>`.
    """
    # The run id is the job's `<name>-<signature>` (distill.tracking); the cell block is the job's own.
    sig = run_id.rsplit("-", 1)[-1] if CELL_DIR_RE.match(run_id) else None
    cell = cell_identity(config, sig)
    evals: dict[str, dict] = {}
    valid: dict[str, float] = {}
    names = _wandb_eval_keys()
    for k, v in summary.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue   # tables (eval/<b>/generations), images, ...
        parts = str(k).split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in names:
            evals.setdefault(parts[1], {})[names[parts[2]]] = v
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
