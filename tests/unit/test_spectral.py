"""Rank metrics on matrices whose answer is known, and against a direct numpy SVD."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankscope.analysis.components import Item
from rankscope.spectral import METRICS, AnalysisError, matrix_metrics, principal_angles, resolve_metrics, svdvals_factored
from rankscope.analysis.spectra import analyze_items


def one(mat, name, dtype=torch.float64):
    return float(matrix_metrics(torch.as_tensor(mat), [name], dtype)[name][0])


def reference(W: np.ndarray) -> dict[str, float]:
    """Every metric straight from numpy.linalg.svd, following the formulas in metrics.py."""
    s = np.linalg.svd(W, compute_uv=False)
    m, n = W.shape
    p = s / s.sum()
    nz = p[p > 0]
    erank = math.exp(-(nz * np.log(nz)).sum())
    tol = max(m, n) * np.finfo(W.dtype).eps * s[0]
    above = s[s > tol]
    c = np.sort(np.abs(W).ravel())
    N = c.size
    k = np.arange(1, N + 1)
    return {
        "effective_rank": erank, "per": erank / min(m, n),
        "condition_number": s[0] / s[-1] if s[-1] > 0 else math.inf,
        "condition_number_numerical": s[0] / above.min(), "numerical_rank": float(len(above)),
        "stable_rank": (s**2).sum() / s[0] ** 2, "spectral_norm": s[0], "frobenius_norm": np.linalg.norm(W),
        "nuclear_norm": s.sum(), "gini": 1 - 2 * ((c / c.sum()) * (N - k + 0.5) / N).sum(),
        "hoyer": (math.sqrt(N) - np.abs(W).sum() / np.linalg.norm(W)) / (math.sqrt(N) - 1),
    }


def test_identity_and_diag():
    I = torch.eye(7, dtype=torch.float64)
    assert one(I, "per") == pytest.approx(1.0)
    assert one(I, "effective_rank") == pytest.approx(7.0)
    assert one(I, "condition_number") == pytest.approx(1.0)
    assert one(I, "stable_rank") == pytest.approx(7.0)
    D = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    assert one(D, "condition_number") == pytest.approx(10.0)
    assert one(D, "spectral_norm") == pytest.approx(10.0) and one(D, "nuclear_norm") == pytest.approx(11.0)


def test_rank_k_matrix():
    g = torch.Generator().manual_seed(0)
    k = 3
    W = torch.randn(40, k, generator=g, dtype=torch.float64) @ torch.randn(k, 30, generator=g, dtype=torch.float64)
    assert one(W, "numerical_rank") == k
    assert one(W, "condition_number") > 1e10  # raw: s_min is rounding noise
    cn = one(W, "condition_number_numerical")
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    assert cn == pytest.approx(s[0] / s[k - 1]) and cn < 1e3
    # a rank-1 matrix has effective rank 1; an fp32-stored rank-k matrix keeps rank k under an fp64 SVD
    assert one(torch.outer(torch.arange(1.0, 6.0), torch.ones(4)), "effective_rank") == pytest.approx(1.0, abs=1e-6)
    assert one(W.float(), "numerical_rank", torch.float64) == k


def test_exact_zero_singular_value_gives_inf_and_zero_matrix():
    D = torch.diag(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert math.isinf(one(D, "condition_number"))
    assert one(D, "condition_number_numerical") == pytest.approx(3.0)
    assert one(D, "effective_rank") == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    Z = torch.zeros(4, 5, dtype=torch.float64)
    vals = matrix_metrics(Z)
    assert vals["effective_rank"][0] == 0 and vals["numerical_rank"][0] == 0 and vals["stable_rank"][0] == 0
    assert all(math.isnan(vals[k][0]) for k in ("condition_number", "condition_number_numerical", "gini", "hoyer"))


def test_gini_hoyer_known_values():
    flat = torch.ones(4, 4, dtype=torch.float64)
    onehot = torch.zeros(4, 4, dtype=torch.float64)
    onehot[1, 2] = 5.0
    assert one(flat, "gini") == pytest.approx(0.0, abs=1e-12) and one(flat, "hoyer") == pytest.approx(0.0, abs=1e-12)
    assert one(onehot, "gini") == pytest.approx(1 - 1 / 16) and one(onehot, "hoyer") == pytest.approx(1.0)


def mp_expected_per(c: float, grid: int = 400_001) -> float:
    """PER limit of an m x n Gaussian matrix, c = min/max <= 1, from the Marchenko-Pastur law of
    lambda = sigma^2: sigma has density sqrt((b - s^2)(s^2 - a)) / (pi c s) on [sqrt a, sqrt b],
    a, b = (1 -+ sqrt c)^2. With p_i = s_i / sum s, PER -> E[s] exp(-E[s ln s] / E[s])."""
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    s = np.linspace(math.sqrt(a), math.sqrt(b), grid)[1:-1]
    dens = np.sqrt(np.clip((b - s**2) * (s**2 - a), 0, None)) / (math.pi * c * s)
    dens /= np.trapezoid(dens, s)
    Es, Eslogs = np.trapezoid(s * dens, s), np.trapezoid(s * np.log(s) * dens, s)
    return float(Es * math.exp(-Eslogs / Es))


@pytest.mark.parametrize("m,n", [(400, 400), (600, 200)])
def test_gaussian_per_matches_marchenko_pastur(m, n):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    expected = mp_expected_per(min(m, n) / max(m, n))
    assert one(W, "per") == pytest.approx(expected, rel=0.02)
    if m == n:
        assert expected == pytest.approx(0.82, abs=0.02)  # square case: quarter-circle law


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), seed=st.integers(0, 10_000), rank=st.integers(1, 12))
def test_every_metric_matches_numpy(m, n, seed, rank):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, min(rank, m, n))) @ rng.standard_normal((min(rank, m, n), n))
    ref = reference(W)
    got = {k: float(v[0]) for k, v in matrix_metrics(torch.from_numpy(W)).items()}
    assert set(got) == set(METRICS)
    for name, want in ref.items():
        if name == "condition_number" and (want > 1e8 or got[name] > 1e8):
            continue  # rank-deficient: both are noise-dominated
        assert got[name] == pytest.approx(want, rel=1e-6, abs=1e-9), name


def test_batched_equals_one_by_one_and_factored_equals_dense():
    g = torch.Generator().manual_seed(2)
    dense = [torch.randn(24, 16, generator=g) for _ in range(5)]
    A = [torch.randn(24, 4, generator=g) for _ in range(3)]
    B = [torch.randn(4, 24, generator=g) for _ in range(3)]
    items = [Item(i, "wq", -1, "weight", mat=d) for i, d in enumerate(dense)]
    items += [Item(i, "ov", i, "weight", factors=(a, b)) for i, (a, b) in enumerate(zip(A, B))]
    items += [Item(9, "wo", -1, "weight", mat=a @ b) for a, b in zip(A, B)]
    res = analyze_items(items)
    for r, d in zip(res[:5], dense):
        single = matrix_metrics(d)
        for k, v in single.items():
            assert r.values[k] == pytest.approx(float(v[0]), rel=1e-9, nan_ok=True)
    for fac, den in zip(res[5:8], res[8:]):
        np.testing.assert_allclose(fac.s[:4], den.s[:4], rtol=1e-5)
        assert np.all(fac.s[4:] == 0) and fac.values["numerical_rank"] == den.values["numerical_rank"] == 4
        for k in ("per", "stable_rank", "condition_number_numerical", "gini", "hoyer", "frobenius_norm"):
            assert fac.values[k] == pytest.approx(den.values[k], rel=1e-4), k
        assert math.isinf(fac.values["condition_number"])  # exact zeros from the factored path
    np.testing.assert_allclose(svdvals_factored(A[0][None], B[0][None])[0, :4].numpy(), np.linalg.svd((A[0] @ B[0]).double().numpy(), compute_uv=False)[:4], rtol=1e-5)


def test_fp32_option_close_to_fp64():
    W = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    a, b = matrix_metrics(W, ["per", "condition_number"], torch.float32), matrix_metrics(W, ["per", "condition_number"], torch.float64)
    assert float(a["per"][0]) == pytest.approx(float(b["per"][0]), rel=1e-5)
    assert float(a["condition_number"][0]) == pytest.approx(float(b["condition_number"][0]), rel=1e-3)


def test_principal_angles():
    g = torch.Generator().manual_seed(4)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64)).Q
    X = Q[:, :3] @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    same = principal_angles(X, 5 * X, 3)
    assert torch.allclose(same, torch.zeros(1, 3, dtype=torch.float64), atol=1e-6)
    Y = Q[:, 3:6] @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    assert torch.allclose(principal_angles(X, Y, 3), torch.full((1, 3), math.pi / 2, dtype=torch.float64), atol=1e-6)
    # one shared direction, one at 60 degrees (in the plane of e0 and e3)
    e = torch.eye(6, dtype=torch.float64)
    U1, U2 = torch.stack([e[0], e[1]], 1), torch.stack([0.5 * e[0] + math.sqrt(3) / 2 * e[3], e[1]], 1)
    ang = torch.rad2deg(principal_angles(U1 @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64)), U2, 2))[0]
    assert ang.tolist() == pytest.approx([0.0, 60.0], abs=1e-6)
    assert principal_angles(X.T, Y.T, 3, side="right").shape == (1, 3)


def test_unknown_metric_lists_valid():
    with pytest.raises(AnalysisError, match="valid metrics: .*per"):
        resolve_metrics(["nope"])
