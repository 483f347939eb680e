"""GaLore: orthonormal projectors on the right side, the update of the paper's Algorithm 1 on a
hand case, scheduled projector refreshes, bit-exact resume, and a real run that learns."""

import json
import math

import pytest
import torch

from rankscope.store.optimizer_state import optimizer_from_tensors, optimizer_to_tensors
from rankscope.methods import load_config
from rankscope.methods.galore import GaLoreAdamW, galore_projector, projection_side
from rankscope.train.loop import train
from helpers import assert_same_final_weights, crash_and_resume, tiny_overrides


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)])
def test_projector_is_orthonormal_and_spans_the_top_singular_space(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    r = 4
    P = galore_projector(g, r)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    if projection_side(g.shape) == "right":  # m >= n: P is r x n, rows orthonormal
        assert P.shape == (r, shape[1])
        torch.testing.assert_close(P @ P.T, torch.eye(r), atol=1e-5, rtol=0)
        ref = Vh[:r].T @ Vh[:r]
        torch.testing.assert_close(P.T @ P, ref, atol=1e-5, rtol=0)  # same subspace as the top-r right vectors
    else:  # m < n: P is m x r, columns orthonormal
        assert P.shape == (shape[0], r)
        torch.testing.assert_close(P.T @ P, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(P @ P.T, U[:, :r] @ U[:, :r].T, atol=1e-5, rtol=0)


def hand_galore(W, grads, r, lr, b1, b2, eps, scale, wd, gap):
    """Algorithm 1 of the GaLore paper, written out independently (float64)."""
    W = W.double().clone()
    M = V = P = None
    for t, G in enumerate(grads, start=1):
        G = G.double()
        right = G.shape[0] >= G.shape[1]
        if (t - 1) % gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            P = Vh[:r] if right else U[:, :r]
        R = G @ P.T if right else P.T @ G
        M = (1 - b1) * R if M is None else b1 * M + (1 - b1) * R
        V = (1 - b2) * R * R if V is None else b2 * V + (1 - b2) * R * R
        N = M / (V.sqrt() + eps)
        back = N @ P if right else P @ N
        W = W - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * scale * back
        W = W - lr * wd * W
    return W


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_update_equals_projected_adam_of_the_paper(shape):
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) for _ in range(5)]
    w = torch.nn.Parameter(W0.clone())
    opt = GaLoreAdamW([{"params": [w], "galore": True, "weight_decay": 0.1}], lr=0.05, betas=(0.9, 0.95), eps=1e-8, rank=3, update_proj_gap=2, scale=0.25)
    for G in grads:
        w.grad = G.clone()
        opt.step()
    expected = hand_galore(W0, grads, 3, 0.05, 0.9, 0.95, 1e-8, 0.25, 0.1, 2)
    torch.testing.assert_close(w.detach().double(), expected, atol=2e-5, rtol=1e-5)
    low = (shape[0], 3) if shape[0] >= shape[1] else (3, shape[1])
    assert opt.state[w]["exp_avg"].shape == low  # optimiser state lives in the projected space


def test_projector_refreshes_every_gap_steps_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10, 6, generator=gen))
    opt = GaLoreAdamW([{"params": [w], "galore": True}], lr=0.01, rank=2, update_proj_gap=3)
    seen = []
    for _ in range(7):
        w.grad = torch.randn(10, 6, generator=gen)
        opt.step()
        seen.append(opt.state[w]["projector"].clone())
    changes = [i for i in range(1, 7) if not torch.equal(seen[i], seen[i - 1])]
    assert changes == [3, 6]  # refreshed before steps 4 and 7
    tensors, meta = optimizer_to_tensors(opt)
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = GaLoreAdamW([{"params": [w2], "galore": True}], lr=0.01, rank=2, update_proj_gap=3)
    optimizer_from_tensors(opt2, {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))  # as if read from disk
    for _ in range(3):
        g = torch.randn(10, 6, generator=gen)
        w.grad, w2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(w, w2)


def test_galore_run_learns_and_resumes_bit_exactly(data_dir, tmp_path):
    over = tiny_overrides(data_dir, "method.name=galore", "method.galore.rank=4", "method.galore.update_proj_gap=5", "method.galore.galore_scale=1.0",
                          "train.max_steps=20", "checkpoint.every=4")
    summary = train(load_config(None, over), tmp_path / "straight", log=lambda s: None)
    assert summary["galore_rank"] == 4 and summary["galore_projector_bytes"] > 0
    rows = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3
    _, resumed = crash_and_resume(over, tmp_path, crash_at=9)  # "straight" was trained above and is reused
    assert_same_final_weights(tmp_path / "straight", resumed, files=("model", "optimizer"))
