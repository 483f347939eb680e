"""Rank metrics of matrices, computed from batched singular values and registered by name.

A metric is `fn(spec: Spectra) -> Tensor (B,)` on a batch of B same-shape m x n matrices, whose
singular values `spec.s` (B, k), k = min(m, n), are sorted descending. The formulas, exactly as
computed (Weiss et al. 2025, §3 "rank metrics"; Roy & Vetterli 2007 for the effective rank):

  effective_rank              exp(H(p)), p_i = s_i / sum_j s_j, H(p) = -sum_i p_i ln p_i (0 ln 0 := 0)
  per                         effective_rank / min(m, n)   (proportional effective rank)
  condition_number            s_max / s_min over all k singular values; inf when s_min == 0
  condition_number_numerical  s_max / (smallest s_i > tol): the condition number of the matrix
                              restricted to its numerical rank, tol = max(m, n) * eps * s_max
                              (numpy.linalg.matrix_rank's rule), eps the machine epsilon of the coarser
                              of the SVD dtype and the dtype the matrix is stored in: an fp32 rank-16
                              update decomposed in fp64 has numerical rank 16, not min(m, n)
  numerical_rank              #{i : s_i > tol}
  rank_deficient              1 if s_min <= tol (the raw s_min sits at the rounding floor: numerical rank
                              < min(m, n), so `condition_number` measures floating point), else 0
  stable_rank                 ||W||_F^2 / ||W||_2^2 = sum s_i^2 / s_max^2
  spectral_norm, frobenius_norm, nuclear_norm     s_max, sqrt(sum s_i^2), sum s_i
  rank_bound                  the rank the matrix's construction allows, / min(m, n): the ceiling of
                              PER (effective_rank <= numerical rank <= that bound). r / min(m, n) for a
                              rank-r LoRA or cycle update, k*r / min(m, n) for an update made of k
                              rank-r pieces, hd / d for ov_product, min(tokens, m, n) / min(m, n) for a
                              gradient, 1 where nothing bounds it (the analysis items set it)
  gini                        Hurley & Rickard (2009) sparsity of the entries: with |w| sorted ascending
                              c_1..c_N, 1 - 2 sum_k (c_k / ||c||_1) (N - k + 1/2) / N; 0 = all equal
  hoyer                       (sqrt(N) - ||w||_1 / ||w||_2) / (sqrt(N) - 1); 0 = all equal, 1 = one-hot

The zero matrix: effective_rank, per, numerical_rank and stable_rank are 0; the condition numbers,
gini and hoyer are NaN (undefined). Singular values below tol are kept in the entropy (they carry
almost no mass); exact zeros contribute 0.

`principal_angles(X, Y, r)` gives the angles between the top-r left (or right) singular subspaces of
two batches of matrices, e.g. consecutive ReLoRA cycle updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from rankscope.core.errors import RankscopeError


class AnalysisError(RankscopeError):
    """An analysis request is wrong (unknown metric, unreadable run)."""


@dataclass
class Spectra:
    """Singular values (B, k) of B matrices of shape (m, n), and their entries when needed."""

    s: torch.Tensor  # (B, k) descending, fp64 for the metric arithmetic
    m: int
    n: int
    eps: float  # machine epsilon of the coarser of the SVD dtype and the stored dtype
    entries: Callable[[], torch.Tensor] | None = None  # () -> (B, m, n), built only for entry metrics
    bound: torch.Tensor | None = None  # (B,) rank bounds by construction; None: min(m, n)

    @property
    def tol(self) -> torch.Tensor:  # (B,)
        return max(self.m, self.n) * self.eps * self.s[:, 0]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Spectra], torch.Tensor]
    needs_entries: bool
    help: str


METRICS: dict[str, Metric] = {}


def register_metric(name: str, needs_entries: bool = False):
    """`@register_metric("per")` adds `fn(spec) -> (B,)` under that name."""

    def wrap(fn):
        METRICS[name] = Metric(name, fn, needs_entries, (fn.__doc__ or "").strip())
        return fn

    return wrap


def resolve_metrics(names: list[str] | None) -> list[Metric]:
    """The named metrics (all when None); an unknown name lists the valid ones."""
    if names is None:
        return list(METRICS.values())
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise AnalysisError(f"unknown metric(s) {', '.join(bad)}; valid metrics: {', '.join(METRICS)}")
    return [METRICS[n] for n in names]


# --------------------------------------------------------------------------- spectral metrics
@register_metric("effective_rank")
def effective_rank(spec: Spectra) -> torch.Tensor:
    """exp of the entropy of s / sum(s); 0 for the zero matrix"""
    total = spec.s.sum(-1, keepdim=True)
    p = spec.s / total.clamp_min(torch.finfo(spec.s.dtype).tiny)
    h = -torch.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0: exact zeros contribute nothing
    return torch.where(total[:, 0] > 0, h.exp(), torch.zeros_like(h))


@register_metric("per")
def per(spec: Spectra) -> torch.Tensor:
    """proportional effective rank: effective_rank / min(m, n)"""
    return effective_rank(spec) / min(spec.m, spec.n)


@register_metric("condition_number")
def condition_number(spec: Spectra) -> torch.Tensor:
    """s_max / s_min over the full spectrum; inf when s_min == 0, NaN for the zero matrix"""
    smax, smin = spec.s[:, 0], spec.s[:, -1]
    out = smax / smin  # x / 0 = inf for x > 0
    return torch.where(smax > 0, out, torch.full_like(out, math.nan))


@register_metric("condition_number_numerical")
def condition_number_numerical(spec: Spectra) -> torch.Tensor:
    """s_max / smallest singular value above tol = max(m, n) * eps * s_max; NaN for the zero matrix"""
    above = spec.s > spec.tol[:, None]
    smallest = torch.where(above, spec.s, torch.full_like(spec.s, math.inf)).amin(-1)
    smax = spec.s[:, 0]
    return torch.where(smax > 0, smax / smallest, torch.full_like(smax, math.nan))


@register_metric("numerical_rank")
def numerical_rank(spec: Spectra) -> torch.Tensor:
    """number of singular values above tol = max(m, n) * eps * s_max"""
    return ((spec.s > spec.tol[:, None]) & (spec.s > 0)).sum(-1).to(spec.s.dtype)


@register_metric("rank_deficient")
def rank_deficient(spec: Spectra) -> torch.Tensor:
    """1 where the smallest singular value is at or below tol = max(m, n) * eps * s_max (numerical rank < min(m, n)), else 0"""
    return (spec.s[:, -1] <= spec.tol).to(spec.s.dtype)


@register_metric("rank_bound")
def rank_bound(spec: Spectra) -> torch.Tensor:
    """the rank the matrix's construction allows, / min(m, n): the ceiling of PER; 1 when unbounded"""
    k = min(spec.m, spec.n)
    if spec.bound is None:
        return torch.ones(spec.s.shape[0], dtype=torch.float64, device=spec.s.device)
    return spec.bound.to(torch.float64).clamp(max=k) / k


