"""distill.report.summary: the numbers of the report (entries over training seeds, best marks, FKL - RKL,
the SFT baseline, paired comparisons, the variance split), checked against numpy / scipy recomputations
from the fixture sweep (tests/fixtures/report/sweep) and a constructed sweep (tests/report/sweeps.py)."""

import json

import numpy as np
import pytest
from scipy import stats

from distill.report.write import build_report
from tests.report.sweeps import BASE, expected_scores, md_row, md_section, read_csv


def test_table_numbers_best_and_difference(sweep):
    paths = build_report(sweep)
    assert set(paths) == {"report.md", "report.csv", "report.png", "report.html"}
    exp = expected_scores()
    rows = read_csv(sweep / "report.csv")
    md = (sweep / "report.md").read_text()
    benches = sorted({k[0] for k in exp})
    taus = [1.0, 2.0, 4.0]
    assert len(benches) == 2
    for bench in benches:
        section = md_section(md, bench)
        for i, tau in enumerate(taus):
            means = {}
            for div in ("fkl", "rkl", "jsd"):
                vals = np.array(list(exp[(bench, div, tau)].values()))
                mean, std = vals.mean(), vals.std(ddof=1)
                means[div] = mean
                r = rows[(bench, div, tau)]
                assert float(r["rougeL_mean"]) == pytest.approx(mean, abs=1e-4)
                assert float(r["rougeL_std"]) == pytest.approx(std, abs=1e-4)
                assert int(r["n"]) == 2
                assert md_row(section, div)[i].strip("*") == f"{mean:.1f} ± {std:.1f} (n=2)"
            top = max(means.values())
            for div, mean in means.items():
                is_best = mean == top
                assert rows[(bench, div, tau)]["best"] == str(int(is_best)), (bench, div, tau)
                assert md_row(section, div)[i].startswith("**") == is_best, (bench, div, tau)
            f, r = exp[(bench, "fkl", tau)], exp[(bench, "rkl", tau)]
            diffs = np.array([f[s] - r[s] for s in sorted(f.keys() & r.keys())])
            d = rows[(bench, "fkl-rkl", tau)]
            assert float(d["rougeL_mean"]) == pytest.approx(diffs.mean(), abs=1e-4)
            assert float(d["rougeL_std"]) == pytest.approx(diffs.std(ddof=1), abs=1e-4)
            assert int(d["n"]) == len(diffs) == 2
            cell = md_row(section, "FKL − RKL [95% CI]")[i]
            assert cell.startswith(f"{diffs.mean():+.1f}") and cell.endswith("(n=2)")
            if diffs.std(ddof=1) > 0:   # the fixture has one zero-spread pair: no interval there
                lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
                assert float(d["ci_low"]) == pytest.approx(lo, abs=1e-4)
                assert float(d["ci_high"]) == pytest.approx(hi, abs=1e-4)
                assert f"[{lo:+.1f}, {hi:+.1f}]" in cell
                assert d["test"] == "paired t (df=1)" and d["comparison"] == "fkl-rkl"
            else:
                assert d["ci_low"] == "" and "zero spread" in d["verdict"]


def test_varying_divergence_param_gets_its_own_row(tmp_path):
    def write(name, beta, score):
        d = tmp_path / name
        d.mkdir()
        m = {"schema_version": 1, "status": "completed", "sweep": "s",
             "cell": {"divergence": "jsd", "divergence_params": {"beta": beta}, "tau": 1.0, "seed": 0},
             "eval": {"b": {"rougeL_mean": score}}}
        (d / "metrics.json").write_text(json.dumps(m))

    write("jsd-a-00000001", 0.1, 30.0)
    write("jsd-b-00000002", 0.9, 40.0)
    build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert float(rows[("b", "jsd (beta=0.1)", 1.0)]["rougeL_mean"]) == 30.0
    assert rows[("b", "jsd (beta=0.9)", 1.0)]["best"] == "1"
    md = (tmp_path / "report.md").read_text()
    assert "FKL and RKL were not both run" in md
    assert "| jsd (beta=0.1) | 30.0 (n=1) |" in md  # one seed: no spread to show


