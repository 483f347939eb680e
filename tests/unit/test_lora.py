"""LoRALinear against peft at tiny sizes; wrapping a Decoder; the `lora` method's optimiser groups."""

import copy

import math

import pytest
import torch
import torch.nn as nn

from rankscope.methods import build_method
from rankscope.adapters.lora import LoRALinear, MergeError, adapter_generator, lora_modules, lora_parameters, wrap_linears
from rankscope.model import Decoder
from rankscope.core.errors import RankscopeError
from helpers import tiny_config




def make_layer(rank=4, alpha=8.0, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10, bias=False)
    return LoRALinear(base, rank, alpha, dropout, adapter_generator(seed, 0, 0))


def test_init_a_random_b_zero_output_equals_base():
    layer = make_layer()
    assert layer.scaling == 2.0
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4)
    assert layer.lora_A.abs().min() > 0 and layer.lora_A.abs().max() <= 12 ** -0.5  # kaiming-uniform bound 1/sqrt(in)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(3, 12)
    assert torch.equal(layer(x), layer.base(x))
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_reset_adapter_is_deterministic():
    a, b = make_layer(), make_layer(seed=1)
    a.reset_adapter(adapter_generator(7, 3, 5))
    b.reset_adapter(adapter_generator(7, 3, 5))
    assert torch.equal(a.lora_A, b.lora_A)
    b.reset_adapter(adapter_generator(7, 4, 5))
    assert not torch.equal(a.lora_A, b.lora_A)


def test_forward_and_delta_formula():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    ref = x @ (layer.base.weight + 2.0 * layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * layer.lora_B.detach() @ layer.lora_A.detach())
    torch.testing.assert_close(layer.effective_weight(), layer.base.weight.detach() + layer.delta_weight())


def test_delta_is_fp32_under_bf16_autocast():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    ref = (2.0 * layer.lora_B.double() @ layer.lora_A.double()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = layer.delta_weight()
        layer.merge()
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, ref, atol=1e-6, rtol=1e-6)


def test_merge_matches_peft():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    layer = make_layer(rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    peft_base = copy.deepcopy(layer.base)
    peft_layer = PeftLinear(peft_base, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), peft_layer(x), atol=1e-6, rtol=0)  # same unmerged function
    peft_layer.merge(safe_merge=True)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)


def test_merge_refuses_non_finite():
    layer = make_layer()
    before = layer.base.weight.clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    with pytest.raises(MergeError):
        layer.merge()
    assert torch.equal(layer.base.weight, before)
    assert issubclass(MergeError, RankscopeError)


def test_gradients_reach_b_at_step_1_and_a_at_step_2():
    layer = make_layer(dropout=0.1)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    x, y = torch.randn(8, 12), torch.randn(8, 10)
    nn.functional.mse_loss(layer(x), y).backward()
    assert layer.base.weight.grad is None
    assert layer.lora_B.grad.abs().sum() > 0  # dL/dB = s * g (A x)^T != 0 since A is random
    assert layer.lora_A.grad.abs().sum() == 0  # dL/dA = s * B^T g = 0 while B = 0: by design
    opt.step()
    opt.zero_grad()
    nn.functional.mse_loss(layer(x), y).backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0


def test_rank_too_large_is_a_user_error():
    with pytest.raises(RankscopeError, match="method.rank"):
        LoRALinear(nn.Linear(4, 3, bias=False), 8, 16.0)


def test_wrap_decoder_names_and_function(data_dir):
    cfg = tiny_config(data_dir, "method.name=lora")
    torch.manual_seed(0)
    model = Decoder(cfg.model).eval()
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16))
    before = model(idx)
    mods = wrap_linears(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], 4, 8.0, 0.1, seed=0)
    assert len(mods) == 7 * cfg.model.n_layers and list(mods)[0] == "blocks.0.attn.wq"
    assert mods == lora_modules(model)
    keys = model.state_dict().keys()
    assert {"blocks.0.attn.wq.base.weight", "blocks.0.attn.wq.lora_A", "blocks.0.attn.wq.lora_B", "blocks.3.mlp.w2.lora_B"} <= set(keys)
    torch.testing.assert_close(model(idx), before, atol=1e-6, rtol=0)
    # full-rank: embeddings, norms, LM head; frozen: the wrapped base weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "embed.weight" in trainable and "lm_head.weight" in trainable and "norm.weight" in trainable and "blocks.0.attn_norm.weight" in trainable
    assert not any(n.endswith("base.weight") for n in trainable)
    # different layers get different A (seeded by layer index)
    assert not torch.equal(mods["blocks.0.attn.wq"].lora_A, mods["blocks.1.attn.wq"].lora_A)