@register_metric("stable_rank")
def stable_rank(spec: Spectra) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2; 0 for the zero matrix"""
    smax2 = spec.s[:, 0] ** 2
    return torch.where(smax2 > 0, (spec.s**2).sum(-1) / smax2.clamp_min(torch.finfo(spec.s.dtype).tiny), torch.zeros_like(smax2))


@register_metric("spectral_norm")
def spectral_norm(spec: Spectra) -> torch.Tensor:
    """largest singular value"""
    return spec.s[:, 0].clone()


@register_metric("frobenius_norm")
def frobenius_norm(spec: Spectra) -> torch.Tensor:
    """sqrt of the sum of squared singular values"""
    return spec.s.pow(2).sum(-1).sqrt()


@register_metric("nuclear_norm")
def nuclear_norm(spec: Spectra) -> torch.Tensor:
    """sum of singular values"""
    return spec.s.sum(-1)


# --------------------------------------------------------------------------- entry metrics
@register_metric("gini", needs_entries=True)
def gini(spec: Spectra) -> torch.Tensor:
    """Hurley-Rickard Gini index of |entries|: 0 all equal, 1 - 1/N one-hot; NaN for zeros"""
    c = spec.entries().flatten(1).abs().to(torch.float64).sort(-1).values  # (B, N) ascending
    N = c.shape[1]
    k = torch.arange(1, N + 1, dtype=c.dtype, device=c.device)
    l1 = c.sum(-1)
    g = 1 - 2 * ((c / l1.clamp_min(1e-300)[:, None]) * ((N - k + 0.5) / N)).sum(-1)
    return torch.where(l1 > 0, g, torch.full_like(g, math.nan))


@register_metric("hoyer", needs_entries=True)
def hoyer(spec: Spectra) -> torch.Tensor:
    """Hoyer sparsity (sqrt(N) - l1/l2) / (sqrt(N) - 1) of the entries; NaN for zeros"""
    w = spec.entries().flatten(1).to(torch.float64)
    N = w.shape[1]
    l1, l2 = w.abs().sum(-1), w.norm(dim=-1)
    h = (math.sqrt(N) - l1 / l2.clamp_min(1e-300)) / (math.sqrt(N) - 1)
    return torch.where(l2 > 0, h, torch.full_like(h, math.nan))


# --------------------------------------------------------------------------- singular values
def svdvals(mats: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Batched singular values (B, min(m, n)), descending, computed in `dtype`."""
    return torch.linalg.svdvals(mats.to(dtype))


