"""The training loop. Set-up lives in small `build_*` steps; `train_step` reads like pseudocode.

A run directory holds:
  config.yaml         the resolved config (plain data; `rankscope train RUN/config.yaml` re-runs it)
  env.json            torch/python/device facts and the git commit
  metrics.jsonl       one JSON object per logged step (train rows, eval rows, method events)
  checkpoints/        step_NNNNNN folders (see rankscope.checkpoint)
  summary.json        final facts: losses, tokens/s, peak memory, method report
Re-running `train` on an existing run directory resumes from its newest valid checkpoint; when
checkpoints exist but none is valid it refuses (`restart=True`, `--restart`, starts from step 0).
Only rank 0 reads or writes the run directory; the other ranks receive its verdicts by broadcast.
SIGTERM / SIGINT stop after the current step with a checkpoint (rankscope.preemption).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from rankscope import autotune
from rankscope import checkpoint as ckpt
from rankscope import distributed, run_state, sharding
from rankscope.callbacks import Callback, build_callbacks
from rankscope.config import RunConfig
from rankscope.data.corpus import Corpus, prepare
from rankscope.data.stream import BatchStream
from rankscope import errors
from rankscope.errors import ConfigError, RankscopeError, TrainingError
from rankscope.methods import build_model, lora
from rankscope.paths import check_output_dir
from rankscope.preemption import Preempted, StopOnSignal
from rankscope.progress import Progress
from rankscope.runtime import autocast, describe, peak_flops, pick_device, pick_precision
from rankscope.loggers import build_loggers


def log_spaced_steps(max_steps: int, n: int) -> set[int]:
    """n steps spaced evenly in log-space between 1 and max_steps (dense early in training)."""
    if n <= 0:
        return set()
    return {int(round(x)) for x in np.geomspace(1, max_steps, n)}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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
        self.setup_model(None)
        # evaluation and analysis run on rank 0 only; the other ranks wait at the next all-reduce
        callbacks = build_callbacks(self.cfg) if self.callbacks is None else self.callbacks
        self.callbacks = list(callbacks) if self.dist.is_main else []
        self.loggers = build_loggers(self.cfg, self.run_dir) if self.dist.is_main else []
        self.replica: nn.Module | None = None  # rank 0's unsharded copy for callbacks under FSDP
        self.step = 0
        self.last_grads: dict[str, torch.Tensor] | None = None
        t = self.cfg.train
        self.keep_forever = set(self.cfg.checkpoint.keep_steps) | log_spaced_steps(t.max_steps, self.cfg.checkpoint.log_spaced)

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and hand its result, or its error, to every rank (a broadcast)."""
        out: Any = None
        if self.dist.is_main:
            try:
                out = ("ok", fn())
            except RankscopeError as e:
                if not self.dist.enabled:
                    raise
                out = ("error", type(e).__name__, str(e))
                distributed.broadcast_object(out, self.dist)
                raise
            except Exception as e:
                if self.dist.enabled:
                    distributed.broadcast_object(("error", "TrainingError", f"rank 0 failed ({type(e).__name__}: {e})"), self.dist)
                raise
        out = distributed.broadcast_object(out, self.dist)
        if out[0] == "error":
            raise getattr(errors, out[1], TrainingError)(out[2])
        return out[1]

    def build_run_dir(self) -> None:
        """Rank 0 checks and writes the run directory; the other ranks never read it (a fresh
        folder's config.yaml may be half-written while they look) and learn the verdict by broadcast."""
        self.on_rank0(self.write_run_dir)

    def write_run_dir(self) -> None:
        check_output_dir(self.run_dir, "the run directory (-o)")
        cfg_path = self.run_dir / "config.yaml"
        resolved = self.cfg.to_dict()
        if cfg_path.exists():
            try:
                previous = yaml.safe_load(cfg_path.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                previous = None
            if not isinstance(previous, dict):
                raise ConfigError(f"{cfg_path} is not a readable rankscope config; restore it, or choose a new -o directory")
            if _without_budget(_normalised(previous)) != _without_budget(resolved):
                raise ConfigError(f"{self.run_dir} holds a run with a different config; choose a new -o directory (or delete that one)")
        _write_atomic(cfg_path, yaml.safe_dump(resolved, sort_keys=False))
        env = {**describe(self.device), "git_commit": git_commit(), "world_size": self.dist.world_size,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        env_path = self.run_dir / "env.json"
        self.previous_settings = _read_settings(env_path)  # a resumed run keeps its measured precision / compile
        _write_atomic(env_path, json.dumps(env, indent=1))

    def choose_settings(self) -> None:
        """precision / compile: as configured, or for `auto` by timing this model (rankscope.autotune);
        the choice and its timings go into env.json."""
        self.settings, self.compiled = autotune.choose(self.cfg, self.model, self.device, self.dist.enabled,
                                                       getattr(self, "previous_settings", None), log=self.log)
        self.precision = self.settings["precision"]
        if self.dist.is_main:
            env_path = self.run_dir / "env.json"
            _write_atomic(env_path, json.dumps({**json.loads(env_path.read_text()), "settings": self.settings}, indent=1))

    def build_data(self) -> Corpus:
        corpus = prepare(self.cfg.data, log=self.log)
        vocab = corpus.manifest["tokenizer"]["vocab_size"]
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={self.cfg.model.vocab_size}; raise model.vocab_size to >= {vocab}")
        t = self.cfg.train
        self.train_stream = BatchStream(corpus.tokens("train"), t.seq_len, t.batch_size, t.grad_accum, t.seed, *self.rank_world())
        self.val_stream = BatchStream(corpus.stream_tokens("val"), t.seq_len, t.batch_size, 1, t.seed + 10_007)
        return corpus

    def rank_world(self) -> tuple[int, int]:
        return self.dist.rank, self.dist.world_size

    def wrap_parallel(self) -> None:
        """The module the loop calls: DDP over ranks (FSDP shards self.model in place) and/or
        torch.compile; self.model stays the Decoder."""
        module = self.model
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        compiled, self.compiled = self.compiled if module is self.model else None, None  # autotune's, used once
        self.forward_model = (compiled if compiled is not None else torch.compile(module)) if self.settings["compile"] else module

    def setup_model(self, method_state: dict[str, Any] | None) -> None:
        """Model, method (in `method_state`: a checkpoint's, or None), shards, optimiser, wrappers."""
        # under FSDP only the shards move to the device (sharding.shard_model)
        self.model, self.method = build_model(self.cfg, method_state, None if self.sharded else self.device)
        self.replica = None
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
        events = self.method.after_step(self.step, self.model, self.optimizer, self.on_method_event)
        if events.rebuild_optimizer:
            self.optimizer = self.method.rebuild_optimizer(self.model, self.device, self.optimizer)
            self.wrap_parallel()
        for rel, (tensors, metadata) in self.method.take_files().items():
            if self.dist.is_main:
                ckpt.save_tensors_atomic(self.run_dir / rel, tensors, metadata)
        return dict(events)

    # ------------------------------------------------------------------ callbacks
    @property
    def eval_model(self) -> nn.Module:
        """The model callbacks read: self.model, or under FSDP rank 0's replica (see sync_replica)."""
        return self.replica if self.sharded else self.model

    def sync_replica(self) -> None:
        """Under FSDP, gather the full weights (collective) into rank 0's unsharded replica."""
        state = sharding.full_model_state(self.model)
        if not self.dist.is_main:
            return
        if self.replica is None:
            with torch.random.fork_rng(devices=[]):  # building it must not move the dropout stream
                self.replica, _ = build_model(self.cfg, self.method.state_dict(), self.device)
        self.replica.load_state_dict(state)

    def callbacks_need_model(self, wanted: bool) -> bool:
        """Whether rank 0's callbacks want the model now; under FSDP all ranks learn it (one
        all-reduce) and gather the replica together."""
        if not self.sharded:
            return wanted
        wanted = distributed.any_rank_true(wanted, self.device)
        if wanted:
            self.sync_replica()
        return wanted

    def run_callbacks(self, step: int) -> dict[str, Any]:
        row: dict[str, Any] = {}
        self.callbacks_need_model(any(getattr(cb, "wants", lambda tr, st: True)(self, step) for cb in self.callbacks))
        for cb in self.callbacks:
            extra = cb.on_step_end(self, step)
            if extra:
                row.update({"step": step, "tokens": self.tokens_seen(step), **extra})
        return row

    def on_method_event(self, event: str, step: int, model: nn.Module) -> dict[str, Any]:
        """Method events (ReLoRA's before/after merge) reach the callbacks that listen for them."""
        listeners = [cb for cb in self.callbacks if hasattr(cb, "on_method_event")]
        if not self.callbacks_need_model(bool(listeners)):
            return {}
        rows: dict[str, Any] = {}
        for cb in listeners:
            rows.update(cb.on_method_event(self, event, step, self.replica if self.sharded else model) or {})
        return rows

    # ------------------------------------------------------------------ checkpoints (rankscope.run_state)
    def save(self) -> None:
        run_state.save(self)

    def resume(self) -> None:
        run_state.resume(self)

    def log_row(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for logger in self.loggers:
            logger.log(row)

    # ------------------------------------------------------------------ the loop
    def tokens_seen(self, step: int) -> int:
        t = self.cfg.train
        return step * t.batch_size * t.grad_accum * t.seq_len * self.rank_world()[1]

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
        if not math.isfinite(total):
            raise TrainingError(f"non-finite loss ({total}) at step {step + 1}; first non-finite gradient: {self.first_bad_grad()}. Lower train.lr or use train.precision=fp32; the last good checkpoint is kept")
        if snapshot:  # before clipping: dL/dW itself, the same definition for every method
            self.last_grads = self.gradient_snapshot()
            lora.capture_effective_grads(self.model, False)
        norm = self.clip_grads()
        if not math.isfinite(norm):
            raise TrainingError(f"non-finite gradient norm at step {step + 1} in {self.first_bad_grad()}; lower train.lr or set train.grad_clip; the last good checkpoint is kept")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, norm

    def gradient_snapshot(self) -> dict[str, torch.Tensor] | None:
        """The 2-D gradients of this step's loss (summed over micro-batches, averaged over ranks as
        DDP / FSDP average them), before clipping, fp32 on rank 0's CPU (None elsewhere); under FSDP
        gathered one tensor at a time. LoRA-wrapped linears add `<name>.base.weight`: the gradient
        with respect to the effective weight, captured by the layer and all-reduced here."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None and p.dim() == 2:
                g = sharding.full(p.grad)
                if self.dist.is_main:
                    out[name] = g.float().cpu().clone()
        for name, g in lora.effective_grads(self.model).items():
            if self.dist.enabled:  # each rank holds its micro-batches' sum: average as DDP does
                torch.distributed.all_reduce(g)
                g = g / self.dist.world_size
            if self.dist.is_main:
                out[name] = g.float().cpu().clone()
        return out if self.dist.is_main else None

    def clip_grads(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return float(sharding.full(norm))  # under FSDP the norm is a DTensor (already reduced)

    def first_bad_grad(self) -> str:
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            bad = not torch.isfinite(sharding.local(p.grad)).all()
            if distributed.any_rank_true(bad, self.device) if self.sharded else bad:  # shards: ask every rank
                return name
        return "none (the loss itself overflowed)"

    def will_checkpoint(self, done: int) -> bool:
        every = self.cfg.checkpoint.every
        return done == self.cfg.train.max_steps or (every and done % every == 0) or done in self.keep_forever

    @torch.no_grad()
    def validation_loss(self) -> float:
        self.model.eval()
        losses = []
        for i in range(self.cfg.train.eval_batches):
            x, y = self.val_stream.get(i)
            with autocast(self.device, self.precision):
                losses.append(self.model(x.to(self.device), y.to(self.device)).item())
        return float(np.mean(losses))

    def stop_requested(self) -> bool:
        """Under torchrun the ranks' agreed flag (so all stop at the same step); else the local one."""
        return self.stop_agreed if self.dist.enabled else self.stop.requested

    def run(self) -> dict[str, Any]:
        with self.stop:
            return self.train_loop()

    def train_loop(self) -> dict[str, Any]:
        t = self.cfg.train
        self.resume()
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
            row.update(self.run_callbacks(self.step))
            if row:
                self.log_row(row)
            saved = self.will_checkpoint(self.step)
            if saved:
                self.save()
            bar.update(1, loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
            if self.stop_requested() and self.step < t.max_steps:
                if not saved:
                    self.save()
                bar.close()
                for logger in self.loggers:
                    logger.close()
                raise Preempted(self.step, self.stop.signum or signal.SIGTERM)
        bar.close()
        return self.finish(elapsed)

    def progress_bar(self) -> Progress:
        """A tqdm bar on a terminal; off one (a log file), a plain line at every 10% of the steps left."""
        return Progress(self.cfg.train.max_steps, f"train {self.method.name}", initial=self.step,
                        enabled=self.cfg.train.progress and self.dist.is_main)

    def finish(self, elapsed: float) -> dict[str, Any]:
        for logger in self.loggers:
            logger.close()
        self.callbacks_need_model(bool(self.callbacks))  # on_train_end reads the model below
        if not self.dist.is_main:
            return {"steps": self.step}
        rows = [json.loads(ln) for ln in (self.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()] if (self.run_dir / "metrics.jsonl").exists() else []
        train_rows = [r for r in rows if "train_loss" in r]
        val_rows = [r for r in rows if "val_loss" in r]
        summary: dict[str, Any] = {
            "run_dir": str(self.run_dir), "steps": self.step, "tokens": self.tokens_seen(self.step),
            "final_train_loss": train_rows[-1]["train_loss"] if train_rows else None,
            "final_val_loss": val_rows[-1]["val_loss"] if val_rows else None,
            # steady state: the median over logging windows, the first (warm-up, compilation) left out
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows])) if train_rows else None,
            "peak_memory_bytes": peak_memory(self.device),
            "precision": self.precision, "parameters": self.model.num_params(), "world_size": self.dist.world_size,
            **self.method.report(self.model, self.optimizer),
        }
        if self.sharded:  # the report counts whole tensors; what rank 0 itself holds under FSDP:
            summary["optimizer_state_bytes_per_rank"] = sum(sharding.local(t).numel() * t.element_size() for st in self.optimizer.state.values()
                                                           for t in st.values() if torch.is_tensor(t))
        peak = peak_flops(self.device, self.precision)
        if peak and summary["tokens_per_s"]:
            # model FLOPs utilisation: 6 N (+ attention) FLOPs per token, against the device's peak
            per_token = 6 * self.model.num_params() - 6 * self.cfg.model.vocab_size * self.cfg.model.d_model + 12 * self.cfg.model.n_layers * self.cfg.model.d_model * self.cfg.train.seq_len
            summary["mfu"] = summary["tokens_per_s"] * per_token / (peak * self.dist.world_size)
        for cb in self.callbacks:
            extra = getattr(cb, "on_train_end", lambda tr: None)(self)
            if extra:
                summary.update(extra)
        prev = self.run_dir / "summary.json"
        if elapsed == 0.0 and prev.exists():  # already finished: keep the measured figures
            summary = {**json.loads(prev.read_text()), **{k: v for k, v in summary.items() if v is not None and k not in ("tokens_per_s", "peak_memory_bytes")}}
        prev.write_text(json.dumps(summary, indent=2))
        return summary


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_settings(env_path: Path) -> dict | None:
    """The precision / compile a previous attempt of this run chose (env.json `settings`), if readable."""
    try:
        settings = json.loads(env_path.read_text()).get("settings") if env_path.exists() else None
    except (OSError, ValueError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def _normalised(previous: dict) -> dict:
    """A stored config as this version resolves it (e.g. flat method options of earlier releases)."""
    import warnings

    from rankscope.config import config_from_dict

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return config_from_dict(json.loads(json.dumps(previous))).to_dict()
    except RankscopeError:
        return previous


def _without_budget(cfg: dict) -> dict:
    """Fields that may change on resume (longer training, logging, progress bar) are ignored."""
    out = json.loads(json.dumps(cfg))
    train = out.get("train") if isinstance(out.get("train"), dict) else {}
    for key in ("max_steps", "progress", "log_every", "eval_every", "threads", "device", "tensorboard", "wandb", "wandb_project", "parallel", "compile",
                "autotune_min_steps", "autotune_cache"):
        train.pop(key, None)
    out.pop("checkpoint", None)
    out.pop("eval", None)
    out.pop("analysis", None)
    return out


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
    except ImportError:
        return 0


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

