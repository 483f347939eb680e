"""The fast paths of issue 27: each equals the plain path in fp64; `rankscope info` lists the study's preset."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import tiny_config

from rankscope import model as model_mod
from rankscope.cli import main
from rankscope.config import PRESETS, ModelConfig
from rankscope.adapters.lora import LoRALinear, lora_modules, lora_parameters, wrap_linears
from rankscope.model import Decoder


def test_info_lists_pico_tiny_body_with_body_and_embeddings_apart(capsys):
    main(["info"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    params, body, emb = (int(v.replace(",", "")) for v in rows["pico-tiny-body"][7:10])
    # 12 blocks of (4 attention + 3 FFN matrices, 2 norms) + final norm; untied 2,048 x 96 embedding and head
    block = 96 * 96 * 2 + 96 * 32 * 2 + 96 * 384 * 3 + 2 * 96
    assert body == 12 * block + 96 == 1_624_416
    assert emb == 2 * 2048 * 96 and params == body + emb
    assert rows["pico-tiny"][8] == rows["pico-tiny-body"][8]  # the same body


# --------------------------------------------------------------------------- fast paths equal the plain path (fp64)
SHAPE = dict(d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=96, vocab_size=64, max_seq_len=16)  # head dim 8, as pico's


@pytest.fixture
def plain_path(monkeypatch):
    """Both fast paths on for the test; a context that runs the plain path (both off) inside it."""
    set_paths(monkeypatch, True)

    @contextlib.contextmanager
    def plain():
        set_paths(monkeypatch, False)
        try:
            yield
        finally:
            set_paths(monkeypatch, True)
    return plain


def set_paths(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(model_mod, "FUSED_LINEARS", on)
    monkeypatch.setattr(model_mod, "GROUPED_ADAPTERS", on)


def fp64_model(relora_dropout: float | None = None) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**SHAPE)).double()
    if relora_dropout is not None:
        wrap_linears(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], 4, 8.0, relora_dropout, seed=0)
        model.double()
        with torch.no_grad():
            for p in lora_parameters(model):
                p.normal_(0, 0.3)  # B non-zero: the adapters change the function
    return model


def train_steps(model: nn.Module, steps: int = 2) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses, then the gradients of the last step, the parameters and AdamW's moments after `steps` steps."""
    return train_steps_on(model, "cpu", steps)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= tol, k


def test_fused_projections_equal_the_plain_path_in_fp64(plain_path):
    """Q,K,V and gate+up as one GEMM each: the same logits, gradients, parameters and AdamW state."""
    fast, plain = fp64_model(), fp64_model()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with plain_path():
        ref_logits = plain(x)
        ref = train_steps(plain)
    assert (fast(x) - ref_logits).abs().max() <= 1e-10
    got = train_steps(fast)
    assert torch.stack(got[0]).sub(torch.stack(ref[0])).abs().max() <= 1e-10
    assert_same(got[1], ref[1])
    assert sum(k.startswith("grad:") for k in got[1]) == sum(1 for _ in fast.parameters())  # every parameter got its gradient


def test_fused_projection_is_one_gemm_and_falls_back_for_hooked_layers(monkeypatch):
    set_paths(monkeypatch, True)
    model = Decoder(ModelConfig(**SHAPE))
    x = torch.randn(2, 16, 48)
    with torch.profiler.profile() as prof:
        model_mod.project(x, [model.blocks[0].attn.wq, model.blocks[0].attn.wk, model.blocks[0].attn.wv])
    assert sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) == 1
    seen = []
    model.blocks[0].attn.wk.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    q, k, v = model_mod.project(x, [model.blocks[0].attn.wq, model.blocks[0].attn.wk, model.blocks[0].attn.wv])
    assert seen == [torch.Size([2, 16, 16])] and q.shape == (2, 16, 48)  # a hooked layer runs its own forward


