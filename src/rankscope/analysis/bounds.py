"""Rank bounds of updates from what a method declares: a method whose adapters keep one fixed rank r
(`Method.low_rank_updates`: LoRA, ReLoRA, hybrid) changes each wrapped linear by at most (merges + live
adapters) x r between two checkpoints. The method is asked through the registry, by the name a run stored."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rankscope.analysis.reading import CheckpointState


def low_rank_updates(method: str) -> bool:
    """Whether the method named `method` trains fixed-rank adapters (rankscope.methods.base.Method.low_rank_updates);
    False for a name this installation does not know (a run of a method registered elsewhere)."""
    from rankscope.core.errors import ConfigError
    from rankscope.methods import method_class

    try:
        return bool(method_class(method).low_rank_updates)
    except ConfigError:
        return False


def update_bounds(new: CheckpointState, old: CheckpointState, method: str, old_is_init: bool = False) -> dict[str, int]:
    """Rank bounds of new - old for each LoRA-wrapped linear of a fixed-rank method: the change of
    W0 + s B A is the cycle updates merged in between plus the live adapter delta at each end, each of
    rank <= r, so rank <= (merges + [B_new != 0] + [B_old != 0]) * r. The re-created initialisation
    (`old_is_init`) counts as wrapped with B = 0. Other modules and methods: no entry (min(m, n))."""
    if not low_rank_updates(method):
        return {}
    out = {}
    for name, (B, A) in new.lora.items():
        if name in old.lora:
            r_old, live_old = old.lora[name][1].shape[0], bool(old.lora[name][0].any())
        elif old_is_init:
            r_old, live_old = 0, False
        else:  # wrapped after `old` (full-rank warm start): unbounded
            continue
        out[name] = (new.merges - old.merges + bool(B.any()) + live_old) * max(A.shape[0], r_old)
    return out
