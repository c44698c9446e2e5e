"""The ablation tables (issue 17) from the cells of `sweeps/demo_ablation.yaml`, as markdown.

    python scripts/ablation_tables.py outputs/demo outputs/demo_ablation > docs/results/demo_ablation.md

(docs/results/ablation.md cites the tables.) Every completed cell of the given sweep dirs counts once
(`distill.report.records.scan_sweep` + `dedupe`: the demo's 150-step cells and their ablation twins share a
signature). A τ = 1 cell stands for both τ² settings (the factor is 1 there). Comparisons are paired by
training seed: the mean difference, its 95% CI from the t distribution
(`distill.report.statistics.paired_test`), resolved when the CI excludes 0. Numbers and tables are written
as in the report (`distill.report.tables`). Prints:

1. ROUGE-L means over training seeds: budget x objective x τ² (rows) by τ (columns), a table per benchmark;
2. every objective at τ > 1 minus RKL at τ = 1 (the ablation's question), with the resolved ones listed;
3. τ² on minus off, per objective, τ > 1 and budget;
4. 450 minus 150 steps, per objective, τ and τ².
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from distill.cell.results import COMPLETED
from distill.report.records import dedupe, scan_sweep
from distill.report.statistics import mean as mean_of
from distill.report.statistics import paired_test
from distill.report.tables import interval, markdown_table, number

BENCHMARKS = ("test", "shift_wording", "shift_long")
OBJECTIVES = ("fkl", "rkl", "jsd")
# (objective, tau, tau_squared, max_steps) -> seed -> benchmark -> ROUGE-L; SFT cells are ("sft", None, None, steps)
Scores = dict[tuple, dict[int, dict[str, float]]]


def load(sweep_dirs: list[Path]) -> Scores:
    """Completed cells' ROUGE-L per benchmark, keyed by what the ablation varies."""
    cells = dedupe([c for d in sweep_dirs for c in scan_sweep(d)])
    out: Scores = defaultdict(dict)
    for c in cells:
        if c.status != COMPLETED:
            continue
        cell, m = c.metrics["cell"], c.metrics
        if cell.get("kd_ratio") == 0.0:
            key = ("sft", None, None, cell["max_steps"])
        else:
            key = (cell["divergence"], float(cell["tau"]), bool(cell.get("tau_squared", True)), cell["max_steps"])
        out[key][int(cell["seed"])] = {b: r["rougeL_mean"] for b, r in m["eval"].items()}
    for (div, tau, sq, steps), seeds in list(out.items()):
        if tau == 1.0:  # tau^2 = 1: a tau=1 cell is its own twin
            out.setdefault((div, tau, not sq, steps), seeds)
    return out


def mean(scores: Scores, key: tuple, bench: str) -> float | None:
    seeds = scores.get(key, {})
    vals = [s[bench] for s in seeds.values() if bench in s]
    return mean_of(vals) if vals else None


def diff(scores: Scores, a: tuple, b: tuple, bench: str):
    """paired_test of a − b over the seeds both have, or None when fewer than 2."""
    common = sorted(set(scores.get(a, {})) & set(scores.get(b, {})))
    if len(common) < 2:
        return None
    return paired_test([scores[a][s][bench] - scores[b][s][bench] for s in common])


def fmt_test(t) -> str:
    """'+5.1 [+4.2, +6.0] resolved': the mean difference, its 95% CI and whether it excludes 0."""
    if math.isnan(t.ci_low):  # every seed gave the same difference (e.g. identical cells): no interval, no claim
        return f"{number(t.mean, '+.1f')} on every seed"
    return f"{number(t.mean, '+.1f')} {interval(t.ci_low, t.ci_high)} {'resolved' if t.resolved else 'not resolved'}"


def fmt_mean_diff(t) -> str:
    """'+2.9*': the mean difference, starred when resolved."""
    return f"{number(t.mean, '+.1f')}{'*' if resolved(t) else ''}"


def resolved(t) -> int:
    """+1 / −1 when the CI excludes 0 above / below (`PairedTest.resolved`), else 0."""
    return (1 if t.mean > 0 else -1) if t.resolved else 0


def axes(scores: Scores) -> tuple[list[float], list[int]]:
    taus = sorted({k[1] for k in scores if k[0] != "sft"})
    budgets = sorted({k[3] for k in scores})
    return taus, budgets


def on_off(sq: bool) -> str:
    return "on" if sq else "off"


