"""SO (sparse optimisation). `so` (SOAdam, the authors' algorithm): an independent float64 mask-based
reimplementation, the row-pairing regression, how many entries move, momentum-only moves, k = 0,
Adam at density 1, exact state accounting. `so_single` (SparseAdamW): exact density, scheduled re-draws,
moment carry-over, AdamW at density 1. Both: bit-exact resume across a re-draw, and a real run that learns."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rankscope.store.optimizer_state import optimizer_from_tensors, optimizer_to_tensors
from rankscope.methods import load_config
from rankscope.core.errors import ConfigError
from rankscope.methods import build_method
from rankscope.adapters.common import seeded_generator
from rankscope.methods.memory import match_memory, measured_state_bytes
from rankscope.methods.sparse import SOAdam, SparseAdamW, draw_gradient_support, draw_support, member, so_state_bytes, support_size
from rankscope.model import Decoder
from rankscope.optim import optimizer_state_bytes
from rankscope.train.loop import train
from helpers import assert_same_final_weights, crash_and_resume, tiny_config, tiny_overrides

CYCLE = ["method.relora.reset_every=10", "method.relora.restart_warmup_steps=1"]  # ReLoRA cycles that fit a tiny run


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


@pytest.mark.parametrize("name", ["so", "so_single"])
def test_so_run_learns_and_resumes_bit_exactly(data_dir, tmp_path, name):
    # re-draws before steps 6, 11, 16; checkpoint at 8 (mid-period), crash after step 11: the resumed
    # run redoes steps 9-11, with the re-draw before step 11 inside that span
    over = tiny_overrides(data_dir, f"method.name={name}", f"method.{name}.density=0.1", f"method.{name}.support_every=5",
                          "method.so_single.moment_keep=0.25",
                          "train.max_steps=20", "checkpoint.every=4")
    summary = train(load_config(None, over), tmp_path / "straight", log=lambda s: None)
    assert summary["optimizer_state_bytes"] > 0 and summary["so_density"] == 0.1
    rows = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3
    assert [r["so_support_refresh"] for r in rows if "so_support_refresh" in r] == [1, 2, 3, 4]
    _, resumed = crash_and_resume(over, tmp_path, crash_at=11)  # "straight" was trained above and is reused
    assert_same_final_weights(tmp_path / "straight", resumed, files=("model", "optimizer"))
    opt = load_file(str(tmp_path / "straight/checkpoints/step_000020/optimizer.safetensors"))
    supports = [k for k in opt if k.endswith(".support")]
    assert supports and all(opt[k].dtype == torch.int64 for k in supports)


# --------------------------------------------------------------------------- so: the authors' algorithm
class MaskSO:
    """The authors' SO written independently with boolean masks over each whole tensor, in float64:
    G drawn every T steps (torch.randperm from seeded_generator(seed, 5, period, index), the
    documented draw), U = M | G, zero gradient on M \\ G, Adam on U, then M = top-k of |m| on U
    (ties to the lower index, by a Python sort); moments outside the new M are dropped."""

    def __init__(self, w, index, density, T, seed, lr, betas, eps, wd, mode):
        self.w = w.detach().double().clone().view(-1)
        self.n = self.w.numel()
        self.k = int(density * self.n)
        self.index, self.T, self.seed, self.lr, (self.b1, self.b2), self.eps, self.wd, self.mode = index, T, seed, lr, betas, eps, wd, mode
        self.m, self.v = torch.zeros(self.n, dtype=torch.float64), torch.zeros(self.n, dtype=torch.float64)
        self.M, self.G, self.t = torch.zeros(self.n, dtype=torch.bool), None, 0

    def step(self, grad):
        if self.t % self.T == 0:
            perm = torch.randperm(self.n, generator=seeded_generator(self.seed, 5, self.t // self.T, self.index))
            self.G = torch.zeros(self.n, dtype=torch.bool)
            self.G[perm[: self.k]] = True
        U = self.M | self.G
        g = grad.double().view(-1)
        if self.mode == "coupled":
            g = g + self.wd * self.w
        g = torch.where(self.G, g, torch.zeros_like(g))
        if self.mode == "decoupled":
            self.w = torch.where(U, self.w * (1 - self.lr * self.wd), self.w)
        self.m = torch.where(U, self.b1 * self.m + (1 - self.b1) * g, self.m)
        self.v = torch.where(U, self.b2 * self.v + (1 - self.b2) * g * g, self.v)
        self.t += 1
        m_hat, v_hat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
        self.w = torch.where(U, self.w - self.lr * m_hat / (v_hat.sqrt() + self.eps), self.w)
        score = self.m.abs().tolist()
        top = sorted((i for i in range(self.n) if U[i]), key=lambda i: (-score[i], i))[: self.k]
        self.M = torch.zeros(self.n, dtype=torch.bool)
        self.M[top] = True
        self.m, self.v = torch.where(self.M, self.m, 0.0), torch.where(self.M, self.v, 0.0)


def so_state_as_dense(st, n):
    """(M mask, m, v) of an SOAdam state, scattered into whole tensors."""
    k = st["grad_support"].numel()
    ids = st["support"][:k]
    M = torch.zeros(n, dtype=torch.bool)
    M[ids] = True
    m, v = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    m[ids], v[ids] = st["exp_avg"][:k].double(), st["exp_avg_sq"][:k].double()
    return M, m, v


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_so_matches_an_independent_float64_mask_implementation_over_30_steps(mode):
    g = torch.Generator().manual_seed(1)
    shapes, T, density, seed, lr, betas, wd = [(12, 20), (7, 9), (16, 4)], 4, 0.15, 11, 1e-2, (0.9, 0.999), 0.05
    bias = torch.nn.Parameter(torch.randn(5, generator=g))
    ws = [torch.nn.Parameter(0.1 * torch.randn(*s, generator=g)) for s in shapes]
    opt = SOAdam([{"params": [bias]}, {"params": ws, "sparse": True}], lr=lr, betas=betas, weight_decay=wd, weight_decay_mode=mode,
                 density=density, support_every=T, seed=seed)
    refs = [MaskSO(w, 1 + i, density, T, seed, lr, betas, 1e-8, wd, mode) for i, w in enumerate(ws)]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(30)]  # fixed, independent of the weights
    widest = 0
    for step in range(30):
        bias.grad = torch.randn(5, generator=g)
        for w, ref, gr in zip(ws, refs, grads[step]):
            w.grad = gr.clone()
            widest = max(widest, int((ref.M | ref.G).sum()) - ref.k if ref.G is not None and ref.t % T else 0)
            ref.step(gr)
        opt.step()
        for w, ref in zip(ws, refs):
            st = opt.state[w]
            M, m, v = so_state_as_dense(st, w.numel())
            assert torch.equal(M, ref.M), step
            assert torch.equal(torch.sort(st["grad_support"]).values, ref.G.nonzero().view(-1)), step
            torch.testing.assert_close(w.detach().double().view(-1), ref.w, rtol=0, atol=1e-6)
            torch.testing.assert_close(m, ref.m, rtol=1e-5, atol=1e-7)  # float32 moments of O(1) gradients
            torch.testing.assert_close(v, ref.v, rtol=1e-5, atol=1e-9)
    # the run crossed re-draws (every 4 steps), after which M u G held more than k entries
    assert all(ref.t == 30 and ref.k == int(density * ref.n) for ref in refs) and widest > 0


def test_so_pairs_each_gradient_with_its_own_moment_on_one_row():
    # the reference code pairs G and M entries by two chained unstable sorts (row, then column);
    # on a one-row weight every overlap shares its row, the case that mispairs there. Here every
    # persisted moment must be b1 * (its own previous m) + (1 - b1) * (its own gradient).
    w = torch.nn.Parameter(torch.zeros(1, 40))
    b1, b2 = 0.9, 0.999
    opt = SOAdam([{"params": [w], "sparse": True}], lr=1e-3, betas=(b1, b2), density=0.25, support_every=1, seed=3)
    grad = (torch.arange(40, dtype=torch.float32) + 1) * torch.tensor([1.0, -1.0]).repeat(20)  # a distinct gradient per entry
    overlaps, unsorted = 0, 0
    prev_m, prev_v = {}, {}
    for t in range(8):
        perm = torch.randperm(40, generator=seeded_generator(3, 5, t, 0))[:10]
        unsorted += int(not torch.equal(perm, torch.sort(perm).values))
        G = set(perm.tolist())
        overlaps = max(overlaps, len(G & set(prev_m)))
        w.grad = grad.view(1, 40).clone()
        opt.step()
        st = opt.state[w]
        ids, m, v = st["support"][:10].tolist(), st["exp_avg"][:10].tolist(), st["exp_avg_sq"][:10].tolist()
        for i, mi, vi in zip(ids, m, v):
            gi = grad[i].item() if i in G else 0.0
            assert mi == pytest.approx(b1 * prev_m.get(i, 0.0) + (1 - b1) * gi, rel=1e-6), (t, i)
            assert vi == pytest.approx(b2 * prev_v.get(i, 0.0) + (1 - b2) * gi * gi, rel=1e-6), (t, i)
        prev_m, prev_v = dict(zip(ids, m)), dict(zip(ids, v))
    assert overlaps >= 2 and unsorted == 8  # the case the reference code gets wrong did occur
    pos, found = member(torch.tensor([2, 5, 9, 30]), torch.tensor([30, 9, 1, 2]))
    assert found.tolist() == [True, True, False, True] and pos[found].tolist() == [3, 2, 0]


def test_so_moves_at_most_2k_entries_and_exactly_k_while_m_equals_g():
    w0, target = quadratic_problem()
    w = torch.nn.Parameter(w0.clone())
    T, k = 5, int(0.1 * w0.numel())
    opt = SOAdam([{"params": [w], "sparse": True}], lr=1e-2, density=0.1, support_every=T, seed=2)
    moved_counts, prev_M = [], []
    for step in range(3 * T):
        before = w.detach().clone()
        run_steps(opt, [w], target, 1)
        st = opt.state[w]
        moved = (w.detach() != before).view(-1)
        union = set(st["grad_support"].tolist()) | set(prev_M) if step else set(st["grad_support"].tolist())
        assert set(moved.nonzero().view(-1).tolist()) == union, step  # exactly the entries of M u G move
        moved_counts.append(int(moved.sum()))
        prev_M = st["support"][:k].tolist()
    assert moved_counts[:T] == [k] * T  # first period: M = G, k entries
    assert all(k <= c <= 2 * k for c in moved_counts) and max(moved_counts) > k  # after re-draws: M u G, up to 2k
    assert opt.state[w]["exp_avg"].numel() == 2 * k  # what is allocated: 2k moment slots


def test_so_entry_in_m_not_in_g_moves_on_momentum_alone():
    w = torch.nn.Parameter(torch.zeros(4, 5))
    b1, b2, lr, eps = 0.9, 0.999, 1e-2, 1e-8
    opt = SOAdam([{"params": [w], "sparse": True}], lr=lr, betas=(b1, b2), eps=eps, density=0.2, support_every=1, seed=0)
    w.grad = torch.ones(4, 5)
    opt.step()  # step 1: M = G
    st = opt.state[w]
    M_before = dict(zip(st["support"][:4].tolist(), zip(st["exp_avg"][:4].tolist(), st["exp_avg_sq"][:4].tolist())))
    G_next = set(draw_gradient_support(20, 4, 0, 0, 1).tolist())
    only_m = sorted(set(M_before) - G_next)
    assert only_m, "the seeded draw must leave an M entry outside the next G"
    w.grad = torch.full((4, 5), 1e6)  # a huge gradient everywhere: entries of M \ G must ignore it
    w.grad.view(-1)[list(G_next)] = 0.5
    before = w.detach().clone().view(-1)
    opt.step()
    t = 2
    for i in only_m:
        m, v = b1 * M_before[i][0], b2 * M_before[i][1]
        expected = before[i].item() - lr / (1 - b1**t) * m / (v**0.5 / (1 - b2**t) ** 0.5 + eps)
        assert w.view(-1)[i].item() == pytest.approx(expected, rel=1e-6), i
        assert w.view(-1)[i].item() != before[i].item()


def test_so_k_zero_is_a_clear_config_error(data_dir):
    w = torch.nn.Parameter(torch.zeros(4, 5))
    with pytest.raises(ConfigError, match="floor"):
        SOAdam([{"params": [w], "sparse": True}], density=0.04)  # floor(0.04 * 20) = 0
    SOAdam([{"params": [w], "sparse": True}], density=0.05)  # k = 1 is accepted
    cfg = tiny_config(data_dir, "method.name=so", "method.so.density=1e-4", "method.so.support_every=10")
    method = build_method(cfg)
    with pytest.raises(ConfigError, match=r"method.density=0.0001 .* blocks\.0\.attn\.w"):
        method.build_optimizer(Decoder(cfg.model), torch.device("cpu"))


def test_so_density_one_equals_torch_adam_with_l2():
    w0, target = quadratic_problem()
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ref = torch.optim.Adam([a], lr=3e-2, betas=(0.9, 0.999), weight_decay=0.1, foreach=False)
    so = SOAdam([{"params": [b], "sparse": True}], lr=3e-2, betas=(0.9, 0.999), weight_decay=0.1, density=1.0, support_every=3)
    for _ in range(12):
        run_steps(ref, [a], target, 1)
        run_steps(so, [b], target, 1)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_so_state_bytes_are_what_is_allocated_and_memory_matching_covers_both_variants(data_dir):
    w0, target = quadratic_problem()
    w, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(torch.zeros(20))
    opt = SOAdam([{"params": [w], "sparse": True}, {"params": [bias]}], density=0.3, support_every=2)
    run_steps(opt, [w], target, 3)
    bias.grad = torch.zeros(20)
    opt.step()
    steps = 2 * 4  # the two float32 step counters
    assert optimizer_state_bytes(opt) == so_state_bytes(240, 0.3) + 2 * 20 * 4 + steps
    assert opt.state[w]["exp_avg"].numel() == opt.state[w]["support"].numel() == 2 * 72  # min(2k, numel), k = 72
    ref = tiny_config(data_dir, "method.name=relora", "method.relora.rank=4", *CYCLE)
    budget = measured_state_bytes(ref)
    for name in ("so", "so_single"):
        got = match_memory(tiny_config(data_dir, f"method.name={name}", f"method.{name}.support_every=10"), budget)
        assert 0.98 * budget <= measured_state_bytes(got) <= budget, name
    so_d = match_memory(tiny_config(data_dir, "method.name=so", "method.so.support_every=10"), budget).method.options.density
    single_d = match_memory(tiny_config(data_dir, "method.name=so_single", "method.so_single.support_every=10"), budget).method.options.density
    assert so_d < single_d  # so spends 40 bytes per k (2k slots + G), so_single 16


def test_so_config_uses_the_authors_betas_and_decay_on_sparse_weights_only(data_dir):
    cfg = tiny_config(data_dir, "method.name=so", "method.so.support_every=10")
    so = cfg.method.options
    assert so.so_betas == [0.9, 0.999] and so.so_weight_decay == 0.0 and so.so_weight_decay_mode == "coupled"
    opt = build_method(cfg).build_optimizer(Decoder(cfg.model), torch.device("cpu"))
    sparse = [g for g in opt.param_groups if g["sparse"]]
    dense = [g for g in opt.param_groups if not g["sparse"]]
    assert len(sparse) == 1 and sparse[0]["betas"] == (0.9, 0.999) and sparse[0]["weight_decay"] == 0.0
    assert all(g["betas"] == (cfg.train.beta1, cfg.train.beta2) for g in dense)
    with pytest.raises(ConfigError, match="so_betas"):
        tiny_config(data_dir, "method.so.so_betas=[0.9]")
    with pytest.raises(ConfigError, match="so_weight_decay_mode"):
        tiny_config(data_dir, "method.so.so_weight_decay_mode=l2")
