"""Learning-rate schedules: pure functions of the step, returning a multiplier of the peak lr.

`step` is the index of the optimiser step being taken (0-based): step 0 is the first update.
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    # (1) linear warm-up: 1/w, 2/w, ..., 1 over the first w steps
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # (2) cosine decay from 1 to min_lr_ratio at the last step
    span = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
