"""Dropout keep masks on a CPU from a counter-based generator (Philox4x32-10): dropout_mask.cpp.

torch's CPU generator (mt19937) draws one number at a time; the masks of ReLoRA's adapter dropout (84 of
activation size per pico-body step) cost 8-9% of its step that way (bench/results/profile_kernel_pico_tiny_body.txt).
Philox (Salmon et al., SC'11, the generator behind torch's and JAX's GPU dropout) computes element e of a mask
from (seed, e) alone, so a mask is one vectorised pass. The seed is one draw from torch's global generator
(`draw_seed`), so a run stays reproducible and resume stays bit-exact.

The distribution is `torch.rand(shape) >= p`'s (fp32) exactly: element e is kept iff its 24-bit uniform is
>= ceil(float32(p) 2^24), independently for every element. The uniform's three bytes come from three Philox
streams and are compared most significant first, stopping at the first byte that differs from the threshold's:
one byte decides 255 elements in 256, so a 32-bit word serves four elements (the layout: dropout_mask.cpp).
That made a mask 0.78-0.80x the time of one 24-bit word per element (bench/results/dropout_mask_dec03c.txt).
tests/integration/test_dropout_mask.py checks the generator against Random123's published known-answer vectors
and the whole mask against a numpy reimplementation of the layout that compares all 24 bits, at thresholds
with ties on one, two and three bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rankscope.kernels import build

ENABLED = True  # off: masks from torch's generator (rankscope.adapters.paths.keep_mask's other branch)
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_SOURCE = Path(__file__).with_suffix(".cpp")


def extension():
    """The compiled module, or None where it cannot be built (tried once per process)."""
    return build.extension(_SOURCE, "the dropout-mask kernel", "torch's generator for dropout masks")


def supported(dtype: torch.dtype, device: torch.device | str) -> bool:
    return ENABLED and torch.device(device).type == "cpu" and dtype in DTYPES and extension() is not None


@torch.library.custom_op("rankscope::dropout_mask", mutates_args=())
def _mask(seed: torch.Tensor, n: int, threshold: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return extension().mask(n, int(seed), threshold, scale, dtype)


@_mask.register_fake
def _(seed, n, threshold, scale, dtype):
    return torch.empty(n, dtype=dtype)


def draw_seed() -> torch.Tensor:
    """One seed from torch's global generator (uniform on [0, 2^63 - 1)), as a 0-dim int64 tensor.
    `randint`, not `random_`: dynamo traces it (`Tensor.random_` breaks the graph), and under compile
    inductor draws it from its own generator, seeded from the global one."""
    return torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)


def mask(shape: tuple[int, ...], threshold: int, scale: float, dtype: torch.dtype, seed: torch.Tensor | None = None) -> torch.Tensor:
    """`scale` where an element is kept, else 0, in `dtype` (scale rounded to it): element e kept iff its
    24-bit uniform (three Philox bytes) is >= threshold. The seed from `draw_seed` unless given."""
    return _mask(draw_seed() if seed is None else seed, math.prod(shape), threshold, scale, dtype).view(shape)


def philox(counters: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of each row of `counters` ((n, 4) int64, 32-bit words) under `key`: (n, 4) words."""
    return extension().philox(counters, *key)
