"""The training loop: `train_step` reads like pseudocode; set-up is rankscope.train.setup's. The loop owns the
run's `TrainState` (step, model, method, optimiser; rankscope.train.state) and calls out for save and resume
(rankscope.train.state: save writes the state, resume returns the checkpoint it found, which the loop builds the
model for and then restores), gradient clipping and NaN checks (rankscope.train.gradients), callbacks, which see
a read-only `RunView` (rankscope.train.callbacks), metric rows (rankscope.train.loggers) and summary.json
(rankscope.train.summary).
Re-running `train` on a run directory resumes from its newest valid checkpoint; when checkpoints exist but
none is valid it refuses (`restart=True`, `--restart`, starts from step 0). Only rank 0 reads or writes the
run directory. SIGTERM / SIGINT stop after the current step with a checkpoint (rankscope.core.preemption).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rankscope.parallel import distributed
from rankscope.train import gradients, setup as run_setup, state as run_state, summary
from rankscope import optim
from rankscope.store import checkpoint as ckpt
from rankscope.train.callbacks import Callback, CallbackRunner
from rankscope.train.state import RunFacts, TrainState
from rankscope.config import RunConfig
from rankscope.evaluate.perplexity import stream_loss
from rankscope.train.loggers import MetricsLog, TokenRate
from rankscope.core.preemption import Preempted, StopOnSignal
from rankscope.core.progress import Progress
from rankscope.store.run_dir import lock_run_dir
from rankscope.core.runtime import autocast, pick_precision


@dataclass
class Trainer:
    """The loop over one run: it holds the run's fixed facts (`facts`), owns its `state` (`model`, `method`,
    `optimizer`, `step` read through it) and shows its callbacks a read-only view (`callback_runner.view`)."""

    cfg: RunConfig
    run_dir: Path
    log: Callable[[str], None] = print
    restart: bool = False  # train from step 0 even if checkpoints exist (they are set aside, not deleted)
    callbacks: list[Callback] | None = None  # None: build_callbacks(cfg), the ones the config turns on
    extend: bool = False  # a resumed run may take a new train.max_steps (its lr schedule re-derived over it)
    device: torch.device = field(init=False)
    precision: str = field(init=False)

    # ------------------------------------------------------------------ set-up (rankscope.train.setup)
    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.stop = StopOnSignal()  # installed while run() trains
        self.stop_agreed = False  # every rank's view of "a rank was signalled", from the loss all-reduce
        self.dist, self.device = run_setup.start_process(self.cfg)
        self.lock = self.lock_run_dir()  # rank 0: one writer per run folder (rankscope.core.lock), until run() ends
        if not self.dist.is_main:
            self.log = lambda *_: None
        self.previous_settings = run_setup.open_run_dir(self.run_dir, self.cfg, self.device, self.dist,
                                                      new_schedule_ok=self.extend or self.restart)
        self.precision = pick_precision(self.device, self.cfg.train.precision)
        self.corpus, self.train_stream, self.val_stream = self.build_data()
        self.sharded = run_setup.is_sharded(self.cfg, self.dist, self.log)
        self.state: TrainState | None = None
        self.callback_runner: CallbackRunner | None = None
        self.setup_model(None)  # the state, and the precision / compile settings (self.precision settles here)
        self.callbacks = run_setup.rank_callbacks(self.cfg, self.callbacks, self.dist)
        self.facts = RunFacts(self.cfg, self.run_dir, self.dist, self.device, self.sharded, self.precision, self.corpus, self.log)
        self.callback_runner = CallbackRunner(self.facts, self.state, self.callbacks, self.view_extra())
        self.metrics = MetricsLog(self.cfg, self.run_dir, enabled=self.dist.is_main)
        self.keep_forever = run_state.kept_steps(self.cfg)

    def build_data(self):
        """(corpus, training stream, validation stream); a fine-tune draws them from its few-shot data (rankscope.train.finetune)."""
        return run_setup.build_data(self.cfg, self.dist, self.log)

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        """Dense weights the model starts from before the method adapts it: None (the seed's init) for pretraining,
        the base's for a fine-tune (rankscope.train.finetune)."""
        return None

    def view_extra(self) -> dict[str, Any]:
        """Facts a loop above this one shows its callbacks besides the run's own (a fine-tune: its base and data)."""
        return {}

    # ------------------------------------------------------------------ the state (rankscope.train.state)
    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def method(self):
        return self.state.method

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def step(self) -> int:
        return self.state.step

    def setup_model(self, method_state: dict[str, Any] | None) -> None:
        """Model, method (in `method_state`: a checkpoint's, or None), shards, optimiser, wrappers: a new
        TrainState at step 0, or on a rebuild (a resume that restructures the method) the same state's parts."""
        model, method, optimizer = run_setup.build_parts(self.cfg, method_state, self.device, self.sharded, self.precision,
                                                         self.initial_weights())
        if self.state is None:
            self.state = TrainState(model, method, optimizer, run_state.tokens_per_step(self.cfg, self.dist.world_size))
        else:
            self.state.model, self.state.method, self.state.optimizer = model, method, optimizer
        if self.callback_runner is not None:
            self.callback_runner.reset()
        compiled = None  # on a rebuild (resume with a restructured method) autotune's module wraps the old model
        if not hasattr(self, "settings"):  # the first build: precision / compile, as configured or measured
            self.settings, compiled = run_setup.choose_settings(self.cfg, self.model, self.device, self.dist,
                                                                self.previous_settings, self.run_dir, self.log)
            self.precision = self.settings["precision"]
        self.wrap_parallel(compiled)

    def wrap_parallel(self, compiled: nn.Module | None = None) -> None:
        """self.forward_model, the module the loop calls (DDP / torch.compile); self.model stays the Decoder."""
        self.forward_model = run_setup.forward_module(self.model, self.settings, self.dist, self.device, self.sharded,
                                                      compiled)

    def after_method_step(self) -> dict[str, Any]:
        """The method's after_step: callbacks see the model around its events, a restructured model
        gets a new optimiser, files it hands over are written (rank 0). Returns the rows to log."""
        events = self.method.after_step(self.step, self.model, self.optimizer, self.callback_runner.method_event)
        if events.rebuild_optimizer:
            self.state.optimizer = self.method.rebuild_optimizer(self.model, self.device, self.optimizer)
            self.wrap_parallel()
        for rel, (tensors, metadata) in self.method.take_files().items():
            if self.dist.is_main:
                ckpt.save_tensors_atomic(self.run_dir / rel, tensors, metadata)
        return dict(events)

    @property
    def eval_model(self) -> nn.Module:
        """The model callbacks read: self.model, or under FSDP rank 0's gathered replica."""
        return self.callback_runner.eval_model(self.model)

    # ------------------------------------------------------------------ the loop
    def tokens_seen(self, step: int) -> int:
        return step * self.state.tokens_per_step

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimiser step on the batches of `step`; returns (mean loss, grad norm)."""
        t = self.cfg.train
        optim.set_lr(self.optimizer, t.lr * self.method.lr_multiplier(step))
        self.model.train()
        total = 0.0
        snapshot = self.cfg.checkpoint.save_grads and self.will_checkpoint(step + 1)
        if snapshot:  # weights a method froze (LoRA's bases): their gradient too, this step only
            self.method.capture_grads(self.model, True)
        for micro in range(t.grad_accum):
            x, y = self.train_stream.get(step, micro)
            # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch only
            sync = micro == t.grad_accum - 1 or not self.dist.enabled
            accumulate = distributed.gradient_sync(self.forward_model, self.model, sync, self.sharded)
            with accumulate, autocast(self.device, self.precision):
                loss = self.forward_model(x.to(self.device), y.to(self.device)) / t.grad_accum
                loss.backward()
            total += loss.item()
        # every rank sees the same loss, and whether any rank was asked to stop (rankscope.core.preemption)
        total, self.stop_agreed = distributed.mean_and_any(total, self.stop.requested, self.dist, self.device)
        gradients.check_finite(total, None, step, self.model, self.sharded, self.device)
        if snapshot:  # before clipping: dL/dW itself, the same definition for every method
            self.state.last_grads = gradients.gradient_snapshot(self.model, self.dist, self.method.captured_grads(self.model))
            self.method.capture_grads(self.model, False)
        norm = gradients.clip_grads(self.model, t.grad_clip)
        gradients.check_finite(total, norm, step, self.model, self.sharded, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    def will_checkpoint(self, done: int) -> bool:
        return run_state.checkpoint_due(self.cfg, done, self.keep_forever)

    def resume(self) -> None:
        """Continue from the newest valid checkpoint, if any: the model is rebuilt for its method state where
        that differs (e.g. past a switch to adapters, or new ranks), then the checkpoint is restored into it."""
        found = run_state.resume(self.facts, self.restart)
        if found is None:
            return
        if run_state.method_state(found) != self.method.state_dict():
            self.setup_model(run_state.method_state(found))
        run_state.restore(found, self.state, self.facts)

    def run(self) -> dict[str, Any]:
        try:
            with self.stop:
                return self.train_loop()
        except OSError as e:  # disk full, read-only: one line naming the last good checkpoint (exit code 3)
            failure = run_state.machine_failure(e, self.run_dir)
            if failure is None:
                raise
            raise failure from None
        finally:
            self.release()

    def lock_run_dir(self):
        """Rank 0 takes the run folder's lock (a refusal reaches every rank); None on the other ranks."""
        held = []
        distributed.on_rank0(lambda: held.append(lock_run_dir(self.run_dir)), self.dist)
        return held[0] if held else None

    def release(self) -> None:
        """Give back the run folder's lock (the kernel does too when the process dies, and so does dropping the Trainer)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def train_loop(self) -> dict[str, Any]:
        t = self.cfg.train
        self.resume()  # sets the step (0 for a fresh run)
        if self.step >= t.max_steps:
            self.log(f"[train] {self.run_dir} is already finished ({self.step} steps)")
            return self.finish(0.0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rate = TokenRate(self.tokens_seen(self.step))
        # a tqdm bar on a terminal; off one (a log file), a plain line at every 10% of the steps left
        shown = t.progress and self.dist.is_main
        with Progress(t.max_steps, f"train {self.method.name}", initial=self.step, enabled=shown) as bar:
            while self.step < t.max_steps:
                loss, norm = self.train_step(self.step)
                self.state.step += 1
                events = self.after_method_step()
                tokens = self.tokens_seen(self.step)
                tps = rate.rate(tokens)
                row: dict[str, Any] = {}
                if self.step % t.log_every == 0 or self.step == t.max_steps or events:
                    rate.new_window(tokens)
                    row = {"step": self.step, "tokens": tokens, "train_loss": loss,
                           "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm, "tokens_per_s": tps, **events}
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                    val_loss = stream_loss(self.model, self.val_stream, t.eval_batches, self.device, self.precision)
                    row.update({"step": self.step, "tokens": tokens, "val_loss": val_loss})
                row.update(self.callback_runner.step_end(self.step))
                if row:
                    self.metrics.log(row)
                # under torchrun the ranks' agreed flag (so all stop at the same step); else the local one
                stopping = (self.stop_agreed if self.dist.enabled else self.stop.requested) and self.step < t.max_steps
                if stopping or self.will_checkpoint(self.step):
                    run_state.save(self.state, self.facts)
                bar.update(1, loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                if stopping:
                    self.metrics.close()
                    raise Preempted(self.step, self.stop.signum or signal.SIGTERM)
        return self.finish(rate.elapsed)

    def finish(self, elapsed: float) -> dict[str, Any]:
        """summary.json (rank 0), with the callbacks' final rows; `elapsed` 0: nothing was trained now."""
        self.metrics.close()
        self.callback_runner.need_model(bool(self.callbacks))  # on_train_end reads the model below
        if not self.dist.is_main:
            return {"steps": self.step}
        facts = summary.build_summary(self.run_dir, self.cfg, self.step, self.tokens_seen(self.step), self.model,
                                      self.method, self.optimizer, self.device, self.precision, self.dist.world_size,
                                      self.sharded)
        facts.update(self.callback_runner.train_end())
        return summary.write_summary(self.run_dir, facts, trained=elapsed != 0.0)


def train(cfg: RunConfig, run_dir: str | Path, log=print, restart: bool = False,
          callbacks: list[Callback] | None = None, extend: bool = False) -> dict[str, Any]:
    """Train, or resume, the run in `run_dir`; `restart` sets existing checkpoints aside and starts
    from step 0; `callbacks` (default `rankscope.train.callbacks.build_callbacks(cfg)`) run on rank 0.
    `extend` lets a resumed run take a new train.max_steps (else refused: the lr schedule would change).
    Raises rankscope.core.preemption.Preempted after a SIGTERM / SIGINT stop."""
    trainer = None
    try:
        trainer = Trainer(cfg, Path(run_dir), log, restart, callbacks, extend)
        return trainer.run()
    finally:
        trainer = None  # also on errors: the traceback must not keep FSDP state past shutdown
        distributed.shutdown()