def means_tables(scores: Scores) -> list[str]:
    taus, budgets = axes(scores)
    lines = []
    for bench in BENCHMARKS:
        rows = []
        for steps in budgets:
            for div in OBJECTIVES:
                for sq in (True, False):
                    row = [mean(scores, (div, t, sq, steps), bench) for t in taus]
                    if any(v is not None for v in row):
                        rows.append([steps, div, on_off(sq), *("–" if v is None else number(v, ".1f") for v in row)])
            sft = mean(scores, ("sft", None, None, steps), bench)
            if sft is not None:   # one value for every τ column
                rows.append([steps, "sft", "–", f"{number(sft, '.1f')} (every τ)", *[None] * (len(taus) - 1)])
        lines += [f"\n#### {bench}: ROUGE-L, mean over training seeds (n per cell in the report)\n",
                  *markdown_table(["budget", "objective", "τ²", *(f"τ={number(t)}" for t in taus)], rows,
                                  align="rll" + "r" * len(taus))]
    return lines


def versus_rkl_at_1(scores: Scores) -> list[str]:
    """Every objective at τ > 1 minus RKL at τ = 1, paired by seed; a count per verdict, then the resolved ones."""
    taus, budgets = axes(scores)
    rows, counts = [], defaultdict(int)
    for steps in budgets:
        ref = ("rkl", 1.0, True, steps)
        for div in OBJECTIVES:
            for tau in (t for t in taus if t > 1):
                for sq in (True, False):
                    for bench in BENCHMARKS:
                        t = diff(scores, (div, tau, sq, steps), ref, bench)
                        if t is None:
                            continue
                        counts[resolved(t)] += 1
                        if resolved(t) > 0:
                            rows.append([steps, div, number(tau), on_off(sq), bench, fmt_test(t)])
    lines = ["\n#### X at τ > 1 − RKL at τ = 1, paired by training seed\n",
             f"{sum(counts.values())} comparisons: {counts[1]} resolved in X's favour, {counts[-1]} resolved in RKL "
             f"τ = 1's favour, {counts[0]} not resolved (95% CI includes 0)."]
    if rows:
        lines += ["", *markdown_table(["budget", "X", "τ", "τ²", "benchmark", "X − RKL τ=1"], rows, align="rlr")]
    return lines


def tau_squared_effect(scores: Scores) -> list[str]:
    """τ² on − off per objective, τ > 1, budget and benchmark."""
    taus, budgets = axes(scores)
    rows, counts = [], defaultdict(int)
    for steps in budgets:
        for div in OBJECTIVES:
            for tau in (t for t in taus if t > 1):
                tests = [diff(scores, (div, tau, True, steps), (div, tau, False, steps), b) for b in BENCHMARKS]
                if all(t is None for t in tests):
                    continue
                for t in tests:
                    if t is not None:
                        counts[resolved(t)] += 1
                rows.append([steps, div, number(tau), *("–" if t is None else fmt_test(t) for t in tests)])
    return ["\n#### τ² on − off, paired by training seed\n",
            *markdown_table(["budget", "objective", "τ", *BENCHMARKS], rows, align="rlr"),
            f"\n{sum(counts.values())} comparisons: {counts[1]} resolved for τ² on, {counts[-1]} for τ² off, "
            f"{counts[0]} not resolved."]


def budget_effect(scores: Scores) -> list[str]:
    """Last budget − first budget per objective, τ and τ² (means of the paired differences)."""
    taus, budgets = axes(scores)
    if len(budgets) < 2:
        return []
    lo, hi = budgets[0], budgets[-1]
    rows = []
    for bench in BENCHMARKS:
        for div in OBJECTIVES:
            for sq in (True, False):
                tests = [diff(scores, (div, t, sq, hi), (div, t, sq, lo), bench) for t in taus]
                if not all(t is None for t in tests):
                    rows.append([div, on_off(sq), *("–" if t is None else fmt_mean_diff(t) for t in tests), bench])
        t = diff(scores, ("sft", None, None, hi), ("sft", None, None, lo), bench)
        if t is not None:   # one value for every τ column
            rows.append(["sft", "–", f"{fmt_mean_diff(t)} (every τ)", *[None] * (len(taus) - 1), bench])
    return [f"\n#### {hi} − {lo} steps, paired by training seed (mean difference; * resolved)\n",
            *markdown_table(["objective", "τ²", *(f"τ={number(t)}" for t in taus), "benchmark"], rows,
                            align="ll" + "r" * len(taus))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep dirs holding the ablation's cells")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.sweep_dirs if not d.is_dir()]
    if missing:
        print(f"ablation_tables: no such sweep dir: {', '.join(missing)}", file=sys.stderr)
        return 2
    scores = load(args.sweep_dirs)
    n = sum(len(s) for k, s in scores.items() if not (k[1] == 1.0 and not k[2]))
    print(f"{n} completed cells (τ = 1 counted once) from {', '.join(str(d) for d in args.sweep_dirs)}")
    print("\n".join(means_tables(scores) + versus_rkl_at_1(scores) + tau_squared_effect(scores) + budget_effect(scores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