def svdvals_factored(A: torch.Tensor, Bm: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of A @ Bm, A (B, m, r), Bm (B, r, n), r <= min(m, n), without forming it:
    A = Qa Ra, Bm^T = Qb Rb  =>  A Bm = Qa (Ra Rb^T) Qb^T, so s(A Bm) = s(Ra Rb^T) (r x r), then
    zero-padded to min(m, n). Used for OV circuits (rank <= head_dim) and LoRA updates (rank <= r)."""
    m, r, n = A.shape[1], A.shape[2], Bm.shape[2]
    if r > min(m, n):
        return svdvals(A.to(dtype) @ Bm.to(dtype), dtype)
    Ra = torch.linalg.qr(A.to(dtype), mode="r").R  # (B, r, r)
    Rb = torch.linalg.qr(Bm.to(dtype).transpose(1, 2), mode="r").R  # (B, r, r)
    s = torch.linalg.svdvals(Ra @ Rb.transpose(1, 2))  # (B, r)
    return torch.nn.functional.pad(s, (0, min(m, n) - r))


def working_eps(stored: torch.dtype, svd: torch.dtype) -> float:
    """Machine epsilon of the coarser of the stored and the SVD dtype (the numerical-rank tolerance)."""
    eps = torch.finfo(svd).eps
    return max(eps, torch.finfo(stored).eps) if stored.is_floating_point else eps


def compute(spec: Spectra, metrics: list[Metric]) -> dict[str, torch.Tensor]:
    """Every metric on one batch: name -> (B,) fp64."""
    return {mt.name: mt.fn(spec).to(torch.float64) for mt in metrics}


def matrix_metrics(mats: torch.Tensor, names: list[str] | None = None, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Convenience: metrics of a stack (B, m, n) (or one matrix (m, n)) of matrices."""
    if mats.dim() == 2:
        mats = mats[None]
    s = svdvals(mats, dtype)
    spec = Spectra(s.to(torch.float64), mats.shape[1], mats.shape[2], working_eps(mats.dtype, dtype), lambda: mats)
    return compute(spec, resolve_metrics(names))


# --------------------------------------------------------------------------- subspaces
def principal_angles(X: torch.Tensor, Y: torch.Tensor, r: int, side: str = "left", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Principal angles (radians, ascending) between the top-r left ('left') or right ('right')
    singular subspaces of X and Y, batched (B, m, n) or single (m, n): arccos of the singular values
    of U_X^T U_Y (Björck & Golub 1973). 0 = same subspace, pi/2 = orthogonal."""
    if side not in ("left", "right"):
        raise AnalysisError(f"side must be 'left' or 'right', got {side!r}")
    X, Y = (X[None], Y[None]) if X.dim() == 2 else (X, Y)
    if side == "right":
        X, Y = X.transpose(-1, -2), Y.transpose(-1, -2)
    r = min(r, X.shape[-1], X.shape[-2])
    Ux = torch.linalg.svd(X.to(dtype), full_matrices=False).U[..., :r]  # (B, m, r)
    Uy = torch.linalg.svd(Y.to(dtype), full_matrices=False).U[..., :r]
    cos = torch.linalg.svdvals(Ux.transpose(-1, -2) @ Uy).clamp(0.0, 1.0)  # (B, r) descending
    return torch.arccos(cos)
