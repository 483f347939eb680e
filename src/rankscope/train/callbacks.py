"""The callbacks a run attaches to the training loop: the protocol they follow, `build_callbacks(cfg)`,
which lists the ones a config turns on, and `CallbackRunner`, which calls them for the trainer (and under
FSDP gathers the model they read). The trainer only calls them; it never looks them up.

    train(cfg, run_dir, callbacks=build_callbacks(cfg))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from rankscope.train import distributed, sharding
from rankscope.analysis.callback import build_rank_callback
from rankscope.config import RunConfig
from rankscope.evaluate.callback import build_eval_callback
from rankscope.methods import build_model

if TYPE_CHECKING:
    from rankscope.train.loop import Trainer


class Callback(Protocol):
    """Hooks other parts (evaluation, analysis) attach to the loop; each returns rows to log."""

    def on_step_end(self, trainer: "Trainer", step: int) -> dict[str, Any] | None: ...

    def on_train_end(self, trainer: "Trainer") -> dict[str, Any] | None: ...

    # optional: on_method_event(trainer, event, step, model) -> dict | None, for events a method
    # emits mid-step (e.g. ReLoRA's 'before_merge' / 'after_merge'); rows are logged with the step
    # optional: wants(trainer, step) -> bool, whether on_step_end will read the model at `step`
    # (under FSDP the full weights are gathered only then; without it, every step). Callbacks
    # read the model as `trainer.eval_model`.


# in this order: evaluation rows first, then rank metrics (each returns None when the config turns it off)
FACTORIES = (build_eval_callback, build_rank_callback)


def build_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks `cfg` turns on: in-training evaluation (eval.per_domain / eval.blimp_dir) and
    rank metrics (analysis.every > 0)."""
    return [cb for factory in FACTORIES if (cb := factory(cfg)) is not None]


class CallbackRunner:
    """Calls the trainer's callbacks (`trainer.callbacks`, rank 0's; empty on the others) with the trainer.

    Callbacks read the model as `trainer.eval_model`: the model itself, or under FSDP rank 0's
    unsharded replica, which every rank gathers together (a collective) only when a callback wants
    the model, so all ranks call these methods at the same points of the loop."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.replica: nn.Module | None = None  # rank 0's unsharded copy under FSDP

    def reset(self) -> None:
        """The model was rebuilt (resume with a restructured method): the replica is stale."""
        self.replica = None

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.replica if self.trainer.sharded else model

    def sync_replica(self) -> None:
        """Under FSDP, gather the full weights (collective) into rank 0's unsharded replica."""
        tr = self.trainer
        state = sharding.full_model_state(tr.model)
        if not tr.dist.is_main:
            return
        if self.replica is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the dropout stream
                self.replica, _ = build_model(tr.cfg, tr.method.state_dict(), tr.device)
        self.replica.load_state_dict(state)

    def need_model(self, wanted: bool) -> bool:
        """Whether rank 0's callbacks want the model now; under FSDP all ranks learn it (one
        all-reduce) and gather the replica together."""
        if not self.trainer.sharded:
            return wanted
        wanted = distributed.any_rank_true(wanted, self.trainer.device)
        if wanted:
            self.sync_replica()
        return wanted

    def step_end(self, step: int) -> dict[str, Any]:
        """Every callback's on_step_end; the rows they return, with step and tokens."""
        tr = self.trainer
        self.need_model(any(getattr(cb, "wants", lambda tr, st: True)(tr, step) for cb in tr.callbacks))
        row: dict[str, Any] = {}
        for cb in tr.callbacks:
            extra = cb.on_step_end(tr, step)
            if extra:
                row.update({"step": step, "tokens": tr.tokens_seen(step), **extra})
        return row

    def method_event(self, event: str, step: int, model: nn.Module) -> dict[str, Any]:
        """Method events (ReLoRA's before/after merge) reach the callbacks that listen for them
        (rankscope.methods.base.Notify)."""
        listeners = [cb for cb in self.trainer.callbacks if hasattr(cb, "on_method_event")]
        if not self.need_model(bool(listeners)):
            return {}
        rows: dict[str, Any] = {}
        for cb in listeners:
            rows.update(cb.on_method_event(self.trainer, event, step, self.eval_model(model)) or {})
        return rows

    def train_end(self) -> dict[str, Any]:
        """Every callback's on_train_end, merged (rank 0; call `need_model(True)` on every rank first)."""
        tr = self.trainer
        out: dict[str, Any] = {}
        for cb in tr.callbacks:
            out.update(getattr(cb, "on_train_end", lambda tr: None)(tr) or {})
        return out
