"""The callbacks a run attaches to the training loop: the protocol they follow and `build_callbacks(cfg)`,
which lists the ones a config turns on. The trainer only calls them; it never looks them up.

    train(cfg, run_dir, callbacks=build_callbacks(cfg))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from rankscope.analysis.callback import build_rank_callback
from rankscope.config import RunConfig
from rankscope.evaluate.callback import build_eval_callback

if TYPE_CHECKING:
    from rankscope.train import Trainer


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
