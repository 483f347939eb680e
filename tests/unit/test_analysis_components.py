"""What the analysis measures: OV circuits (GQA), LoRA effective weights, lazy checkpoint reads."""

import pytest
import torch
from safetensors.torch import save_file

from rankscope.analysis import components as C
from rankscope.spectral import AnalysisError
from rankscope.config import ModelConfig
from rankscope.model import Attention


def test_ov_circuits_reproduce_attention_with_gqa():
    """With one token, attention is softmax over itself = 1, so Attention(x) = W_O concat_h(W_V[g(h)] x)
    = sum_h OV_h x (RoPE rotates q, k only). The per-head OV factors must reproduce the real module."""
    cfg = ModelConfig(d_model=24, n_heads=6, n_kv_heads=2, ffn_dim=8, vocab_size=16, max_seq_len=4)
    torch.manual_seed(0)
    attn = Attention(cfg)
    factors = C.ov_factors(attn.wo.weight.detach(), attn.wv.weight.detach(), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
    assert len(factors) == 6 and all(A.shape == (24, 4) and B.shape == (4, 24) for A, B in factors)
    # GQA: heads 0-2 read KV head 0, heads 3-5 KV head 1
    assert torch.equal(factors[2][1], attn.wv.weight[0:4].detach()) and torch.equal(factors[3][1], attn.wv.weight[4:8].detach())
    assert torch.equal(factors[5][0], attn.wo.weight[:, 20:24].detach())
    x = torch.randn(3, 1, 24)
    cos, sin = torch.ones(1, 4), torch.zeros(1, 4)
    with torch.no_grad():
        want = attn(x, cos, sin)[:, 0]  # (3, 24)
    total = sum(A @ B for A, B in factors)  # (24, 24)
    torch.testing.assert_close(x[:, 0] @ total.T, want, rtol=1e-5, atol=1e-6)
    # as items: one per (layer, head), factored, d x d (the O_h V_g product, `ov_product`)
    weights = {"blocks.0.attn.wo": attn.wo.weight.detach(), "blocks.0.attn.wv": attn.wv.weight.detach()}
    ov = [it for it in C.weight_items(weights, (6, 2, 4)) if it.component == "ov_product"]
    assert [it.head for it in ov] == list(range(6)) and all(it.shape == (24, 24) and it.layer == 0 for it in ov)
    with pytest.raises(AnalysisError, match="do not fit"):
        C.ov_factors(attn.wo.weight, attn.wv.weight, 6, 3, 4)


def lora_state(g, scaling_parts=(8, 2)):
    state = {
        "blocks.0.attn.wq.base.weight": torch.randn(8, 6, generator=g),
        "blocks.0.attn.wq.lora_A": torch.randn(2, 6, generator=g),
        "blocks.0.attn.wq.lora_B": torch.randn(8, 2, generator=g),
        "blocks.0.attn.wk.weight": torch.randn(4, 6, generator=g),  # not wrapped
        "blocks.0.attn_norm.weight": torch.ones(6),
        "embed.weight": torch.randn(10, 6, generator=g),
    }
    return state


def test_effective_weight_of_lora_keys(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = lora_state(g)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    read = C.read_tensors(path)
    assert set(read) == {"blocks.0.attn.wq.base.weight", "blocks.0.attn.wq.lora_A", "blocks.0.attn.wq.lora_B", "blocks.0.attn.wk.weight"}
    assert "embed.weight" in C.read_tensors(path, include_embeddings=True)
    scaling = C.lora_scaling({"method": {"alpha": 32.0, "rank": 2}})
    assert scaling == 16.0
    weights, lora = C.effective_weights(read, scaling)
    want = state["blocks.0.attn.wq.base.weight"] + 16.0 * state["blocks.0.attn.wq.lora_B"] @ state["blocks.0.attn.wq.lora_A"]
    torch.testing.assert_close(weights["blocks.0.attn.wq"], want)
    torch.testing.assert_close(weights["blocks.0.attn.wk"], state["blocks.0.attn.wk.weight"])
    B, A = lora["blocks.0.attn.wq"]
    torch.testing.assert_close(B @ A, want - state["blocks.0.attn.wq.base.weight"])
    items = C.lora_items(lora)
    assert len(items) == 1 and items[0].kind == "lora_update" and items[0].shape == (8, 6) and items[0].component == "wq"
    with pytest.raises(AnalysisError, match="alpha"):
        C.effective_weights(read, None)


def test_tied_alias_and_grads_and_cycle_items(tmp_path):
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(10, 6, generator=g)
    save_file({"embed.weight": emb}, str(tmp_path / "m.safetensors"))
    read = C.read_tensors(tmp_path / "m.safetensors", True, {"lm_head.weight": "embed.weight"})
    assert torch.equal(read["lm_head.weight"], emb)
    grads = {"blocks.1.mlp.w2.weight": torch.randn(6, 12, generator=g), "blocks.1.mlp.w2.lora_A": torch.randn(2, 12, generator=g),
             "blocks.1.attn_norm.weight": torch.ones(6)}
    items = C.grad_items(grads)
    assert [(it.layer, it.component, it.kind) for it in items] == [(1, "w2", "grad")]
    cyc = C.dense_items({"blocks.2.attn.wv": torch.randn(4, 6, generator=g), "embed": torch.randn(10, 6, generator=g)}, "cycle_update")
    assert [(it.layer, it.component) for it in cyc] == [(2, "wv")]
    new, old = {"blocks.0.attn.wq": torch.ones(3, 3)}, {"blocks.0.attn.wq": torch.zeros(3, 3)}
    (d,) = C.delta_items(new, old, "update")
    assert torch.equal(d.mat, torch.ones(3, 3)) and d.kind == "update"
    assert C.parse_module("blocks.11.mlp.w3") == (11, "w3") and C.parse_module("blocks.0.attn_norm") is None