class MaskTape:
    """Records every adapter-dropout mask the fast path draws, in call order, one per adapted linear,
    and replays them in the plain path's per-layer `drop`."""

    def __init__(self, monkeypatch):
        self.masks: list[torch.Tensor] = []
        self.groups: list[int] = []  # k of each draw
        self.mp = monkeypatch
        self.orig = LoRALinear.group_masks

    def record(self):
        tape, orig = self, self.orig

        def group_masks(x, k, p):
            m = orig(x, k, p)
            tape.groups.append(k)
            tape.masks.extend(m.unbind(0))
            return m

        def drop(layer, x):  # a single adapted linear (wo, w2): one mask drawn the same way
            if not (isinstance(layer.dropout, nn.Dropout) and layer.training):
                return x
            return x * group_masks(x.reshape(-1, x.shape[-1]), 1, layer.dropout.p)[0].view_as(x)

        self.mp.setattr(LoRALinear, "group_masks", staticmethod(group_masks))
        self.mp.setattr(LoRALinear, "drop", drop)

    def replay(self):
        queue = list(self.masks)

        def group_masks(x, k, p):  # the per-layer paths draw k = 1 (CPU: the 'dropped' path)
            return torch.stack([queue.pop(0).view_as(x) for _ in range(k)])

        def drop(layer, x):  # the plain factored path (CUDA; forward_path 'factored')
            if not (isinstance(layer.dropout, nn.Dropout) and layer.training):
                return x
            return x * queue.pop(0).view_as(x)

        self.mp.setattr(LoRALinear, "group_masks", staticmethod(group_masks))
        self.mp.setattr(LoRALinear, "drop", drop)
        return queue


def test_grouped_relora_with_dropout_equals_the_plain_factored_path_in_fp64(plain_path, monkeypatch):
    """ReLoRA at dropout 0.1: the grouped adapters (bases in one GEMM, masks in one draw, A products in
    one bmm) give the plain per-layer factored path's outputs, gradients and AdamW state, mask for mask."""
    fast, plain = fp64_model(0.1), fp64_model(0.1)
    tape = MaskTape(monkeypatch)
    tape.record()
    got = train_steps(fast)
    assert len(tape.masks) == 2 * 2 * 7  # steps x layers x adapted linears: one independent mask each
    assert tape.groups == [3, 1, 2, 1] * 4  # q,k,v in one draw, wo, gate+up in one draw, w2
    queue = tape.replay()
    with plain_path():
        ref = train_steps(plain)
    assert not queue  # every recorded mask was used, in the same order
    assert torch.stack(got[0]).sub(torch.stack(ref[0])).abs().max() <= 1e-10
    assert_same(got[1], ref[1])


