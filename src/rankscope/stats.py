"""Paired statistics over seeds: what the findings table's estimates and intervals are.

Seed k of every method starts from the same shared weights and sees the same batches (tests/test_study.py
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

Intervals with too few points (n < 2 for a mean, n < 3 or a single x for a slope) come back with
lo = hi = None; the verdict rule (rankscope.findings) reads that as inconclusive.
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
