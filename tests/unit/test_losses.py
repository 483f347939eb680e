import pytest
import torch
import torch.nn.functional as F

from rankscope import losses
from rankscope.config import ModelConfig
from rankscope.losses import linear_cross_entropy
from rankscope.model import Decoder


def unfused(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=-100)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 7 * 50])  # one chunk; chunks of 7 tokens (ragged last chunk)
def test_fused_loss_and_gradients_equal_the_unfused_head(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    h, w = torch.randn(30, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (30,))
    t[[3, 11, 29]] = -100  # ignored tokens count neither in the sum nor in the mean
    grads = []
    for fn in (linear_cross_entropy, unfused):
        loss = fn(h, w, t)
        (2.5 * loss).backward()  # a non-unit incoming gradient is applied in backward
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fused_head_in_the_decoder_matches_logits_and_gradients(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 5 * 64)
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=64, max_seq_len=16, tie_embeddings=True)
    torch.manual_seed(1)
    model = Decoder(cfg)
    idx, tgt = torch.randint(0, 64, (3, 9)), torch.randint(0, 64, (3, 9))
    model(idx, tgt).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(idx).view(-1, 64), tgt.view(-1)).backward()  # logits path: evaluation's forward
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=0, atol=1e-6, msg=n)


def test_no_gradient_work_under_no_grad_and_bf16_close_to_unfused():
    torch.manual_seed(2)
    h, w, t = torch.randn(20, 16), torch.randn(40, 16), torch.randint(0, 40, (20,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t), unfused(h, w, t), rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, ref = linear_cross_entropy(h, w, t), F.cross_entropy(F.linear(h, w).float(), t)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-3)  # same bf16 matmul, fp32 softmax


def test_fused_loss_is_stable_for_large_logits():
    """Logits in the hundreds (exp would overflow fp32 without the max subtracted): loss and gradients
    still equal the unfused head's."""
    torch.manual_seed(3)
    h, w = (40 * torch.randn(12, 16)).requires_grad_(), torch.randn(30, 16, requires_grad=True)
    t = torch.randint(0, 30, (12,))
    got = []
    for fn in (linear_cross_entropy, unfused):
        loss = fn(h, w, t)
        loss.backward()
        got.append((loss.detach(), h.grad.clone(), w.grad.clone()))
        h.grad = w.grad = None
    assert torch.isfinite(got[0][0]) and got[0][0] > 10
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