def test_the_dropped_path_equals_the_autograd_factored_form_over_training_steps_in_fp64(monkeypatch):
    """ReLoRA at dropout 0.1, per layer: the CPU's 'dropped' Function against the plain autograd form
    (forward_path 'factored'), masks replayed: the same losses, gradients, parameters and AdamW state."""
    set_paths(monkeypatch, False)
    fast, plain = fp64_model(0.1), fp64_model(0.1)
    tape = MaskTape(monkeypatch)
    tape.record()
    got = train_steps(fast)
    assert len(tape.masks) == 2 * 2 * 7 and set(tape.groups) == {1}
    queue = tape.replay()
    for m in lora_modules(plain).values():
        m.forward_path = "factored"
    x = torch.zeros(2, 16, 32, dtype=torch.float64)
    assert {m.path(x) for m in lora_modules(fast).values()} == {"dropped"} and {m.path(x) for m in lora_modules(plain).values()} == {"factored"}
    ref = train_steps(plain)
    assert not queue
    assert torch.stack(got[0]).sub(torch.stack(ref[0])).abs().max() <= 1e-10
    assert_same(got[1], ref[1])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grouped_relora_eval_and_no_dropout_equal_the_plain_path(plain_path, dropout):
    """Without an active mask (dropout 0: merged path; eval mode) the grouped forward is the same function."""
    fast, plain = fp64_model(dropout), fp64_model(dropout)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with plain_path():
        ref_eval = plain.eval()(x)
        plain.train()
        ref = train_steps(plain) if dropout == 0 else None
    assert (fast.eval()(x) - ref_eval).abs().max() <= 1e-10
    if dropout == 0:
        assert_same(train_steps(fast.train())[1], ref[1])


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    """bf16 autocast on a CPU: attention of the (bf16) q, k, v computed in fp32, exactly the fp32 result;
    outside autocast the kernel is unchanged."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g).bfloat16() for h in (6, 2, 2))
    ref = model_mod.attention(q.float(), k.float(), v.float())  # head dim 8: the CPU kernel, as under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model_mod.attention(q, k, v)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.equal(model_mod.attention(q, k, v), plain) and plain.dtype == torch.bfloat16


def test_bf16_training_step_stays_close_to_fp32():
    """The whole model under bf16 autocast (fp32 attention) gives the fp32 loss to bf16 accuracy."""
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**SHAPE))
    x, y = (torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    ref = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, y)
    assert abs(got.item() - ref.item()) < 0.02 * ref.item()


def test_grouped_dropout_masks_have_dropouts_distribution_and_are_independent(monkeypatch):
    """Masked input x * m, x = 1: mean 1, variance p / (1 - p), zeros with probability p, and the
    masks of the adapters sharing one input independent (both zero with probability p^2)."""
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(64, n, bias=False), 4, 8.0, 0.1) for n in (64, 32, 32)]
    x = torch.ones(4096, 64)
    seen = []
    orig = LoRALinear.group_masks
    monkeypatch.setattr(LoRALinear, "group_masks", staticmethod(lambda x, k, p: seen.append(orig(x, k, p)) or seen[-1]))
    LoRALinear.grouped_forward(x, layers)
    (m,) = seen
    assert m.shape == (3, 4096, 64) and m.dtype == torch.float32
    n, p = m[0].numel(), 0.1
    for masked in (x * m[i] for i in range(3)):
        assert masked.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
        assert abs(masked.mean().item() - 1) < 5 * (p / (1 - p) / n) ** 0.5  # 5 sigma
        assert abs(masked.var().item() - p / (1 - p)) < 0.01
        assert abs((masked == 0).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    both = ((m[0] == 0) & (m[1] == 0)).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p / n) ** 0.5  # independent masks, not one shared


def test_grouped_dropout_gradients_match_the_factored_formula():
    """dL/dA_i and dL/dB_i of the grouped path from the masks it drew, against the factored form by hand."""
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(16, n, bias=False), 4, 8.0, 0.1).double() for n in (16, 8)]
    for m in layers:
        nn.init.normal_(m.lora_B)
    x = torch.randn(5, 7, 16, dtype=torch.float64, requires_grad=True)
    state = torch.random.get_rng_state()
    outs = LoRALinear.grouped_forward(x, layers)
    torch.random.set_rng_state(state)
    masks = LoRALinear.group_masks(x.detach().reshape(-1, 16), 2, 0.1).view(2, 5, 7, 16)
    w = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(outs, w)), [x, *lora_parameters_of(layers)])
    ref_out = [m.base(x) + (x * mk) @ m.lora_A.T @ m.lora_B.T * m.scaling for m, mk in zip(layers, masks)]
    ref = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(ref_out, w)), [x, *lora_parameters_of(layers)])
    for o, r in zip(outs, ref_out):
        assert (o - r).abs().max() <= 1e-10
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-10


def lora_parameters_of(layers):
    return [p for m in layers for p in (m.lora_A, m.lora_B)]


@pytest.mark.parametrize("method", ["full", "relora"])
def test_checkpoints_of_either_path_load_in_the_other_and_export(data_dir, tmp_path, plain_path, method):
    """A run trained on the fast path loads on the plain path (and back) with the same logits, and its
    Hugging Face export reproduces them: the fast paths leave parameter names and shapes alone."""
    transformers = pytest.importorskip("transformers")
    from rankscope.export import export
    from rankscope.evaluate.loading import load_trained
    from rankscope.train.loop import train

    extra = ["method.name=relora", "method.relora.rank=4", "method.relora.reset_every=3", "method.relora.restart_warmup_steps=1",
             "method.relora.dropout=0.1"] \
        if method == "relora" else []
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    for trained_fast in (True, False):
        run = tmp_path / f"{method}-{trained_fast}"
        cfg = tiny_config(data_dir, "train.max_steps=4", "checkpoint.every=0", *extra)
        if trained_fast:
            train(cfg, run, log=lambda *a: None)
        else:
            with plain_path():
                train(cfg, run, log=lambda *a: None)
        with torch.no_grad():
            fast = load_trained(run).model.eval()(ids)
            with plain_path():
                plain = load_trained(run).model.eval()(ids)
        assert (fast - plain).abs().max() < 1e-5
        if method == "relora":
            assert lora_modules(load_trained(run).model)  # the adapters came back from the checkpoint
        out = export(run, tmp_path / f"hf-{method}-{trained_fast}")
        with torch.no_grad():
            hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        assert (hf - fast).abs().max() < 1e-4


# --------------------------------------------------------------------------- on a GPU (bench/gpu_check.sh runs these)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_fused_and_grouped_paths_match_the_plain_path(plain_path, monkeypatch):
    """On CUDA (fp64): the fused projections and grouped ReLoRA adapters (dropout 0.1, masks replayed)
    give the plain path's losses, gradients and AdamW state."""
    for dropout in (None, 0.1):
        fast, plain = fp64_model(dropout).cuda(), fp64_model(dropout).cuda()
        tape = MaskTape(monkeypatch)
        tape.record()
        got = train_steps_on(fast, "cuda")
        tape.replay()
        with plain_path():
            ref = train_steps_on(plain, "cuda")
        monkeypatch.setattr(LoRALinear, "group_masks", staticmethod(tape.orig))
        assert torch.stack(got[0]).sub(torch.stack(ref[0])).abs().max() <= 1e-10
        assert_same(got[1], ref[1])


