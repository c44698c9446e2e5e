"""The words of a sweep report: report.md, and the sentences that say what its numbers say.

report.md, per benchmark: the objective x tau table of ROUGE-L mean ± std over training seeds (best
objective per tau in bold), FKL - RKL per tau with its 95% CI, one sentence on FKL vs RKL, every paired
comparison (FKL - RKL, best - second, each objective - SFT) with CI, verdict and seeds needed, and a
sentence on which source of variance dominates; then the cells that took more than one attempt and every
unfinished / failed / missing cell with its error (nothing is dropped silently). The numbers come from
distill.report.summary; number formats and table layout from distill.report.tables.
"""

from __future__ import annotations

import math

import numpy as np

from distill.cell.results import COMPLETED
from distill.options import SFT
from distill.report import statistics as stats
from distill.report.records import PROBLEM_STATUSES, CellResult, attempts
from distill.report.summary import Comparison, Objective, Summary
from distill.report.tables import interval, markdown_table, number, plus_minus

COMPARISON_KINDS = {"fkl-rkl": "FKL − RKL", "best-second": "best − second", "vs-sft": "objective − SFT"}


# ----------------------------------------------------------------------------- sentences

def _ci(t: stats.PairedTest, boot: bool = False) -> str:
    """'[-10.1, -3.5]': the t interval (or the bootstrap one); '–' when there is none."""
    return interval(t.boot_low, t.boot_high) if boot else interval(t.ci_low, t.ci_high)


def _diff_words(t: stats.PairedTest) -> str:
    """'-6.8, 95% CI [-10.1, -3.5], excludes 0 (paired t, n=3)' or the unresolved form with seeds needed."""
    if t.n < 2 or t.sd == 0.0:
        return f"{number(t.mean, '+.1f')}, {stats.verdict(t, 'a', 'b')}"
    head = f"{number(t.mean, '+.1f')}, 95% CI {_ci(t)}"
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
    at = f"τ={number(ref)}" + ("" if ref == 1.0 else " (the lowest τ with both; τ=1 was not run)")
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
    listing = lambda ts: ", ".join(f"τ={number(t)} ({_diff_words(tests[t])})" for t in ts)
    ahead = [t for t in higher if round(tests[t].mean, 1) > 0]
    rest = [t for t in higher if t not in ahead]
    if lead > 0:
        tail = f"; at higher τ FKL − RKL is {listing(higher)}"
    elif ahead:
        tail = f"; FKL's mean overtakes RKL's at {listing(ahead)}" + (f", but not at {listing(rest)}" if rest else "")
    else:
        tail = f"; FKL's mean does not overtake RKL's at any higher τ: {listing(higher)}"
    return first + tail + "."


def _variance_splits(summary: Summary, bench: str) -> list[stats.VarianceSplit]:
    """The variance splits of `bench`'s entries that have >= 2 training and >= 2 eval seeds (each entry once)."""
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
    return splits


def _variance_verdict(who: str, agree: int, n: int) -> str:
    if who == "training seeds":
        return (f"**training seeds dominate** ({agree} of {n} entries taken one by one): more training seeds, not "
                "more eval seeds, would narrow the comparisons")
    if who == "eval sampling":
        return (f"**eval sampling dominates** ({agree} of {n} entries taken one by one): more eval seeds or examples "
                "would narrow the comparisons as much as more training seeds")
    return f"neither source dominates (each within 3x of the other; {agree} of {n} entries taken one by one)"


def describe_variance(summary: Summary, bench: str) -> str:
    """A sentence on which source of variance dominates the entries of `bench` (see statistics.variance_split)."""
    splits = _variance_splits(summary, bench)
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
    return f"Variance: {what}; {_variance_verdict(who, agree, len(splits))}."


# ----------------------------------------------------------------------------- report.md

