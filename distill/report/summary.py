"""The numbers of a sweep report, no text: each (benchmark, objective, tau) entry over training seeds,
and the paired comparisons the report makes.

A cell's score on a benchmark is its `rougeL_mean`, the mean over its *evaluation* seeds. An entry is the
mean of those scores over the cell's *training* seeds, ± their sample std (ddof=1). Comparisons are paired
by training seed (distill.report.statistics does the math). `summarize(cells)` builds the `Summary` that
the text (distill.report.text), report.csv / report.png (distill.report.render), report.html
(distill.report.html) and the W&B summary run (distill.report.wandb) all show.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from distill.cell.results import COMPLETED
from distill.options import OBJECTIVE_ORDER, SFT
from distill.report import statistics as stats
from distill.report.records import CellResult
from distill.report.tables import number

# cell fields that mean nothing for an SFT cell (never part of its row label)
SFT_MOOT_KEYS = ("kd_ratio", "teacher", "tau_target", "tau_squared")


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
        """Training-seed spread next to eval-seed spread (see distill.report.statistics.variance_split)."""
        return stats.variance_split([self.eval_by_seed.get(s) or [v] for s, v in self.by_seed.items()])

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return stats.mean(list(self.by_seed.values()))

    @property
    def std(self) -> float:
        return stats.sample_std(list(self.by_seed.values()))


@dataclass(frozen=True)
class Objective:
    """A row of the tables: a divergence, plus whatever else varies in the sweep."""

    divergence: str
    params: tuple[tuple[str, Any], ...] = ()    # divergence params that vary within the sweep
    context: tuple[tuple[str, Any], ...] = ()   # other cell fields that vary (kd_ratio, model, ...)

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={number(v)}" for k, v in self.params + self.context)
        return f"{self.divergence} ({extra})" if extra else self.divergence

    def sort_key(self) -> tuple:
        order = OBJECTIVE_ORDER.index(self.divergence) if self.divergence in OBJECTIVE_ORDER else len(OBJECTIVE_ORDER)
        return (repr(self.context), order, self.divergence, repr(self.params))


def objectives(cells: Iterable[CellResult]) -> dict[str, Objective]:
    """Map each completed cell dir to its Objective (row label).

    Only fields that take more than one value across the completed cells show up in the
    label, so a plain divergence x tau x seed sweep has rows 'fkl', 'rkl', ... SFT cells
    (kd_ratio=0, divergence 'sft') and distilled cells are looked at apart: that an SFT cell has
    kd_ratio 0 and no teacher is what makes it SFT, not a field that varies in the sweep.
    """
    done = [c for c in cells if c.status == COMPLETED]
    skip = {"divergence", "divergence_params", "tau", "seed"}

    def varying(group: list[CellResult], ignore: Iterable[str] = ()) -> list[str]:
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


@dataclass
class Summary:
    """Everything the report shows, computed from the cells (no I/O)."""

    benchmarks: list[str]
    taus: list[float]
    rows: list[Objective]
    stats: dict[tuple[str, Objective, float], Stat]   # (benchmark, objective, tau) -> Stat
    cells: list[CellResult]
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


def summarize(cells: list[CellResult]) -> Summary:
    """Group completed cells into (benchmark, objective, tau) entries over training seeds.

    An SFT row run at a single tau (tau does not apply to it) fills every tau column, so each
    distilled objective can be compared with it at each tau, paired by training seed.
    """
    objs = objectives(cells)
    entries: dict[tuple[str, Objective, float], Stat] = {}
    benchmarks: list[str] = []
    for c in cells:
        if c.status != COMPLETED:
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
