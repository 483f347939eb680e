"""Dropout keep masks from Philox4x32-10 (rankscope.kernels.dropout_mask): the generator against Random123's
published known-answer vectors, the whole mask against a numpy reimplementation of its layout, the keep rate
and independence, reproducibility from torch's global generator, keep_mask's two branches, and compile."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from rankscope.adapters.paths import _threshold, keep_mask
from rankscope.kernels import build
from rankscope.kernels import dropout_mask as dm

built = pytest.mark.skipif(dm.extension() is None, reason="the C++ kernel could not be built here (no compiler or ninja)")

# Random123's tests/kat_vectors for philox4x32 10: counter, key, output.
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


def philox_np(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of (n, 4) uint64 counters holding 32-bit words, written from the paper's round function."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, 1)


def mask_np(n: int, seed: int, threshold: int, scale: float) -> np.ndarray:
    """The layout dropout_mask.cpp documents, without its early stop: block b, lane l at level k is the counter
    (16 b + l, k); byte j of its word w is level k's byte of element 256 b + 64 w + 16 j + l; U = u2 u1 u0 (bytes,
    most significant first) and the element is kept iff U >= threshold."""
    blocks = (n + 255) // 256
    idx = np.arange(blocks * 16, dtype=np.uint64)
    u = np.zeros(blocks * 256, dtype=np.uint64)
    for level in range(3):
        ctr = np.stack([idx & np.uint64(0xFFFFFFFF), idx >> np.uint64(32), 0 * idx + np.uint64(level), 0 * idx], 1)
        words = philox_np(ctr, (seed & 0xFFFFFFFF, seed >> 32)).reshape(blocks, 16, 4)  # (block, lane, word)
        byte = np.stack([(words >> np.uint64(8 * j)) & np.uint64(0xFF) for j in range(4)], 3)  # (block, lane, word, j)
        u = (u << np.uint64(8)) | byte.transpose(0, 2, 3, 1).reshape(-1)  # element order: word, j, lane
    return np.where(u[:n] >= threshold, scale, 0.0)


@built
def test_philox_matches_random123_known_answers_and_the_numpy_round_function():
    for ctr, key, out in KAT:
        assert tuple(dm.philox(torch.tensor([ctr]), key)[0].tolist()) == out
        assert tuple(philox_np(np.array([ctr], dtype=np.uint64), key)[0].tolist()) == out


@built
@pytest.mark.parametrize("dtype", dm.DTYPES)
@pytest.mark.parametrize("n", [1, 63, 64, 200, 256, 257, 4096 + 17])
def test_the_mask_is_the_documented_layout_bit_for_bit(dtype, n):
    seed = (0x5EED << 32) | 0x1234ABCD
    threshold, scale = _threshold(0.1), 1 / 0.9
    got = dm.mask((n,), threshold, scale, dtype, seed=torch.tensor(seed))
    ref = torch.from_numpy(mask_np(n, seed, threshold, scale)).to(dtype)  # scale rounded to the dtype, as the kernel does
    assert got.dtype == dtype and torch.equal(got, ref)


@built
@pytest.mark.parametrize("threshold", [_threshold(0.1), 0x800000, 0x4A4A4A, 0, 1 << 24])
def test_every_byte_of_the_comparison_at_thresholds_with_ties(threshold):
    """A million elements: about 4,000 tie on the first byte and 16 on the first two (0x4A4A4A: the same byte thrice);
    thresholds 0 and 2^24 keep all and none."""
    seed, n = 0x0123456789ABCDEF, 1 << 20
    got = dm.mask((n,), threshold, 2.0, torch.float32, seed=torch.tensor(seed)).numpy()
    assert np.array_equal(got, mask_np(n, seed, threshold, 2.0).astype(np.float32))
    if threshold in (0, 1 << 24):
        assert set(np.unique(got)) == ({2.0} if threshold == 0 else {0.0})


@built
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_independence(p):
    torch.manual_seed(0)
    n = 1 << 22
    a = keep_mask((n,), p, torch.float64)
    b = keep_mask((n,), p, torch.float64)  # the next seed: an independent mask
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(a.mean().item() - (1 - p)) < 5 * sd
    for x, y in ((a[:-1], a[1:]), (a[:-16], a[16:]), (a[:-64], a[64:]), (a[:-256], a[256:]), (a, b)):  # neighbours, bytes, words, blocks, masks
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 5 / math.sqrt(n)


@built
def test_masks_come_from_the_global_generator():
    torch.manual_seed(3)
    a = keep_mask((7, 9), 0.25, torch.float32, scale=4 / 3)
    torch.manual_seed(3)
    seed = torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)
    assert torch.equal(a, dm.mask((7, 9), _threshold(0.25), 4 / 3, torch.float32, seed=seed))
    assert set(a.unique().tolist()) <= {0.0, float(torch.tensor(4 / 3))}


def test_without_the_kernel_keep_mask_draws_from_torchs_generator(monkeypatch):
    monkeypatch.setitem(build._built, str(dm._SOURCE), None)  # as where the compiler or ninja is missing
    assert not dm.supported(torch.float32, "cpu")
    torch.manual_seed(0)
    m = keep_mask((4096, 64), 0.1, torch.float32, scale=2.0)
    assert set(m.unique().tolist()) == {0.0, 2.0} and abs((m > 0).float().mean().item() - 0.9) < 0.01


@built
def test_the_mask_compiles_into_one_graph():
    def f(x):
        return x * keep_mask(tuple(x.shape), 0.2, x.dtype, scale=1.25)

    x = torch.ones(256, 64)
    torch.manual_seed(5)
    y = torch.compile(f, fullgraph=True, backend="inductor")(x)
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1.25)) and abs(kept.float().mean().item() - 0.8) < 0.02


def test_a_build_that_fails_says_so_once_and_gives_none(tmp_path):
    bad = tmp_path / "broken_kernel.cpp"
    bad.write_text("this is not C++\n")
    with pytest.warns(UserWarning, match="broken kernel could not be built"):
        assert build.extension(bad, "the broken kernel", "torch's op") is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert build.extension(bad, "the broken kernel", "torch's op") is None
    assert not again  # tried once: no second build, no second warning
