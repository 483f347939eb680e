import math

import numpy as np
import pytest
from scipy import stats as ss

from rankscope.studies import stats

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


# ------------------------------------------------------------------ tests, multiplicity, power (against statsmodels / scipy)
PS = [0.049, 0.012, 0.30, 0.004, 0.049, 0.81]


@pytest.mark.parametrize("name,sm", [("holm", "holm"), ("bh", "fdr_bh")])
def test_holm_and_bh_match_statsmodels(name, sm):
    from statsmodels.stats.multitest import multipletests

    ref = multipletests(PS, method=sm)[1]
    assert stats.CORRECTIONS[name](PS) == pytest.approx(list(ref), rel=1e-12)
    assert stats.holm([0.049, 0.2, 0.5])[0] == pytest.approx(0.147)  # nano's p = 0.049 over three sizes: not < 0.05


def test_t_test_and_tost_match_scipy_and_statsmodels():
    from statsmodels.stats.weightstats import ttost_paired

    d = [a - b for a, b in zip(A, B)]
    assert stats.t_test_p(d) == pytest.approx(ss.ttest_rel(A, B).pvalue, rel=1e-12)
    for sesoi in (0.05, 0.2, 0.5):
        assert stats.tost_p(d, sesoi) == pytest.approx(ttost_paired(np.array(A), np.array(B), -sesoi, sesoi)[0], rel=1e-10)
    assert stats.tost_p(d[:1], 0.1) is None and stats.t_test_p([1.0]) is None


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_minimum_detectable_effect_matches_statsmodels(n):
    from statsmodels.stats.power import TTestPower

    assert stats.mde_sd(n) == pytest.approx(TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-6)
    d = [a - b for a, b in zip(A[:n], B[:n])] if n <= len(A) else None
    if d:
        assert stats.mde(d) == pytest.approx(stats.mde_sd(n) * np.std(d, ddof=1), rel=1e-12)


def test_slope_of_means_uses_one_point_per_group_and_matches_statsmodels_ols():
    from statsmodels.regression.linear_model import OLS
    from statsmodels.tools.tools import add_constant

    groups = {"nano": (12.2, [0.10, 0.30, 0.20]), "micro": (13.1, [0.05, 0.25, 0.12]), "milli": (13.9, [0.40, -0.1, 0.2]),
              "mini": (14.7, [0.3, 0.35, 0.5])}
    fit = stats.slope_of_means(groups)
    x = np.array([v[0] for v in groups.values()])
    y = np.array([np.mean(v[1]) for v in groups.values()])
    ols = OLS(y, add_constant(x)).fit()
    lo, hi = ols.conf_int(0.05)[1]
    assert fit.interval.df == 2 and fit.interval.n == 4
    assert fit.interval.estimate == pytest.approx(ols.params[1]) and (fit.interval.lo, fit.interval.hi) == pytest.approx((lo, hi))
    assert fit.p == pytest.approx(ols.pvalues[1])
    pred = stats.predict_mean(fit, 20.0)
    ref = ols.get_prediction(np.array([[1.0, 20.0]])).summary_frame(alpha=0.05)
    assert pred.estimate == pytest.approx(float(ref["mean"].iloc[0]))
    assert (pred.lo, pred.hi) == pytest.approx((float(ref["mean_ci_lower"].iloc[0]), float(ref["mean_ci_upper"].iloc[0])))
    assert stats.slope_of_means({"a": (1.0, [0.1]), "b": (2.0, [0.2])}).interval.lo is None
