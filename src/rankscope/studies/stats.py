"""Paired statistics over seeds: what the findings table's estimates and intervals are.

Seed k of every method starts from the same shared weights and sees the same batches (tests/integration/test_study.py
checks it), so two methods are compared seed by seed:

  paired_differences(a, b)   {seed: a[seed] - b[seed]} over the seeds both have
  t_interval(xs)             mean of xs and its two-sided t interval: mean ± t_{1-α/2, n-1} · s / √n,
                             s the sample standard deviation (n - 1 in the denominator); the same interval
                             as scipy.stats.ttest_rel(a, b).confidence_interval() on the paired values
  bootstrap_interval(xs)     percentile bootstrap of the mean (scipy.stats.bootstrap, fixed seed,
                             9,999 resamples); only for n >= 5, where resampling a handful of seeds means something
  slope_interval(x, y)       OLS slope of y on x with its t interval on n - 2 degrees of freedom
                             (slope ± t_{1-α/2, n-2} · stderr, stderr as scipy.stats.linregress reports it);
                             for the size trend, x = log(parameters) and y = each seed's gap at that size, so every
                             (size, seed) pair is one point (n = sizes × seeds)

  slope_of_means(groups)     the slope on the unit that was replicated: each group (a size, a token budget) is one
                             point, its x and the mean of its seeds' gaps; OLS on k group means, k - 2 degrees of
                             freedom (seed nested in group: seeds are not independent x values), k >= 3
  predict_mean(fit, x0)      the fitted line at x0 with its t interval (an extrapolation where x0 lies outside x)

Tests and multiplicity (all p-values two-sided unless named):
  t_test_p(xs)               paired t test of mean(xs) = 0 (scipy.stats.ttest_1samp)
  tost_p(xs, sesoi)          TOST equivalence: the larger of the two one-sided t tests of mean < sesoi and mean > -sesoi
                             (statsmodels.stats.weightstats.ttost_paired gives the same)
  holm(ps), bh(ps)           Holm step-down (family-wise) and Benjamini-Hochberg (false discovery rate) adjusted p-values;
                             the same as statsmodels.stats.multitest.multipletests(method="holm" / "fdr_bh")
  mde(n, sd)                 the smallest true mean difference a two-sided paired t test at level alpha detects with 80%
                             power from n pairs (noncentral t; statsmodels' TTestPower.solve_power in SD units), x sd

Intervals with too few points (n < 2 for a mean, n < 3 or a single x for a slope) come back with
lo = hi = None; the verdict rule (rankscope.studies.findings) reads that as inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

BOOTSTRAP_MIN_N = 5
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


@dataclass
class Interval:
    """An estimate with its two-sided interval (lo, hi are None where n is too small)."""

    estimate: float | None
    lo: float | None
    hi: float | None
    n: int
    method: str  # "t", "bootstrap-percentile", "ols-t"
    confidence: float = 0.95
    df: int | None = None
    stderr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_differences(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[Any, float]:
    """{seed: a[seed] - b[seed]} for the seeds present (and finite) in both, in sorted seed order."""
    seeds = sorted(k for k in set(a) & set(b) if _finite(a[k]) and _finite(b[k]))
    return {k: float(a[k]) - float(b[k]) for k in seeds}


def t_interval(xs: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and t interval (n - 1 degrees of freedom) of paired differences."""
    from scipy import stats

    x = np.asarray(list(xs), dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(None, None, None, 0, "t", confidence)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, None, None, n, "t", confidence)
    se = float(x.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    return Interval(mean, mean - half, mean + half, n, "t", confidence, df=n - 1, stderr=se)


def bootstrap_interval(xs: Sequence[float], confidence: float = 0.95, seed: int = BOOTSTRAP_SEED,
                       n_resamples: int = BOOTSTRAP_RESAMPLES) -> Interval | None:
    """Percentile bootstrap interval of the mean; None where n < 5 (too few seeds to resample)."""
    from scipy import stats

    x = np.asarray(list(xs), dtype=np.float64)
    if len(x) < BOOTSTRAP_MIN_N:
        return None
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(float(x.mean()), float(ci.low), float(ci.high), len(x), "bootstrap-percentile", confidence,
                    stderr=float(res.standard_error))


def slope_interval(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> Interval:
    """OLS slope of y on x and its t interval with n - 2 degrees of freedom."""
    from scipy import stats

    xa, ya = np.asarray(list(x), dtype=np.float64), np.asarray(list(y), dtype=np.float64)
    n = len(xa)
    if n < 2 or len(set(xa.tolist())) < 2:
        return Interval(None, None, None, n, "ols-t", confidence)
    fit = stats.linregress(xa, ya)
    if n < 3:  # two points fit exactly: a slope but no interval
        return Interval(float(fit.slope), None, None, n, "ols-t", confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 2)) * float(fit.stderr)
    return Interval(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, n, "ols-t", confidence,
                    df=n - 2, stderr=float(fit.stderr))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- tests, multiplicity and power
def t_test_p(xs: Sequence[float]) -> float | None:
    """Two-sided p of a one-sample (paired) t test of mean = 0; None with n < 2 or zero spread."""
    from scipy import stats

    x = np.asarray(list(xs), dtype=np.float64)
    if len(x) < 2 or float(x.std(ddof=1)) == 0.0:
        return None
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def tost_p(xs: Sequence[float], sesoi: float) -> float | None:
    """TOST p-value for |mean| < sesoi (equivalence within the smallest effect of interest); None with n < 2."""
    from scipy import stats

    x = np.asarray(list(xs), dtype=np.float64)
    if len(x) < 2 or sesoi <= 0 or float(x.std(ddof=1)) == 0.0:
        return None
    p_low = stats.ttest_1samp(x, -sesoi, alternative="greater").pvalue
    p_high = stats.ttest_1samp(x, sesoi, alternative="less").pvalue
    return float(max(p_low, p_high))


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(list(ps), dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adj[j] = running
    return adj.tolist()


def bh(ps: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order (scipy.stats.false_discovery_control)."""
    from scipy import stats

    if not len(ps):
        return []
    return [float(v) for v in stats.false_discovery_control(np.asarray(list(ps), dtype=np.float64), method="bh")]


CORRECTIONS = {"holm": holm, "bh": bh}


def power_multiplier(df: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """m such that a two-sided t test on `df` degrees of freedom detects a true effect of m standard errors with `power`
    (noncentral t with noncentrality m)."""
    from scipy import optimize, stats

    if df < 1:
        return None
    crit = stats.t.ppf(1 - alpha / 2, df)

    def pw(nc: float) -> float:
        upper = float(stats.nct.sf(crit, df, nc))
        upper = upper if math.isfinite(upper) else 1.0 - float(stats.nct.cdf(crit, df, nc))
        lower = float(stats.nct.cdf(-crit, df, nc))  # the wrong-side rejections: ~0, and NaN in scipy's far tail at df = 1
        return upper + (lower if math.isfinite(lower) else 0.0) - power

    hi = 1.0
    while pw(hi) < 0:  # power rises with the effect: bracket it by doubling
        hi *= 2
    return float(optimize.brentq(pw, 1e-9, hi, xtol=1e-12))


def mde_sd(n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The effect (in SDs of the paired differences) a two-sided one-sample t test detects with `power` from n pairs."""
    m = power_multiplier(n - 1, alpha, power)
    return None if m is None else m / math.sqrt(n)


def mde(xs: Sequence[float], alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable mean difference, in the units of xs: mde_sd(n) x the sample SD of xs."""
    x = np.asarray(list(xs), dtype=np.float64)
    d = mde_sd(len(x), alpha, power)
    return None if d is None else d * float(x.std(ddof=1))


@dataclass
class GroupSlope:
    """The OLS slope of group means on x: estimate, interval (k - 2 df), p-value, and what is needed to predict."""

    interval: Interval
    p: float | None
    intercept: float | None
    xbar: float | None
    sxx: float | None
    resid_sd: float | None
    points: list[tuple[Any, float, float, int]]  # (group, x, mean gap, seeds)


def slope_of_means(groups: Mapping[Any, tuple[float, Sequence[float]]], confidence: float = 0.95) -> GroupSlope:
    """groups: {group: (x, [gap of each seed])}; one point per group (x, mean gap), OLS over the k points, k - 2 df."""
    from scipy import stats

    pts = [(g, float(x), float(np.mean(list(ys))), len(list(ys))) for g, (x, ys) in groups.items() if len(list(ys))]
    xs = np.array([p[1] for p in pts])
    ys = np.array([p[2] for p in pts])
    k = len(pts)
    if k < 2 or len(set(xs.tolist())) < 2:
        return GroupSlope(Interval(None, None, None, k, "ols-t on group means", confidence), None, None, None, None, None, pts)
    fit = stats.linregress(xs, ys)
    if k < 3:
        return GroupSlope(Interval(float(fit.slope), None, None, k, "ols-t on group means", confidence), None,
                          float(fit.intercept), float(xs.mean()), None, None, pts)
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 2)) * float(fit.stderr)
    iv = Interval(float(fit.slope), float(fit.slope) - half, float(fit.slope) + half, k, "ols-t on group means", confidence,
                  df=k - 2, stderr=float(fit.stderr))
    resid = ys - (fit.intercept + fit.slope * xs)
    sxx = float(((xs - xs.mean()) ** 2).sum())
    p = float(fit.pvalue) if fit.stderr > 0 else None
    return GroupSlope(iv, p, float(fit.intercept), float(xs.mean()), sxx, float(math.sqrt((resid ** 2).sum() / (k - 2))), pts)


def predict_mean(fit: GroupSlope, x0: float, confidence: float = 0.95) -> Interval:
    """The fitted line at x0 and its t interval (k - 2 df): se = s * sqrt(1/k + (x0 - xbar)^2 / Sxx)."""
    from scipy import stats

    k = fit.interval.n
    if fit.interval.estimate is None or fit.intercept is None:
        return Interval(None, None, None, k, "ols-t prediction of the mean", confidence)
    est = fit.intercept + fit.interval.estimate * x0
    if fit.sxx is None or fit.resid_sd is None:
        return Interval(est, None, None, k, "ols-t prediction of the mean", confidence)
    se = fit.resid_sd * math.sqrt(1 / k + (x0 - fit.xbar) ** 2 / fit.sxx)
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 2)) * se
    return Interval(est, est - half, est + half, k, "ols-t prediction of the mean", confidence, df=k - 2, stderr=se)
