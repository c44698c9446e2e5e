"""Paired statistics for sweep reports (pure; scipy.stats does the distributions).

A sweep compares objectives trained from the same training seeds, so every comparison is paired
by training seed: the unit of evidence is the per-seed difference d_i = a_i - b_i.

- `mean`, `sample_std` an entry's mean and spread over training seeds (plain Python, ddof=1).
- `paired_test`      mean difference, 95% CI from the t distribution with n-1 df (scipy's
                     `ttest_1samp(d).confidence_interval`, identical to `ttest_rel(a, b)`), its p-value,
                     and beside it a paired bootstrap CI (`scipy.stats.bootstrap`, BCa, resampling the
                     per-seed differences) when n >= 5.
- `verdict`          one plain sentence naming the test: "fkl ahead, 95% CI excludes 0 (paired t, n=3)"
                     or "not resolved with 3 seeds (paired t, 95% CI includes 0)".
- `seeds_for_power`  the standard power calculation of a two-sided paired t-test (power from the
                     noncentral t distribution, `scipy.stats.nct`): how many training seeds would detect
                     a true difference of the observed size at the observed spread with 80% power at
                     alpha = 0.05. A plug-in estimate: with 3 seeds the spread itself is uncertain.
- `variance_split`   a cell's spread over training seeds next to its spread over evaluation
                     (sampling) seeds, and the share of the former that eval sampling alone explains.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_MIN_N = 5        # below this a bootstrap of n values has too few distinct resamples to mean much
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0         # fixed: the same cells give a byte-identical report
POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 1000           # beyond this, "more than 1000" (a difference this small is not worth seeds)
T_TEST = "paired t"


def mean(xs: Sequence[float]) -> float:
    """The plain mean (a sum in order, so the same seeds give the same digits); nan for no values."""
    return sum(xs) / len(xs) if xs else math.nan


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); nan for fewer than two values."""
    if len(xs) < 2:
        return math.nan
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison a - b over n training seeds."""

    n: int
    mean: float
    sd: float                         # sample std of the per-seed differences (ddof=1)
    ci_low: float                     # t-based CI (n-1 df); nan when n < 2 or sd == 0
    ci_high: float
    p_value: float                    # two-sided paired t-test of mean difference 0; nan when n < 2 or sd == 0
    boot_low: float = math.nan        # paired bootstrap CI (BCa); nan when n < BOOTSTRAP_MIN_N
    boot_high: float = math.nan
    seeds_needed: int | None = None   # training seeds for POWER at ALPHA (unresolved comparisons only)
    confidence: float = CONFIDENCE

    @property
    def resolved(self) -> bool:
        """The t interval excludes 0 (needs n >= 2 and some spread)."""
        return self.n >= 2 and (self.ci_low > 0 or self.ci_high < 0)

    @property
    def has_bootstrap(self) -> bool:
        return not math.isnan(self.boot_low)

    @property
    def test(self) -> str:
        """Name of the test behind ci_low/ci_high, as the report writes it."""
        return f"{T_TEST} (df={self.n - 1})" if self.n >= 2 else ""


def paired_test(diffs: Sequence[float], confidence: float = CONFIDENCE, power: float = POWER,
                alpha: float = ALPHA) -> PairedTest:
    """Mean, t-based CI, p-value, bootstrap CI (n >= 5) and seeds needed for per-seed differences `diffs`."""
    d = np.asarray(list(diffs), dtype=float)
    n = int(d.size)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence=confidence)
    mean = float(d.mean())
    if n == 1:
        return PairedTest(1, mean, math.nan, math.nan, math.nan, math.nan, confidence=confidence)
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        # every seed gave the same difference: the t statistic is undefined, so no interval and no claim
        lo = hi = p = math.nan
    else:
        res = stats.ttest_1samp(d, 0.0)
        ci = res.confidence_interval(confidence)
        lo, hi, p = float(ci.low), float(ci.high), float(res.pvalue)
    boot_lo = boot_hi = math.nan
    if n >= BOOTSTRAP_MIN_N and sd > 0.0:
        boot_lo, boot_hi = paired_bootstrap_ci(d, confidence)
    resolved = lo > 0 or hi < 0
    needed = None if resolved or sd == 0.0 else seeds_for_power(mean, sd, power=power, alpha=alpha)
    return PairedTest(n, mean, sd, lo, hi, p, boot_lo, boot_hi, needed, confidence)


def paired_bootstrap_ci(diffs: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """BCa bootstrap CI of the mean per-seed difference (resampling seeds, i.e. pairs, with replacement)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # DegenerateDataWarning on near-constant data: the result says nan
        res = stats.bootstrap((np.asarray(diffs, dtype=float),), np.mean, confidence_level=confidence,
                              n_resamples=BOOTSTRAP_RESAMPLES, method="BCa",
                              rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_t_power(effect: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test with n pairs when the true standardised effect is `effect`.

    effect = true mean difference / true std of the differences (Cohen's d_z). Under it the t statistic
    follows a noncentral t with n-1 df and noncentrality effect * sqrt(n).
    """
    if n < 2:
        return math.nan
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def seeds_for_power(mean: float, sd: float, power: float = POWER, alpha: float = ALPHA,
                    max_n: int = MAX_SEEDS) -> int | None:
    """Smallest n (>= 2) whose paired t-test reaches `power` for a true difference `mean` at spread `sd`.

    None when there is no difference to detect (mean == 0 or not finite); max_n + 1 when even max_n
    seeds would not do. Power rises with n, so a doubling search then bisection finds the smallest n.
    """
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == 0.0:
        return None
    if sd == 0.0:
        return 2
    effect = abs(mean) / sd
    if paired_t_power(effect, max_n, alpha) < power:
        return max_n + 1
    lo, hi = 1, 2                      # invariant: power(lo) < target (or lo == 1), power(hi) >= target
    while paired_t_power(effect, hi, alpha) < power:
        lo, hi = hi, min(hi * 2, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if paired_t_power(effect, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def verdict(t: PairedTest, a: str, b: str) -> str:
    """Plain words for the comparison a - b, naming the test and n."""
    pct = f"{t.confidence * 100:g}%"
    if t.n == 0:
        return "no paired seeds"
    if t.n == 1:
        return "one paired seed: no test"
    if t.sd == 0.0:
        return f"the same difference on all {t.n} seeds: zero spread, the {T_TEST}-test is undefined"
    if t.resolved:
        lead = a if t.mean > 0 else b
        return f"{lead} ahead, {pct} CI excludes 0 ({T_TEST}, n={t.n})"
    return f"not resolved with {t.n} seeds ({T_TEST}, {pct} CI includes 0)"


def seeds_phrase(t: PairedTest, power: float = POWER, alpha: float = ALPHA) -> str:
    """'~12 training seeds' for an unresolved comparison; '' when resolved or not computable."""
    if t.resolved or t.n < 2 or t.sd == 0.0:
        return ""
    if t.seeds_needed is None:
        return "no difference observed"
    if t.seeds_needed > MAX_SEEDS:
        return f"> {MAX_SEEDS} training seeds"
    return f"~{t.seeds_needed} training seeds"


# ----------------------------------------------------------------------------- variance apart

@dataclass(frozen=True)
class VarianceSplit:
    """Spread of one cell (objective x tau x benchmark) over training seeds and over eval seeds."""

    n_train: int          # training seeds
    n_eval: float         # eval seeds per training seed (mean over training seeds)
    train_std: float      # sample std over training seeds of the cell scores (each a mean over eval seeds)
    eval_std: float       # pooled sample std over eval seeds within a training seed
    eval_share: float     # (eval_std^2 / n_eval) / train_std^2, capped at 1: how much of train_std^2 eval
                          # sampling explains (1 = all of it: the training seeds' own part estimates at 0)

    @property
    def dominant(self) -> str:
        """'training seeds', 'eval sampling', 'both' or '' (not computable)."""
        return dominant_source(self.eval_share)


def dominant_source(eval_share: float) -> str:
    """Which source dominates given the eval-sampling share of the between-training-seed variance.

    A cell score is the mean over k eval seeds, so eval sampling alone gives its score a variance of
    eval_std^2 / k; what the training seeds add is the rest of the observed between-seed variance.
    One dominates when it is at least 3x the other (share <= 1/4 or >= 3/4).
    """
    if not math.isfinite(eval_share):
        return ""
    if eval_share <= 0.25:
        return "training seeds"
    if eval_share >= 0.75:
        return "eval sampling"
    return "both"


def variance_split(per_train_seed: Sequence[Sequence[float]]) -> VarianceSplit:
    """Split a cell's spread: `per_train_seed[i]` = scores of training seed i over its eval seeds."""
    groups = [np.asarray(g, dtype=float) for g in per_train_seed if len(g)]
    n_train = len(groups)
    means = np.array([g.mean() for g in groups])
    train_std = float(means.std(ddof=1)) if n_train >= 2 else math.nan
    within = [g.var(ddof=1) for g in groups if g.size >= 2]
    eval_std = float(math.sqrt(np.mean(within))) if within else math.nan
    n_eval = float(np.mean([g.size for g in groups])) if groups else math.nan
    # Var(cell score) = sigma_train^2 + sigma_eval^2 / k. The method-of-moments estimate of the training seeds'
    # part, train_std^2 - eval_std^2 / k, is negative whenever eval sampling alone predicts more spread than was
    # seen (common with 3 seeds); truncated at 0 as usual, eval sampling then explains all of it: share 1.
    if math.isfinite(train_std) and math.isfinite(eval_std) and train_std > 0:
        share = min(1.0, (eval_std ** 2 / n_eval) / train_std ** 2)
    elif train_std == 0 and math.isfinite(eval_std):
        share = 1.0 if eval_std > 0 else math.nan
    else:
        share = math.nan
    return VarianceSplit(n_train, n_eval, train_std, eval_std, float(share))
