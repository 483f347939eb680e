"""SO (sparse optimisation): exact density, scheduled re-draws, moment carry-over, AdamW at density 1,
bit-exact resume, and a real run that learns."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rankscope.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from rankscope.config import load_config
from rankscope.methods.sparse import SparseAdamW, draw_support, support_size
from rankscope.train import train
from helpers import assert_same_final_weights, crash_and_resume, tiny_overrides


def quadratic_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 20, generator=g)
    target = torch.randn(12, 20, generator=g)
    return w, target


def run_steps(opt, params, target, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((p - target) ** 2).sum() for p in params)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_support_has_exactly_round_density_numel_entries_and_only_they_change(density):
    w0, target = quadratic_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = SparseAdamW([{"params": [w], "sparse": True}], lr=1e-2, density=density, support_every=3, weight_decay=0.1)
    run_steps(opt, [w], target, 1)
    st = opt.state[w]
    k = round(density * w.numel())
    assert st["support"].numel() == st["exp_avg"].numel() == st["exp_avg_sq"].numel() == k == support_size(w.numel(), density)
    assert st["support"].dtype == torch.long and st["support"].unique().numel() == k
    changed = (w.detach() != w0).view(-1).nonzero().view(-1)
    assert set(changed.tolist()) <= set(st["support"].tolist())  # local sparsity: nothing off the support moves


def test_supports_are_redrawn_on_schedule_and_moments_of_staying_entries_carry_over():
    w0, target = quadratic_problem()
    w = torch.nn.Parameter(w0.clone())
    T = 4
    opt = SparseAdamW([{"params": [w], "sparse": True}], lr=1e-2, density=0.2, support_every=T, moment_keep=0.5, seed=7)
    supports, moments = [], []
    union = set()
    for step in range(1, 3 * T + 1):
        run_steps(opt, [w], target, 1)
        st = opt.state[w]
        supports.append(st["support"].clone())
        moments.append(dict(zip(st["support"].tolist(), st["exp_avg"].tolist())))
        union |= set(st["support"].tolist())
    # the support is constant within a period and changes exactly at steps T+1, 2T+1 (re-drawn before them)
    for i in range(1, len(supports)):
        same = torch.equal(supports[i], supports[i - 1])
        assert same == (i % T != 0), i
    # global importance: the moment_keep * k entries of largest |m| survive the re-draw
    k = supports[0].numel()
    old = moments[T - 1]
    top = sorted(old, key=lambda i: -abs(old[i]))[: round(0.5 * k)]
    assert set(top) <= set(supports[T].tolist())
    # global density: the union of supports covers more than one support
    assert len(union) > k
    # deterministic: the same seed draws the same supports
    w2 = torch.nn.Parameter(w0.clone())
    opt2 = SparseAdamW([{"params": [w2], "sparse": True}], lr=1e-2, density=0.2, support_every=T, moment_keep=0.5, seed=7)
    run_steps(opt2, [w2], target, 3 * T)
    assert torch.equal(opt2.state[w2]["support"], supports[-1]) and torch.equal(w2, w)


def test_redraw_carries_moments_of_entries_that_stay():
    # hand case: old support {0, 1, 2, 3}, |m| largest at 2 and 0 (kept with moment_keep = 0.5)
    w = torch.nn.Parameter(torch.zeros(2, 5))
    opt = SparseAdamW([{"params": [w], "sparse": True}], density=0.4, support_every=1, moment_keep=0.5)
    opt.state[w].update({"support": torch.tensor([0, 1, 2, 3]), "exp_avg": torch.tensor([-3.0, 0.1, 5.0, 0.2]),
                         "exp_avg_sq": torch.tensor([9.0, 1.0, 25.0, 4.0]), "step": torch.tensor(1.0)})
    opt.refresh(w, opt.param_groups[0], 0, 1)
    st = opt.state[w]
    sup = st["support"].tolist()
    assert len(sup) == 4 and 0 in sup and 2 in sup and sup == sorted(sup)
    old_m, old_v = {0: -3.0, 1: 0.1, 2: 5.0, 3: 0.2}, {0: 9.0, 1: 1.0, 2: 25.0, 3: 4.0}
    for i, m, v in zip(sup, st["exp_avg"].tolist(), st["exp_avg_sq"].tolist()):
        assert (m, v) == ((pytest.approx(old_m[i]), pytest.approx(old_v[i])) if i in old_m else (0.0, 0.0))


def test_draw_support_excludes_kept_and_has_k_entries():
    g = torch.Generator().manual_seed(0)
    keep = torch.tensor([3, 17, 40])
    s = draw_support(50, 10, keep, g)
    assert s.numel() == 10 and s.unique().numel() == 10 and set(keep.tolist()) <= set(s.tolist())


def test_density_one_equals_torch_adamw():
    w0, target = quadratic_problem()
    b0 = torch.randn(20)
    a, ab = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    b, bb = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
    ref = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [ab], "weight_decay": 0.0}], lr=3e-2, betas=(0.9, 0.95), foreach=False)
    so = SparseAdamW([{"params": [b], "weight_decay": 0.1, "sparse": True}, {"params": [bb], "weight_decay": 0.0}],
                     lr=3e-2, betas=(0.9, 0.95), density=1.0, support_every=1000)
    for _ in range(15):
        run_steps(ref, [a, ab], target, 1)
        run_steps(so, [b, bb], target, 1)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bb, ab, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(so.state[b]["exp_avg"], ref.state[a]["exp_avg"].view(-1), rtol=1e-6, atol=1e-8)


def test_state_round_trips_through_checkpoint_tensors_with_int64_supports():
    w0, target = quadratic_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = SparseAdamW([{"params": [w], "sparse": True}], lr=1e-2, density=0.3, support_every=2, moment_keep=0.5)
    run_steps(opt, [w], target, 3)
    tensors, meta = optimizer_to_tensors(opt)
    meta = json.loads(json.dumps(meta))  # non-tensor state must survive JSON
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = SparseAdamW([{"params": [w2], "sparse": True}], lr=1e-2, density=0.3, support_every=2, moment_keep=0.5)
    optimizer_from_tensors(opt2, {k: v.clone() for k, v in tensors.items()}, meta)
    assert opt2.state[w2]["support"].dtype == torch.long
    for k in ("support", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[w2][k], opt.state[w][k]), k
    run_steps(opt, [w], target, 4)
    run_steps(opt2, [w2], target, 4)
    assert torch.equal(w, w2)


def test_so_run_learns_and_resumes_bit_exactly(data_dir, tmp_path):
    # re-draws after steps 5, 10, 15; checkpoint at 8 (mid-period), crash at 9
    over = tiny_overrides(data_dir, "method.name=so", "method.density=0.1", "method.support_every=5", "method.moment_keep=0.25",
                          "train.max_steps=20", "checkpoint.every=4")
    summary = train(load_config(None, over), tmp_path / "straight", log=lambda s: None)
    assert summary["optimizer_state_bytes"] > 0 and summary["so_density"] == 0.1
    rows = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3
    assert [r["so_support_refresh"] for r in rows if "so_support_refresh" in r] == [1, 2, 3, 4]
    _, resumed = crash_and_resume(over, tmp_path, crash_at=9)  # "straight" was trained above and is reused
    assert_same_final_weights(tmp_path / "straight", resumed, files=("model", "optimizer"))
    opt = load_file(str(tmp_path / "straight/checkpoints/step_000020/optimizer.safetensors"))
    supports = [k for k in opt if k.endswith(".support")]
    assert supports and all(opt[k].dtype == torch.int64 for k in supports)