def _preamble(summary: Summary, sweep: str) -> list[str]:
    """The title, the cell counts and what the entries and comparisons are."""
    cells = summary.cells
    counts = {s: sum(c.status == s for c in cells) for s in (COMPLETED,) + PROBLEM_STATUSES}
    lines = [f"# Sweep report: {sweep}", ""]
    lines.append(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".")
    n_comp = sum(len(summary.comparisons(b)) for b in summary.benchmarks)
    has_sft = any(o.divergence == SFT for o in summary.rows)
    return lines + [
        "", "Each entry is ROUGE-L (F1 x 100) **mean ± std over training seeds** (sample std, ddof=1; "
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


def _objective_cell(summary: Summary, bench: str, o: Objective, t: float, best: list[Objective]) -> str:
    """'41.0 ± 1.4 (n=3)', bold when `o` is among the best at t; '–' without seeds."""
    s = summary.get(bench, o, t)
    if s is None or not s.n:
        return "–"
    txt = f"{plus_minus(s.mean, s.std)} (n={s.n})"
    return f"**{txt}**" if o in best else txt


def _fkl_rkl_row(summary: Summary, bench: str, f: Objective, r: Objective) -> list[str]:
    """The table row of FKL - RKL per tau: mean difference [95% CI] (n)."""
    row = []
    for t in summary.taus:
        c = summary.compare("fkl-rkl", bench, f, r, t)
        row.append("–" if not c.diff.n else
                   number(c.test.mean, "+.1f") + (f" {_ci(c.test)}" if math.isfinite(c.test.ci_low) else "")
                   + f" (n={c.diff.n})")
    extra = f" ({', '.join(f'{k}={number(v)}' for k, v in f.params + f.context)})" if f.params or f.context else ""
    return [f"FKL − RKL{extra} [95% CI]", *row]


def _benchmark_section(summary: Summary, bench: str, bootstrap_column: bool) -> list[str]:
    """'## bench': the table, the FKL vs RKL sentences, the paired comparisons and the variance sentence."""
    taus = summary.taus
    best = {t: summary.best(bench, t) for t in taus}
    rows = [[o.label, *(_objective_cell(summary, bench, o, t, best[t]) for t in taus)] for o in summary.rows]
    pairs = summary.fkl_rkl_pairs()
    rows += [_fkl_rkl_row(summary, bench, f, r) for f, r in pairs]
    lines = [f"## {bench}", "", *markdown_table(["objective", *(f"τ={number(t)}" for t in taus)], rows), ""]
    lines += [describe(summary, bench, f, r) for f, r in pairs]
    if not pairs:
        lines.append("FKL and RKL were not both run, so there is no FKL − RKL comparison.")
    lines.append("")
    lines += render_comparisons(summary.comparisons(bench), bootstrap_column)
    return lines + [describe_variance(summary, bench), ""]


def render_markdown(summary: Summary, sweep: str) -> str:
    """The report as markdown."""
    lines = _preamble(summary, sweep)
    any_boot = any(c.test.has_bootstrap for b in summary.benchmarks for c in summary.comparisons(b))
    for bench in summary.benchmarks:
        lines += _benchmark_section(summary, bench, any_boot)
    if not summary.benchmarks:
        lines += ["No completed cell yet, so there are no scores.", ""]
    lines += render_attempts(summary.cells)
    lines += render_problems(summary.cells)
    return "\n".join(lines).rstrip() + "\n"


def render_comparisons(comps: list[Comparison], bootstrap_column: bool) -> list[str]:
    """Markdown table of a benchmark's paired comparisons."""
    if not comps:
        return []
    power = f"seeds for {stats.POWER:.0%} power"
    head = ["τ", "comparison", "mean a − b", "95% CI (paired t)"] + (["95% CI (bootstrap)"] if bootstrap_column else [])
    # a best - second pair that is also an FKL - RKL or objective - SFT pair is one row with both names
    pair = lambda c: (c.tau, frozenset((c.a, c.b)))
    also_best = {pair(c) for c in comps if c.kind == "best-second"}
    shown = {pair(c) for c in comps if c.kind != "best-second"}
    rows = []
    for c in comps:
        if c.kind == "best-second" and pair(c) in shown:
            continue
        kind = COMPARISON_KINDS[c.kind] + ("; best − second" if c.kind != "best-second" and pair(c) in also_best else "")
        cols = [f"τ={number(c.tau)}", f"{c.name} ({kind})", number(c.test.mean, "+.1f"), _ci(c.test)]
        if bootstrap_column:
            cols.append(_ci(c.test, boot=True) if c.test.has_bootstrap else f"– (n < {stats.BOOTSTRAP_MIN_N})")
        rows.append(cols + [c.verdict, stats.seeds_phrase(c.test) or "–"])
    lines = ["Paired comparisons:", "", *markdown_table(head + ["verdict", power], rows)]
    if not bootstrap_column:
        lines += ["", f"(No bootstrap column: every comparison has fewer than {stats.BOOTSTRAP_MIN_N} paired seeds.)"]
    return lines + [""]


def _problem_row(c: CellResult) -> list[str]:
    """cell, status, step, attempts, updated, the error's last line: what is known of an unfinished cell."""
    m = c.metrics or {}
    last = (m.get("attempts") or [{}])[-1]
    step = m.get("train", {}).get("steps", last.get("end_step", last.get("start_step", "")))
    err = (c.error or "").strip().splitlines()
    note = (err[-1] if err else "").replace("|", "\\|")[:200]   # last line of a traceback says most
    return [c.dir, c.status, f"{step}", f"{attempts(c) or ''}", f"{m.get('updated_at', '')}", note]


def render_problems(cells: list[CellResult]) -> list[str]:
    """Markdown list of every cell that is not a usable completed result."""
    bad = [c for c in cells if c.status != COMPLETED]
    if not bad:
        return ["## Unfinished cells", "", "None: every cell completed.", ""]
    rows = [_problem_row(c) for c in sorted(bad, key=lambda c: (PROBLEM_STATUSES.index(c.status), c.dir))]
    return ["## Unfinished cells", "", "Not in the tables above:", "",
            *markdown_table(["cell", "status", "step", "attempts", "updated", "error / note"], rows), ""]


def render_attempts(cells: list[CellResult]) -> list[str]:
    """One line naming the completed cells that took more than one attempt (the rest took one)."""
    done = [c for c in cells if c.status == COMPLETED and attempts(c)]
    resumed = sorted((c for c in done if attempts(c) > 1), key=lambda c: c.dir)
    if not done:
        return []
    listed = ", ".join(f"{c.dir} ({attempts(c)})" for c in resumed) or "none"
    return [f"Attempts: {len(done) - len(resumed)} completed cells took one attempt; more than one: {listed}.", ""]