def test_targets_subset_and_unknown(data_dir):
    cfg = tiny_config(data_dir)
    model = Decoder(cfg.model)
    mods = wrap_linears(model, ["wq", "wv"], 4, 8.0, 0.0, seed=0)
    assert sorted({n.rsplit(".", 1)[1] for n in mods}) == ["wq", "wv"]
    assert model.blocks[0].mlp.w1.weight.requires_grad  # untargeted linears stay full-rank
    with pytest.raises(RankscopeError, match="targets"):
        wrap_linears(Decoder(cfg.model), ["nope"], 4, 8.0, 0.0, seed=0)


def test_lora_method_optimizer_groups(data_dir):
    cfg = tiny_config(data_dir, "method.name=lora", "method.lora.rank=4")
    method = build_method(cfg)
    model = Decoder(cfg.model)
    method.prepare_model(model)
    opt = method.build_optimizer(model, torch.device("cpu"))
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "no_decay", "lora"]
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in opt.param_groups[2]["params"]} == lora_ids
    rep = method.report(model, opt)
    assert rep["lora_params"] == sum(4 * (m.base.in_features + m.base.out_features) for m in lora_modules(model).values())
    assert rep["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_hybrid_and_factored_paths_agree_in_outputs_and_gradients(bias):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 20, bias=bias).double(), rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.double().normal_()
        layer.lora_B.data = layer.lora_B.double().normal_()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    results = {}
    for path in ("merged", "hybrid", "factored"):
        layer.forward_path = path
        assert layer.path(x) == path
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        results[path] = (y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.lora_A.grad = layer.lora_B.grad = None
        assert layer.base.weight.grad is None  # the frozen weight gets no gradient on either path
    for path in ("merged", "hybrid"):
        for got, factored in zip(results[path], results["factored"]):
            torch.testing.assert_close(got, factored, rtol=0, atol=1e-10)


def test_dropout_forces_the_factored_maths_only_while_training():
    layer = LoRALinear(nn.Linear(8, 8, bias=False), rank=2, alpha=4.0, dropout=0.1)
    layer.forward_path = "merged"
    x = torch.randn(5, 8)
    assert layer.train().path(x) == "dropped"  # the mask acts on x: no merged form exists; on a CPU, one Function
    assert layer.eval().path(x) == "merged"  # dropout is the identity in eval mode
    layer.forward_path = "factored"
    assert layer.train().path(x) == "factored"  # the plain autograd form, on request
    layer.forward_path = "auto"
    layer.base.weight.requires_grad_(True)
    assert layer.path(x) == "factored"  # the Function gives the base no gradient: a trainable base stays plain


@pytest.mark.parametrize("bias", [False, True])
def test_the_dropped_path_equals_the_plain_factored_form_in_fp64(bias):
    """Adapter dropout on a CPU ('dropped', paths._DroppedLoRA): output and the gradients of x, A and B
    equal the autograd form base(x) + s B A (x * mask) with the same mask, to 1e-12 in fp64."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 20, bias=bias).double(), rank=4, alpha=8.0, dropout=0.25).train()
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.double().normal_()
        layer.lora_B.data = layer.lora_B.double().normal_()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    w = torch.linspace(-1, 1, 3 * 7 * 20, dtype=torch.float64).view(3, 7, 20)
    results = {}
    for path in ("dropped", "factored"):
        layer.forward_path = "auto" if path == "dropped" else path
        assert layer.path(x) == path
        torch.manual_seed(7)  # the same mask on both paths
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * w).sum().backward()
        results[path] = (y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.lora_A.grad = layer.lora_B.grad = None
        assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)
    assert (results["dropped"][0] != layer.eval()(x).detach()).any()  # a mask was applied
    for got, plain in zip(results["dropped"], results["factored"]):
        torch.testing.assert_close(got, plain, rtol=0, atol=1e-12)


def test_the_dropped_path_under_bf16_autocast_follows_the_plain_form():
    """Under CPU bf16 autocast (an fp32 input, as the attention projections get, and a bf16 one, as w2
    gets): bf16 output, fp32 gradients of A and B, and both within bf16 rounding of the plain form."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32, bias=False), rank=8, alpha=16.0, dropout=0.1).train()
    nn.init.normal_(layer.lora_B, std=0.1)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(16, 64).to(dt)
        results = {}
        for path in ("auto", "factored"):
            layer.forward_path = path
            torch.manual_seed(3)
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(xi)
            assert y.dtype == torch.bfloat16
            y.float().square().sum().backward()
            results[path] = (y.float(), xi.grad.float(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
            assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
            layer.lora_A.grad = layer.lora_B.grad = None
        for got, plain in zip(results["auto"], results["factored"]):
            torch.testing.assert_close(got, plain, rtol=0.05, atol=0.05 * plain.abs().max().item())


def test_cost_model_prefers_merged_for_narrow_layers_and_hybrid_for_wide():
    from rankscope.adapters.paths import choose_path

    assert choose_path(4096, 64, 64, 16) == "merged"  # micro: the dense dW is cheaper than 4 thin matmuls
    assert choose_path(1024, 1536, 1536, 16) == "hybrid"  # wide layers: the dense dW dominates, thin dA, dB instead
    assert choose_path(1024, 1536, 1536, 16, backward=False) == "merged"  # evaluation: building W' is cheap
    assert choose_path(8, 1536, 1536, 16, backward=False) == "factored"  # a few tokens: thin beats forming W'
    assert choose_path(256, 1536, 1536, 16) == "factored"  # training on few tokens: no W' to form pays


@pytest.mark.parametrize("path", ["merged", "hybrid"])
def test_bf16_autocast_paths_match_the_factored_path(path):
    """Under bf16 autocast every path computes in bf16 from the fp32 master weights: close to the
    factored path (bf16 rounding), and the adapter gradients stay fp32."""
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(32, 48, bias=False), rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(2, 16, 32)
    grads = {}
    for p in (path, "factored"):
        layer.forward_path = p
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            assert y.dtype == torch.bfloat16
            y.float().square().sum().backward()
        grads[p] = (y.detach().float(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        assert layer.lora_A.grad.dtype == torch.float32
        layer.lora_A.grad = layer.lora_B.grad = None
    for got, ref in zip(grads[path], grads["factored"]):
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_hybrid_path_captures_effective_weight_gradients_like_the_others():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(10, 6, bias=False).double(), rank=2, alpha=4.0, dropout=0.0)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.double(), layer.lora_B.double().normal_()
    x = torch.randn(4, 10, dtype=torch.float64)
    captured = {}
    for p in ("hybrid", "factored"):
        layer.forward_path, layer.capture_grad, layer.effective_grad = p, True, None
        layer(x).pow(2).sum().backward()
        captured[p] = layer.effective_grad
    torch.testing.assert_close(captured["hybrid"], captured["factored"], rtol=0, atol=1e-10)


def test_adapter_dropout_keeps_one_minus_p_scaled_and_passes_the_mask_to_the_gradient():
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(64, 8, bias=False), rank=2, alpha=4.0, dropout=0.25).train()
    x = torch.ones(400, 64, requires_grad=True)
    y = layer.drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 25,600 draws: 4 standard errors ~ 0.011
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * mask / (1 - p)) / dx = mask / (1 - p)
    assert torch.equal(layer.eval().drop(x), x)  # identity in eval mode
    torch.manual_seed(4)
    a = layer.train().drop(x)
    torch.manual_seed(4)
    assert torch.equal(a, layer.drop(x))  # drawn from the global generator: resume restores it


def test_adapter_dropout_of_a_bf16_input_is_unbiased():
    """A bf16 input: the mask is drawn at fp32 resolution (keep_mask) whatever x's dtype; kept values bf16(1 / (1 - p))."""
    torch.manual_seed(5)
    layer = LoRALinear(nn.Linear(64, 8, bias=False), rank=2, alpha=4.0, dropout=0.1).train()
    y = layer.drop(torch.ones(2000, 512, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.9))
    assert abs(kept.float().mean().item() - 0.9) < 4 * (0.9 * 0.1 / y.numel()) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.25, 1 / 3, 0.05])
def test_keep_mask_has_the_distribution_of_a_float32_uniform_draw(p, monkeypatch):
    """keep_mask keeps k (a uniform 24-bit integer) iff k >= its threshold: exactly where the fp32
    uniform k / 2^24 that `torch.rand` would give is >= p (checked for every k near the threshold), and,
    without the Philox kernel (its own tests: tests/integration/test_dropout_mask.py), the two k of each
    int64 draw are its bits 0-23 and 32-55 (rebuilt from the same generator state)."""
    from rankscope.adapters.paths import keep_mask
    from rankscope.kernels import build, dropout_mask

    monkeypatch.setitem(build._built, str(dropout_mask._SOURCE), None)

    threshold = math.ceil(float(torch.tensor(p, dtype=torch.float32)) * 2 ** 24)
    k = torch.arange(threshold - 1000, threshold + 1000)
    uniform = (k.float() * 2.0 ** -24).float()  # exact: k < 2^24
    assert torch.equal(uniform >= p, k >= threshold)
    torch.manual_seed(11)
    got = keep_mask((3, 5), p, torch.float64)
    torch.manual_seed(11)
    draws = torch.empty(8, dtype=torch.int64).random_().tolist()
    ks = [f for d in draws for f in (d & 0xFFFFFF, (d >> 32) & 0xFFFFFF)][:15]
    assert got.dtype == torch.float64 and got.flatten().tolist() == [float(v >= threshold) for v in ks]


def test_a_trainable_base_weight_never_takes_the_hybrid_path():
    layer = LoRALinear(nn.Linear(1536, 1536, bias=False), rank=16, alpha=32.0, dropout=0.0)
    x = torch.randn(1024, 1536)
    assert layer.path(x) == "hybrid"
    layer.base.weight.requires_grad_(True)
    assert layer.path(x) == "factored"  # checked before the per-shape cache