def test_sft_baseline_fills_every_tau_and_every_objective_is_compared_with_it(constructed):
    scores, rows, md = constructed
    # kd_ratio/teacher differ only because SFT is SFT: the rows stay 'fkl', 'rkl', 'sft'
    assert {k[1] for k in rows if rows[k]["comparison"] == ""} == {"sft", "fkl", "rkl"}
    for tau in (1.0, 2.0):
        assert float(rows[("test", "sft", tau)]["rougeL_mean"]) == pytest.approx(BASE.mean(), abs=1e-4)
        for div in ("fkl", "rkl"):
            d = scores[(div, tau)] - BASE
            r = rows[("test", f"{div} - sft", tau)]
            lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
            assert r["comparison"] == "vs-sft" and int(r["n"]) == 5
            assert (float(r["ci_low"]), float(r["ci_high"])) == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))
            assert float(r["p_value"]) == pytest.approx(stats.ttest_rel(scores[(div, tau)], BASE).pvalue, abs=1e-4)
            assert r["verdict"] == f"{div} ahead, 95% CI excludes 0 (paired t, n=5)"
            assert float(r["boot_low"]) < d.mean() < float(r["boot_high"])   # n = 5: bootstrap beside it
    assert "| sft | 30.0 ± 0.8 (n=5) | 30.0 ± 0.8 (n=5) |" in md
    assert "95% CI (bootstrap)" in md and "fkl − sft (objective − SFT)" in md


def test_verdicts_and_seeds_needed_for_constructed_differences(constructed):
    scores, rows, md = constructed
    # tau 1: rkl ahead of fkl by ~4, resolved; it is also the best - second comparison there
    r1 = rows[("test", "fkl-rkl", 1.0)]
    assert r1["verdict"] == "rkl ahead, 95% CI excludes 0 (paired t, n=5)" and r1["seeds_needed"] == ""
    best = rows[("test", "best-second (rkl - fkl)", 1.0)]
    assert best["comparison"] == "best-second" and float(best["rougeL_mean"]) == pytest.approx(-float(r1["rougeL_mean"]))
    # tau 2: ~0.6 at a spread of ~1.3: not resolved; the power calculation says how many seeds would be
    d = scores[("fkl", 2.0)] - scores[("rkl", 2.0)]
    r2 = rows[("test", "fkl-rkl", 2.0)]
    assert stats.ttest_rel(scores[("fkl", 2.0)], scores[("rkl", 2.0)]).pvalue > 0.05
    assert r2["verdict"] == "not resolved with 5 seeds (paired t, 95% CI includes 0)"
    from distill.report.statistics import paired_t_power

    need = int(r2["seeds_needed"])
    effect = abs(d.mean()) / d.std(ddof=1)
    assert need > 5 and paired_t_power(effect, need - 1) < 0.8 <= paired_t_power(effect, need)
    assert f"~{need} training seeds" in md
    assert "At τ=1 RKL leads FKL by" in md and "excludes 0 (paired t, n=5)" in md


def test_eval_and_training_seed_spread_apart(constructed):
    scores, rows, md = constructed
    r = rows[("test", "fkl", 1.0)]
    train_sd = scores[("fkl", 1.0)].std(ddof=1)
    assert float(r["rougeL_std"]) == pytest.approx(train_sd, abs=1e-4)
    assert float(r["eval_seed_std"]) == pytest.approx(np.std([-0.2, 0.2], ddof=1), abs=1e-4)
    assert float(r["n_eval_seeds"]) == 2
    assert float(r["eval_share"]) == pytest.approx((0.08 / 2) / train_sd**2, abs=1e-4)
    assert "**training seeds dominate**" in md


def test_budget_splits_rows_and_an_older_cell_without_it_does_not(tmp_path):
    def write(name, div, seed, score, **extra):
        d = tmp_path / name
        d.mkdir()
        cell = {"divergence": div, "tau": 1.0, "seed": seed, "kd_ratio": 0.0 if div == "sft" else 1.0, **extra}
        m = {"schema_version": 1, "status": "completed", "cell": cell, "eval": {"b": {"rougeL_mean": score}}}
        (d / "metrics.json").write_text(json.dumps(m))

    write("fkl-tau1-s0-00000001", "fkl", 0, 30.0)                       # written before max_steps was recorded
    write("fkl-tau1-s1-00000002", "fkl", 1, 32.0, max_steps=150)
    write("sft-s0-00000003", "sft", 0, 20.0, max_steps=150)
    build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert rows[("b", "fkl", 1.0)]["n"] == "2"
    write("fkl-tau1-s0-00000004", "fkl", 0, 40.0, max_steps=450)
    write("sft-s0-00000005", "sft", 0, 25.0, max_steps=450)
    build_report(tmp_path)
    rows = read_csv(tmp_path / "report.csv")
    assert float(rows[("b", "fkl (max_steps=450)", 1.0)]["rougeL_mean"]) == 40.0
    assert rows[("b", "fkl (max_steps=150)", 1.0)]["n"] == "1"
    # each budget is compared with the SFT baseline of the same budget
    assert float(rows[("b", "fkl (max_steps=450) - sft (max_steps=450)", 1.0)]["rougeL_mean"]) == 15.0
