"""The head-dim-8 attention kernel (rankscope.kernels.causal_attention) against torch's SDPA: the same
outputs and gradients in fp64, NaN still propagating, the model's use of it, its fallback, and compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankscope import model as model_mod
from rankscope.kernels import build
from rankscope.kernels import causal_attention as ca

built = pytest.mark.skipif(ca.extension() is None, reason="the C++ kernel could not be built here (no compiler or ninja)")


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def grads(fn, q, k, v, w):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@built
@pytest.mark.parametrize("B,H,KV,T", [(2, 6, 2, 1), (2, 6, 2, 5), (3, 12, 4, 33), (1, 4, 4, 70), (2, 12, 4, 128)])
def test_kernel_equals_sdpa_in_fp64(B, H, KV, T):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, h, T, 8, generator=g, dtype=torch.float64) for h in (H, KV, KV))
    w = torch.randn(B, H, T, 8, generator=g, dtype=torch.float64)
    assert ca.supported(q, k, v)
    for got, ref in zip(grads(ca.causal_attention, q, k, v, w), grads(sdpa, q, k, v, w)):
        assert (got - ref).abs().max() <= 1e-12


@built
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_keeps_its_accuracy_with_scores_spread_over_thousands(dtype):
    """Scores from about -2,000 to 2,000: the kernel's polynomial exp over its whole range, including the
    clamp where e^(s - max) underflows (fp32 below e^-87, fp64 below e^-708). Against SDPA in fp64: within
    1e-12 of the largest value in fp64, 1e-3 in fp32 (the rounding of such scores; SDPA's own fp32 result
    measured 3.3e-4 here)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 48, 8, generator=g, dtype=torch.float64) for h in (6, 2, 2))
    q, k = q * 40, k * 40
    w = torch.randn(2, 6, 48, 8, generator=g, dtype=torch.float64)
    exact = grads(sdpa, q, k, v, w)
    got = grads(ca.causal_attention, *(t.to(dtype) for t in (q, k, v, w)))
    for a, ref in zip(got, exact):
        err = (a.double() - ref).abs().max().item()
        if dtype == torch.float64:
            assert err <= 1e-12 * ref.abs().max().item()
        else:  # a score near 2,000 carries 2,000 x 2^-24 = 1.2e-4 of rounding: SDPA's own fp32 reached 3.3e-4
            assert err <= 1e-3 * ref.abs().max().item()


@built
def test_kernel_in_fp32_is_within_rounding_of_sdpa_and_propagates_nan():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 64, 8, generator=g) for h in (6, 2, 2))
    w = torch.randn(2, 6, 64, 8, generator=g)
    for got, ref in zip(grads(ca.causal_attention, q, k, v, w), grads(sdpa, q, k, v, w)):
        assert (got - ref).abs().max() <= 1e-5
    for t in (q, k, v):  # fast-math builds must not swallow a NaN: the NaN-loss guard relies on it
        bad = t.clone()
        bad[0, 0, 3, 2] = float("nan")
        args = [bad if x is t else x for x in (q, k, v)]
        assert torch.isnan(ca.causal_attention(*args)).any()


@built
def test_the_model_uses_the_kernel_at_head_dim_8_and_sdpa_otherwise(monkeypatch):
    calls = []
    orig = ca.causal_attention
    monkeypatch.setattr(ca, "causal_attention", lambda *a: calls.append(1) or orig(*a))
    g = torch.Generator().manual_seed(1)
    q8, k8, v8 = (torch.randn(2, h, 16, 8, generator=g) for h in (6, 2, 2))
    model_mod.attention(q8, k8, v8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: fp32 q, k, v reach the kernel
        assert model_mod.attention(q8.bfloat16(), k8.bfloat16(), v8.bfloat16()).dtype == torch.float32
    assert len(calls) == 2
    q16, k16, v16 = (torch.randn(2, h, 16, 16, generator=g) for h in (4, 2, 2))
    assert torch.equal(model_mod.attention(q16, k16, v16), sdpa(q16, k16, v16)) and len(calls) == 2  # head dim 16: SDPA
    monkeypatch.setattr(ca, "ENABLED", False)
    assert torch.equal(model_mod.attention(q8, k8, v8), sdpa(q8, k8, v8)) and len(calls) == 2


def test_without_a_build_the_model_keeps_sdpa(monkeypatch):
    monkeypatch.setitem(build._built, str(ca._SOURCE), None)  # as where the compiler or ninja is missing
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g) for h in (6, 2, 2))
    assert not ca.supported(q, k, v)
    assert torch.equal(model_mod.attention(q, k, v), sdpa(q, k, v))


@built
def test_the_kernel_compiles_into_one_graph_with_its_gradient():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 32, 8, generator=g) for h in (6, 2, 2))
    w = torch.randn(2, 6, 32, 8, generator=g)
    compiled = torch.compile(ca.causal_attention, fullgraph=True)  # a graph break would raise
    for got, ref in zip(grads(compiled, q, k, v, w), grads(ca.causal_attention, q, k, v, w)):
        assert (got - ref).abs().max() <= 1e-6