@pytest.mark.gpu
@cuda
def test_gpu_attention_stays_bf16_under_autocast():
    """The fp32 attention is a CPU measure: CUDA's bf16 flash kernel is kept."""
    q, k, v = (torch.randn(2, h, 16, 8, device="cuda") for h in (6, 2, 2))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model_mod.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert y.dtype == torch.bfloat16


def train_steps_on(model: nn.Module, device: str, steps: int = 2) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses, then the gradients of the last step, the parameters and AdamW's moments after `steps` steps
    (batches on `device`)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    losses, out = [], {}
    for _ in range(steps):
        x, y = (torch.randint(0, 64, (3, 16), generator=g).to(device) for _ in range(2))
        loss = model(x, y)
        loss.backward()
        losses.append(loss.detach())
        out.update({f"grad:{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    out.update({f"param:{n}": p.detach().clone() for n, p in model.named_parameters()})
    for i, (p, s) in enumerate(opt.state.items()):
        out.update({f"state{i}:{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return losses, out


# --------------------------------------------------------------------------- bench/relora_floor.py's accounting
def _bench_module(name: str):
    bench = str(Path(__file__).resolve().parents[2] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


@pytest.mark.parametrize("preset", ["pico-tiny-body", "pico-small", "micro"])
def test_relora_floor_counts_every_adapted_linear_of_a_block(preset):
    """The floor sums saved and added work over exactly the linears ReLoRA adapts (one block's, x n_layers)."""
    floor = _bench_module("relora_floor")
    block = Decoder(ModelConfig(**{**PRESETS[preset], "n_layers": 1})).blocks[0]
    linears = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert {name: (i, o) for name, i, o in floor.adapted_shapes(preset)} == linears
    assert sorted(linears) == sorted(model_mod.DEFAULT_TARGETS)


def test_relora_floor_runs_and_prints_its_floors(capsys, monkeypatch):
    floor = _bench_module("relora_floor")
    monkeypatch.setattr(sys, "argv", ["relora_floor.py", "--presets", "micro", "--precision", "fp32", "--batch", "2", "--seq", "16",
                                      "--rounds", "1", "--reps", "1", "--steps", "1", "--rank", "4"])
    threads = torch.get_num_threads()
    try:
        floor.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    floors = re.findall(r"floor without masks .*?: ([\d.]+); floor with the masks: ([\d.]+)", out)
    assert len(floors) == 1 and all(0 < float(v) < 10 for v in floors[0])
    assert float(floors[0][0]) <= float(floors[0][1])  # the masks only add
    assert len(re.findall(r"^  w[qkvo123] ", out, flags=re.M)) == 7  # one row per adapted linear

