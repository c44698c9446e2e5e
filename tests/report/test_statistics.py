"""distill.report.statistics: paired CIs against scipy's own t-test, verdicts, bootstrap, power, variance split.

Every expected number is either recomputed with scipy.stats (ttest_rel, t.interval, bootstrap) from
constructed per-seed scores, a published table value, or a simulation.
"""

import math

import numpy as np
import pytest
from scipy import stats as sps

from distill.report import statistics as stats


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_paired_ci_and_p_match_scipy_ttest_rel(n):
    rng = np.random.default_rng(n)
    a = 40 + rng.normal(0, 2, n)
    b = a - 1.0 + rng.normal(0, 1, n)
    t = stats.paired_test(a - b)
    d = a - b
    lo, hi = sps.t.interval(0.95, n - 1, loc=d.mean(), scale=sps.sem(d))
    ref = sps.ttest_rel(a, b)
    assert t.n == n and t.mean == pytest.approx(d.mean()) and t.sd == pytest.approx(d.std(ddof=1))
    assert (t.ci_low, t.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert t.p_value == pytest.approx(ref.pvalue)
    assert t.resolved == (ref.pvalue < 0.05)   # the CI excludes 0 exactly when the two-sided p < 0.05
    assert t.test == f"paired t (df={n - 1})"


def test_issue_example_is_not_resolved_with_three_seeds():
    # +1.2 ± 0.8 over 3 paired seeds: |mean| > std (the old "beyond the spread"), yet the 95% t interval
    # is about [-0.8, +3.2], as issue 19 says.
    t = stats.paired_test([1.2, 0.4, 2.0])
    assert t.mean == pytest.approx(1.2) and t.sd == pytest.approx(0.8)
    assert t.ci_low == pytest.approx(-0.787, abs=1e-3) and t.ci_high == pytest.approx(3.187, abs=1e-3)
    assert not t.resolved
    assert stats.verdict(t, "fkl", "rkl") == "not resolved with 3 seeds (paired t, 95% CI includes 0)"
    # effect 1.2/0.8 = 1.5: a paired t-test needs 6 pairs for 80% power (power(5) < 0.8 <= power(6))
    assert t.seeds_needed == 6
    assert stats.paired_t_power(1.5, 5) < 0.8 <= stats.paired_t_power(1.5, 6)
    assert stats.seeds_phrase(t) == "~6 training seeds"


@pytest.mark.parametrize("diffs,who", [([1.0, 1.2, 0.8], "fkl"), ([-3.0, -2.5, -3.4, -2.9], "rkl")])
def test_resolved_verdict_names_the_leader_and_the_test(diffs, who):
    t = stats.paired_test(diffs)
    assert t.resolved and t.seeds_needed is None and stats.seeds_phrase(t) == ""
    assert stats.verdict(t, "fkl", "rkl") == f"{who} ahead, 95% CI excludes 0 (paired t, n={len(diffs)})"


def test_degenerate_inputs_make_no_claim():
    assert stats.verdict(stats.paired_test([]), "a", "b") == "no paired seeds"
    one = stats.paired_test([2.0])
    assert one.n == 1 and math.isnan(one.ci_low) and stats.verdict(one, "a", "b") == "one paired seed: no test"
    flat = stats.paired_test([0.5, 0.5, 0.5])
    assert not flat.resolved and math.isnan(flat.ci_low) and flat.seeds_needed is None
    assert "zero spread" in stats.verdict(flat, "a", "b")


def test_bootstrap_only_from_five_seeds_and_equals_scipy():
    small = stats.paired_test([1.0, 2.0, 0.5, 1.5])
    assert not small.has_bootstrap
    d = np.array([1.0, 2.0, 0.5, 1.5, 0.2, 1.1, 0.9])
    t = stats.paired_test(d)
    ref = sps.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=stats.BOOTSTRAP_RESAMPLES,
                        method="BCa", rng=np.random.default_rng(stats.BOOTSTRAP_SEED))
    assert (t.boot_low, t.boot_high) == (pytest.approx(ref.confidence_interval.low),
                                         pytest.approx(ref.confidence_interval.high))
    assert t.boot_low < d.mean() < t.boot_high
    assert stats.paired_test(d) == t   # fixed seed: the same report twice


@pytest.mark.parametrize("effect,n", [(1.0, 10), (0.5, 34), (0.8, 15)])
def test_seeds_for_power_matches_the_standard_tables(effect, n):
    # one-sample/paired t, two-sided alpha 0.05, power 0.8 (G*Power / Cohen): d=1 -> 10, 0.5 -> 34, 0.8 -> 15
    assert stats.seeds_for_power(effect, 1.0) == n
    assert stats.seeds_for_power(-effect * 3, 3.0) == n   # only |mean| / sd matters


def test_power_agrees_with_a_simulation():
    rng = np.random.default_rng(0)
    n, effect, sims = 8, 1.0, 20000
    x = rng.normal(effect, 1.0, size=(sims, n))
    p = sps.ttest_1samp(x, 0.0, axis=1).pvalue
    assert stats.paired_t_power(effect, n) == pytest.approx((p < 0.05).mean(), abs=0.015)


def test_seeds_for_power_edges():
    assert stats.seeds_for_power(0.0, 1.0) is None
    assert stats.seeds_for_power(1e-3, 10.0) == stats.MAX_SEEDS + 1
    assert stats.seeds_phrase(stats.paired_test([0.01, -0.02, 0.015])).startswith(("~", ">"))


def test_variance_split_known_numbers():
    # training-seed means 41 and 45 (std 2.83); within each, two eval seeds 2 apart (var 2, std 1.41):
    # eval sampling gives a cell score a variance of 2 / 2 = 1 out of the observed 8 -> share 0.125
    v = stats.variance_split([[40.0, 42.0], [44.0, 46.0]])
    assert v.n_train == 2 and v.n_eval == 2
    assert v.train_std == pytest.approx(math.sqrt(8)) and v.eval_std == pytest.approx(math.sqrt(2))
    assert v.eval_share == pytest.approx(0.125) and v.dominant == "training seeds"
    # the cell scores barely move between training seeds, the eval seeds do: eval sampling dominates
    w = stats.variance_split([[38.0, 44.0], [44.0, 38.5], [40.0, 42.5]])
    assert w.eval_share > 0.75 and w.dominant == "eval sampling"
    # eval sampling alone predicts more spread (pooled var 12.2 / 2 eval seeds = 6.1) than the training-seed
    # means show (41, 41, 41.5: var 0.08):
    # the training seeds' own part estimates at 0, and the share is 1, never over 100 %
    x = stats.variance_split([[38.0, 44.0], [44.0, 38.0], [41.0, 42.0]])
    assert x.eval_share == 1.0 and x.dominant == "eval sampling"
    assert stats.dominant_source(0.5) == "both" and stats.dominant_source(math.nan) == ""
    # one eval seed per training seed: eval spread unknown, no split
    u = stats.variance_split([[40.0], [42.0]])
    assert math.isnan(u.eval_std) and u.dominant == ""


def test_mean_and_sample_std_of_an_entry():
    xs = [30.0, 31.5, 29.25]
    assert stats.mean(xs) == pytest.approx(np.mean(xs)) and stats.sample_std(xs) == pytest.approx(np.std(xs, ddof=1))
    assert math.isnan(stats.mean([])) and math.isnan(stats.sample_std([41.0]))   # one seed: no spread
