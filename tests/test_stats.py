import math

import numpy as np
import pytest
from scipy import stats as ss

from rankscope import stats

A = [3.912, 4.105, 3.877, 4.020, 3.951, 4.188]
B = [3.801, 3.990, 3.842, 3.874, 3.905, 4.010]


def test_paired_differences_keep_common_finite_seeds_in_order():
    d = stats.paired_differences({2: 5.0, 0: 1.0, 1: float("nan"), 3: 2.0}, {0: 0.5, 1: 1.0, 2: 4.0})
    assert d == {0: 0.5, 2: 1.0}


@pytest.mark.parametrize("n", [2, 3, 6])
def test_t_interval_matches_scipy_ttest_rel(n):
    iv = stats.t_interval([a - b for a, b in zip(A[:n], B[:n])])
    ref = ss.ttest_rel(A[:n], B[:n]).confidence_interval(0.95)
    assert iv.n == n and iv.df == n - 1
    assert iv.lo == pytest.approx(ref.low, rel=1e-12) and iv.hi == pytest.approx(ref.high, rel=1e-12)
    assert iv.estimate == pytest.approx(np.mean(A[:n]) - np.mean(B[:n]), rel=1e-12)


def test_t_interval_at_90_percent_and_too_few_points():
    d = [a - b for a, b in zip(A, B)]
    ref = ss.ttest_rel(A, B).confidence_interval(0.90)
    iv = stats.t_interval(d, 0.90)
    assert (iv.lo, iv.hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    one = stats.t_interval([0.3])
    assert one.estimate == 0.3 and one.lo is None and one.hi is None
    assert stats.t_interval([]).estimate is None


def test_bootstrap_only_from_five_and_reproducible():
    d = [a - b for a, b in zip(A, B)]
    assert stats.bootstrap_interval(d[:4]) is None
    b1, b2 = stats.bootstrap_interval(d), stats.bootstrap_interval(d)
    assert (b1.lo, b1.hi) == (b2.lo, b2.hi)
    ref = ss.bootstrap((np.array(d),), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert (b1.lo, b1.hi) == pytest.approx((ref.low, ref.high), rel=1e-12)
    assert min(d) <= b1.lo < np.mean(d) < b1.hi <= max(d)


def test_slope_interval_matches_linregress_with_n_minus_2_df():
    x = [math.log(p) for p in (508_480, 508_480, 508_480, 1_100_000, 1_100_000, 1_100_000, 2_524_800, 2_524_800, 2_524_800)]
    y = [0.11, 0.09, 0.13, 0.12, 0.15, 0.10, 0.18, 0.16, 0.21]
    iv = stats.slope_interval(x, y)
    fit = ss.linregress(x, y)
    half = ss.t.ppf(0.975, len(x) - 2) * fit.stderr
    assert iv.estimate == pytest.approx(fit.slope, rel=1e-12) and iv.df == 7
    assert (iv.lo, iv.hi) == pytest.approx((fit.slope - half, fit.slope + half), rel=1e-12)
    # the same interval from the OLS formula directly
    xa, ya = np.array(x), np.array(y)
    b = np.sum((xa - xa.mean()) * (ya - ya.mean())) / np.sum((xa - xa.mean()) ** 2)
    resid = ya - (ya.mean() + b * (xa - xa.mean()))
    se = math.sqrt(np.sum(resid**2) / (len(x) - 2) / np.sum((xa - xa.mean()) ** 2))
    assert iv.stderr == pytest.approx(se, rel=1e-10)


def test_slope_without_enough_points():
    assert stats.slope_interval([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]).estimate is None  # one size: no slope
    two = stats.slope_interval([1.0, 2.0], [0.1, 0.3])
    assert two.estimate == pytest.approx(0.2) and two.lo is None
