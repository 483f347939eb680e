"""The training loop. Set-up lives in small `build_*` steps; `train_step` reads like pseudocode.

The loop calls out for everything else: the run directory's files (rankscope.run_dir), save and resume
(rankscope.run_state), gradient clipping and NaN diagnosis (rankscope.gradients), callbacks
(rankscope.callbacks.CallbackRunner), metric rows (rankscope.loggers.MetricsLog), summary.json (rankscope.summary).
Re-running `train` on an existing run directory resumes from its newest valid checkpoint; when
checkpoints exist but none is valid it refuses (`restart=True`, `--restart`, starts from step 0).
Only rank 0 reads or writes the run directory; the other ranks receive its verdicts by broadcast.
SIGTERM / SIGINT stop after the current step with a checkpoint (rankscope.preemption).
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rankscope import autotune, distributed, gradients, run_state, sharding, summary
from rankscope import checkpoint as ckpt
from rankscope.callbacks import Callback, CallbackRunner, build_callbacks
from rankscope.config import RunConfig
from rankscope.data.corpus import Corpus, prepare
from rankscope.data.stream import run_streams
from rankscope.evaluate.perplexity import stream_loss
from rankscope.errors import ConfigError
from rankscope.loggers import MetricsLog
from rankscope.methods import build_model, lora
from rankscope.preemption import Preempted, StopOnSignal
from rankscope.progress import Progress
from rankscope.run_dir import write_run_dir, write_settings
from rankscope.runtime import autocast, pick_device, pick_precision


@dataclass
class Trainer:
    cfg: RunConfig
    run_dir: Path
    log: Callable[[str], None] = print
    restart: bool = False  # train from step 0 even if checkpoints exist (they are set aside, not deleted)
    callbacks: list[Callback] | None = None  # None: build_callbacks(cfg), the ones the config turns on
    device: torch.device = field(init=False)
    precision: str = field(init=False)

    # ------------------------------------------------------------------ set-up
    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.stop = StopOnSignal()  # installed while run() trains
        self.stop_agreed = False  # every rank's view of "a rank was signalled", from the loss all-reduce
        self.dist = distributed.from_env()
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.device = pick_device(self.cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        distributed.init(self.dist, self.device)
        if not self.dist.is_main:
            self.log = lambda *_: None
        self.build_run_dir()
        self.precision = pick_precision(self.device, self.cfg.train.precision)
        self.corpus = self.build_data()
        self.sharded = self.dist.enabled and self.cfg.train.parallel == "fsdp"
        if self.cfg.train.parallel == "fsdp" and not self.sharded:
            self.log("[train] train.parallel=fsdp on one process: nothing to shard, training unsharded")
        self.callback_runner = CallbackRunner(self)
        self.setup_model(None)
        # evaluation and analysis run on rank 0 only; the other ranks wait at the next all-reduce
        callbacks = build_callbacks(self.cfg) if self.callbacks is None else self.callbacks
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.metrics = MetricsLog(self.cfg, self.run_dir, enabled=self.dist.is_main)
        self.step = 0
        self.last_grads: dict[str, torch.Tensor] | None = None  # checkpoint.save_grads: this step's gradients
        self.keep_forever = run_state.kept_steps(self.cfg)

    def build_run_dir(self) -> None:
        """Rank 0 checks and writes the run directory; the other ranks never read it (a fresh
        folder's config.yaml may be half-written while they look) and learn the verdict by broadcast."""
        info = (self.run_dir, self.cfg, self.device, self.dist.world_size)
        # a resumed run keeps its measured precision / compile
        self.previous_settings = distributed.on_rank0(lambda: write_run_dir(*info), self.dist)

    def choose_settings(self) -> None:
        """precision / compile: as configured, or for `auto` by timing this model (rankscope.autotune);
        the choice and its timings go into env.json."""
        self.settings, self.compiled = autotune.choose(self.cfg, self.model, self.device, self.dist.enabled,
                                                       self.previous_settings, log=self.log)
        self.precision = self.settings["precision"]
        if self.dist.is_main:
            write_settings(self.run_dir, self.settings)

    def build_data(self) -> Corpus:
        corpus = prepare(self.cfg.data, log=self.log)
        vocab = corpus.manifest["tokenizer"]["vocab_size"]
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={self.cfg.model.vocab_size}; raise model.vocab_size to >= {vocab}")
        self.train_stream, self.val_stream = run_streams(corpus, self.cfg.train, self.dist.rank, self.dist.world_size)
        return corpus

    def wrap_parallel(self) -> None:
        """The module the loop calls: DDP over ranks (FSDP shards self.model in place) and/or
        torch.compile; self.model stays the Decoder."""
        module = self.model if self.sharded else distributed.wrap_ddp(self.model, self.dist, self.device)
        compiled, self.compiled = self.compiled if module is self.model else None, None  # autotune's, used once
        self.forward_model = (compiled if compiled is not None else torch.compile(module)) if self.settings["compile"] else module

    def setup_model(self, method_state: dict[str, Any] | None) -> None:
        """Model, method (in `method_state`: a checkpoint's, or None), shards, optimiser, wrappers."""
        # under FSDP only the shards move to the device (sharding.shard_model)
        self.model, self.method = build_model(self.cfg, method_state, None if self.sharded else self.device)
        self.callback_runner.reset()
        if self.sharded:  # before the optimiser: it must hold the sharded parameters
            sharding.shard_model(self.model, self.precision, self.device)
        self.optimizer = self.method.build_optimizer(self.model, self.device)
        if not hasattr(self, "settings"):
            self.choose_settings()
        else:  # a rebuild (resume with a restructured method): autotune's compiled module wraps the old model
            self.compiled = None
        self.wrap_parallel()

    def after_method_step(self) -> dict[str, Any]:
        """The method's after_step: callbacks see the model around its events, a restructured model
        gets a new optimiser, files it hands over are written (rank 0). Returns the rows to log."""
        events = self.method.after_step(self.step, self.model, self.optimizer, self.callback_runner.method_event)
        if events.rebuild_optimizer:
            self.optimizer = self.method.rebuild_optimizer(self.model, self.device, self.optimizer)
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
        t = self.cfg.train
        return step * t.batch_size * t.grad_accum * t.seq_len * self.dist.world_size

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimiser step on the batches of `step`; returns (mean loss, grad norm)."""
        t = self.cfg.train
        lr = t.lr * self.method.lr_multiplier(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.model.train()
        total = 0.0
        snapshot = self.cfg.checkpoint.save_grads and self.will_checkpoint(step + 1)
        if snapshot:  # LoRA-wrapped linears: also the frozen base's gradient, this step only
            lora.capture_effective_grads(self.model, True)
        for micro in range(t.grad_accum):
            x, y = self.train_stream.get(step, micro)
            # DDP all-reduces (FSDP reduce-scatters) gradients on the last micro-batch only
            sync = micro == t.grad_accum - 1 or not self.dist.enabled
            if self.sharded:
                sharding.set_gradient_sync(self.model, sync)
            no_sync = not sync and not self.sharded
            with (self.forward_model.no_sync() if no_sync else contextlib.nullcontext()), autocast(self.device, self.precision):
                loss = self.forward_model(x.to(self.device), y.to(self.device)) / t.grad_accum
                loss.backward()
            total += loss.item()
        # every rank sees the same loss, and whether any rank was asked to stop (rankscope.preemption)
        total, self.stop_agreed = distributed.mean_and_any(total, self.stop.requested, self.dist, self.device)
        gradients.check_finite(total, None, step, self.model, self.sharded, self.device)
        if snapshot:  # before clipping: dL/dW itself, the same definition for every method
            self.last_grads = gradients.gradient_snapshot(self.model, self.dist)
            lora.capture_effective_grads(self.model, False)
        norm = gradients.clip_grads(self.model, t.grad_clip)
        gradients.check_finite(total, norm, step, self.model, self.sharded, self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    def will_checkpoint(self, done: int) -> bool:
        return run_state.checkpoint_due(self.cfg, done, self.keep_forever)

    def validation_loss(self) -> float:
        return stream_loss(self.model, self.val_stream, self.cfg.train.eval_batches, self.device, self.precision)

    def stop_requested(self) -> bool:
        """Under torchrun the ranks' agreed flag (so all stop at the same step); else the local one."""
        return self.stop_agreed if self.dist.enabled else self.stop.requested

    def run(self) -> dict[str, Any]:
        with self.stop:
            return self.train_loop()

    def train_loop(self) -> dict[str, Any]:
        t = self.cfg.train
        run_state.resume(self)  # sets self.step (0 for a fresh run)
        if self.step >= t.max_steps:
            self.log(f"[train] {self.run_dir} is already finished ({self.step} steps)")
            return self.finish(0.0)
        bar = self.progress_bar()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0, tok0, elapsed = time.perf_counter(), self.tokens_seen(self.step), 0.0
        t_win, tok_win = t0, tok0  # tokens/s is measured over each logging window (steady state)
        while self.step < t.max_steps:
            loss, norm = self.train_step(self.step)
            self.step += 1
            events = self.after_method_step()
            now = time.perf_counter()
            elapsed = now - t0
            tps = (self.tokens_seen(self.step) - tok_win) / max(now - t_win, 1e-9)
            row: dict[str, Any] = {}
            if self.step % t.log_every == 0 or self.step == t.max_steps or events:
                t_win, tok_win = now, self.tokens_seen(self.step)
                row = {"step": self.step, "tokens": self.tokens_seen(self.step), "train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": norm, "tokens_per_s": tps, **events}
            if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                row.update({"step": self.step, "tokens": self.tokens_seen(self.step), "val_loss": self.validation_loss()})
            row.update(self.callback_runner.step_end(self.step))
            if row:
                self.metrics.log(row)
            saved = self.will_checkpoint(self.step)
            if saved:
                run_state.save(self)
            bar.update(1, loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            if self.stop_requested() and self.step < t.max_steps:
                if not saved:
                    run_state.save(self)
                bar.close()
                self.metrics.close()
                raise Preempted(self.step, self.stop.signum or signal.SIGTERM)
        bar.close()
        return self.finish(elapsed)

    def progress_bar(self) -> Progress:
        """A tqdm bar on a terminal; off one (a log file), a plain line at every 10% of the steps left."""
        return Progress(self.cfg.train.max_steps, f"train {self.method.name}", initial=self.step,
                        enabled=self.cfg.train.progress and self.dist.is_main)

    def finish(self, elapsed: float) -> dict[str, Any]:
        """summary.json (rank 0), with the callbacks' final rows; `elapsed` 0: nothing was trained now."""
        self.metrics.close()
        self.callback_runner.need_model(bool(self.callbacks))  # on_train_end reads the model below
        if not self.dist.is_main:
            return {"steps": self.step}
        facts = summary.build_summary(self.run_dir, self.cfg, self.step, self.tokens_seen(self.step), self.model, self.method,
                                      self.optimizer, self.device, self.precision, self.dist.world_size, self.sharded)
        facts.update(self.callback_runner.train_end())
        return summary.write_summary(self.run_dir, facts, trained=elapsed != 0.0)


def train(cfg: RunConfig, run_dir: str | Path, log=print, restart: bool = False,
          callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train, or resume, the run in `run_dir`; `restart` sets existing checkpoints aside and starts
    from step 0; `callbacks` (default `rankscope.callbacks.build_callbacks(cfg)`) run on rank 0.
    Raises rankscope.preemption.Preempted after a SIGTERM / SIGINT stop."""
    trainer = None
    try:
        trainer = Trainer(cfg, Path(run_dir), log, restart, callbacks)
        return trainer.run()
    finally:
        trainer = None  # also on errors: the traceback must not keep FSDP state past shutdown
        distributed.shutdown()

