"""The callbacks a run attaches to the training loop: the protocol they follow, `build_callbacks(cfg)`,
which lists the ones a config turns on, `RunView`, the read-only view of the run they are handed, and
`CallbackRunner`, which calls them (and under FSDP gathers the model they read). The loop only calls them;
it never looks them up, and they never see the loop itself.

    train(cfg, run_dir, callbacks=build_callbacks(cfg))
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn as nn

from rankscope.analysis.callback import build_rank_callback
from rankscope.config import RunConfig
from rankscope.evaluate.callback import build_eval_callback
from rankscope.methods import build_model
from rankscope.parallel import distributed, sharding
from rankscope.train.state import RunFacts, TrainState


class Callback(Protocol):
    """Hooks other parts (evaluation, analysis) attach to the loop; each returns rows to log."""

    def on_step_end(self, run: "RunView", step: int) -> dict[str, Any] | None: ...

    def on_train_end(self, run: "RunView") -> dict[str, Any] | None: ...

    # optional: on_method_event(run, event, step, model) -> dict | None, for events a method
    # emits mid-step (e.g. ReLoRA's 'before_merge' / 'after_merge'); rows are logged with the step
    # optional: wants(run, step) -> bool, whether on_step_end will read the model at `step`
    # (under FSDP the full weights are gathered only then; without it, every step). Callbacks
    # read the model as `run.eval_model`.


# in this order: evaluation rows first, then rank metrics (each returns None when the config turns it off)
FACTORIES = (build_eval_callback, build_rank_callback)


def build_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks `cfg` turns on: in-training evaluation (eval.per_domain / eval.blimp_dir) and
    rank metrics (analysis.every > 0)."""
    return [cb for factory in FACTORIES if (cb := factory(cfg)) is not None]


class RunView:
    """What a callback sees of the run, read-only: the run's fixed facts (`cfg`, `run_dir`, `dist`, `device`,
    `sharded`, `precision`, `corpus`, `log`), the live `step` and `model` (the module being trained),
    `eval_model` (the model to read: under FSDP rank 0's gathered replica), `tokens_seen(step)`, and facts a
    loop above adds (`extra`: a fine-tune's `base` and `fewshot`). Setting an attribute is an error."""

    __slots__ = ("_run", "_state", "_runner", "_extra")

    def __init__(self, run: RunFacts, state: TrainState, runner: "CallbackRunner", extra: dict[str, Any] | None = None):
        for name, value in (("_run", run), ("_state", state), ("_runner", runner), ("_extra", dict(extra or {}))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the run view is read-only (tried to set {name!r})")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # a slot not set yet (copy, pickle): no recursion through _extra
            raise AttributeError(name)
        if name in RunFacts.__dataclass_fields__:
            return getattr(self._run, name)
        if name in self._extra:
            return self._extra[name]
        raise AttributeError(f"the run view has no {name!r}")

    @property
    def step(self) -> int:
        return self._state.step

    @property
    def model(self) -> nn.Module:
        return self._state.model

    @property
    def eval_model(self) -> nn.Module:
        return self._runner.eval_model(self._state.model)

    def tokens_seen(self, step: int) -> int:
        return step * self._state.tokens_per_step


class CallbackRunner:
    """Calls the run's callbacks (`callbacks`, rank 0's; empty on the others) with a `RunView`.

    Callbacks read the model as `view.eval_model`: the model itself, or under FSDP rank 0's
    unsharded replica, which every rank gathers together (a collective) only when a callback wants
    the model, so all ranks call these methods at the same points of the loop."""

    def __init__(self, run: RunFacts, state: TrainState, callbacks: list[Callback], extra: dict[str, Any] | None = None):
        self.run, self.state, self.callbacks = run, state, callbacks
        self.view = RunView(run, state, self, extra)
        self.replica: nn.Module | None = None  # rank 0's unsharded copy under FSDP

    def reset(self) -> None:
        """The model was rebuilt (resume with a restructured method): the replica is stale."""
        self.replica = None

    def eval_model(self, model: nn.Module) -> nn.Module:
        return self.replica if self.run.sharded else model

    def sync_replica(self) -> None:
        """Under FSDP, gather the full weights (collective) into rank 0's unsharded replica."""
        run = self.run
        state = sharding.full_model_state(self.state.model)
        if not run.dist.is_main:
            return
        if self.replica is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the dropout stream
                self.replica, _ = build_model(run.cfg, self.state.method.state_dict(), run.device)
        self.replica.load_state_dict(state)

    def need_model(self, wanted: bool) -> bool:
        """Whether rank 0's callbacks want the model now; under FSDP all ranks learn it (one
        all-reduce) and gather the replica together."""
        if not self.run.sharded:
            return wanted
        wanted = distributed.any_rank_true(wanted, self.run.device)
        if wanted:
            self.sync_replica()
        return wanted

    def step_end(self, step: int) -> dict[str, Any]:
        """Every callback's on_step_end; the rows they return, with step and tokens."""
        view = self.view
        self.need_model(any(getattr(cb, "wants", lambda v, st: True)(view, step) for cb in self.callbacks))
        row: dict[str, Any] = {}
        for cb in self.callbacks:
            extra = cb.on_step_end(view, step)
            if extra:
                row.update({"step": step, "tokens": view.tokens_seen(step), **extra})
        return row

    def method_event(self, event: str, step: int, model: nn.Module) -> dict[str, Any]:
        """Method events (ReLoRA's before/after merge) reach the callbacks that listen for them
        (rankscope.methods.base.Notify)."""
        listeners = [cb for cb in self.callbacks if hasattr(cb, "on_method_event")]
        if not self.need_model(bool(listeners)):
            return {}
        rows: dict[str, Any] = {}
        for cb in listeners:
            rows.update(cb.on_method_event(self.view, event, step, self.eval_model(model)) or {})
        return rows

    def train_end(self) -> dict[str, Any]:
        """Every callback's on_train_end, merged (rank 0; call `need_model(True)` on every rank first)."""
        out: dict[str, Any] = {}
        for cb in self.callbacks:
            out.update(getattr(cb, "on_train_end", lambda v: None)(self.view) or {})
        return out
