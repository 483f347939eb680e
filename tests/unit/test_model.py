import math

import pytest
import torch
import torch.nn.functional as F

from rankscope.config import PRESETS, ModelConfig
from rankscope.model import Attention, Decoder, apply_rope, rope_tables


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def test_causal_masking_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Decoder(small_cfg()).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def reference_attention(attn: Attention, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Plain multi-head attention: K/V heads repeated explicitly, softmax with a causal mask."""
    B, T, _ = x.shape
    q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    return attn.wo(y)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_matches_plain_multihead_reference(n_kv):
    torch.manual_seed(1)
    cfg = small_cfg(n_kv_heads=n_kv)
    attn = Attention(cfg)
    cos, sin = rope_tables(cfg.head_dim, 16, cfg.rope_theta)
    x = torch.randn(3, 10, cfg.d_model)
    torch.testing.assert_close(attn(x, cos[:10], sin[:10]), reference_attention(attn, x, cos[:10], sin[:10]), rtol=1e-5, atol=1e-6)


def test_rope_preserves_norm_and_depends_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    q, k = torch.randn(hd), torch.randn(hd)

    def at(v, pos):
        return apply_rope(v.view(1, 1, 1, hd), cos[pos : pos + 1], sin[pos : pos + 1]).view(hd)

    assert torch.allclose(at(q, 5).norm(), q.norm(), atol=1e-5)
    # <R(m) q, R(n) k> depends on m - n only
    d1 = torch.dot(at(q, 10), at(k, 7))
    d2 = torch.dot(at(q, 33), at(k, 30))
    assert torch.allclose(d1, d2, atol=1e-4)
    assert torch.allclose(at(q, 0), q)  # position 0 is the identity


@pytest.mark.parametrize("preset,expected", [("pico-tiny", 11_282_784), ("pico-small", 64_595_328), ("pico-medium", 181_095_168), ("pico-large", 569_808_384)])
def test_pico_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = Decoder(ModelConfig(**PRESETS[preset]))
    assert model.num_params() == expected
    # Weiss et al.: pico-tiny is ~11M, pico-small ~65M parameters; Pico names the larger two 181M and 570M
    nominal = {"pico-tiny": 11.2e6, "pico-small": 65e6, "pico-medium": 181e6, "pico-large": 570e6}[preset]
    assert abs(model.num_params() / nominal - 1) < 0.01


def test_tied_embeddings_share_one_tensor():
    model = Decoder(small_cfg(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == Decoder(small_cfg()).num_params() - 50 * 32


def test_no_biases_anywhere():
    model = Decoder(small_cfg())
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_loss_matches_cross_entropy_of_logits():
    torch.manual_seed(2)
    model = Decoder(small_cfg())
    idx, tgt = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    logits = model(idx)
    assert torch.allclose(model(idx, tgt), F.cross_entropy(logits.view(-1, 50), tgt.view(-1)), atol=1e-6)
