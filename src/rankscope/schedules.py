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


def restart_steps(max_steps: int, restart_every: int, offset: int = 0) -> list[int]:
    """0-based indices of the first update after each restart: offset + k * restart_every for
    k >= 1 (a restart happens after completed step offset + k * restart_every), plus `offset`
    itself when it is positive (adapters attached after a full-rank warm start)."""
    first = [offset] if offset > 0 else []
    return first + list(range(offset + restart_every, max_steps, restart_every))


def jagged_cosine(step: int, max_steps: int, warmup_steps: int, min_lr_ratio: float,
                  restart_every: int, restart_warmup_steps: int, offset: int = 0) -> float:
    """ReLoRA's jagged schedule (Lialin et al. 2023 §3; Weiss et al. 2025 use 100-step re-warm-ups):
    the warm-up + cosine envelope of `cosine_with_warmup`, multiplied after every restart by a
    linear re-warm-up 1/rw, 2/rw, ..., 1 over the next rw updates.

    Restarts follow `restart_steps(max_steps, restart_every, offset)`. The update right after a
    restart gets envelope / rw (never 0: ReLoRA's reference code wastes that step at lr 0), and
    update r + rw is back on the envelope.
    """
    # (1)+(2) global warm-up and cosine decay: the envelope
    lr = cosine_with_warmup(step, max_steps, warmup_steps, min_lr_ratio)
    if restart_warmup_steps <= 0 or step < offset or (offset == 0 and step < restart_every):
        return lr
    # (3) the last restart at or before `step`, and the linear re-warm-up after it
    last = offset + ((step - offset) // restart_every) * restart_every
    since = step - last
    if since < restart_warmup_steps:
        lr *= (since + 1) / restart_warmup_steps
    return lr
