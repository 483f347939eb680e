"""A run's state and how checkpoints keep it. The training loop owns one `TrainState` (step, model, method,
optimiser, the step's gradient snapshot); `save` writes it with every rank's RNG (rank 0 writes, under FSDP after
gathering the shards); `resume` finds the newest valid checkpoint (rank 0) and returns it to every rank, and
`restore` loads that same one into the state the loop built for it, so a killed run resumed reaches
bit-identical weights. `RunFacts` are the run's fixed facts (config, folder, process, device, corpus) that
save, resume and the callbacks' view read. Nothing here builds a model: the loop does (rankscope.train.setup).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn as nn

from rankscope.core.errors import MACHINE_ERRNOS, CheckpointError, MachineError
from rankscope.store import checkpoint as ckpt
from rankscope.store.optimizer_state import optimizer_from_tensors, optimizer_to_tensors
from rankscope.parallel import distributed, sharding
from rankscope.parallel.distributed import DistInfo

if TYPE_CHECKING:
    from rankscope.config import RunConfig
    from rankscope.data.corpus import Corpus
    from rankscope.methods.base import Method


@dataclass(frozen=True)
class RunFacts:
    """What does not change while a run trains: its config and folder, this process and device, whether the model
    is sharded, the precision the steps compute in (settled at set-up), the corpus, and where it logs."""

    cfg: RunConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    sharded: bool
    precision: str
    corpus: Corpus
    log: Callable[[str], None]


@dataclass
class TrainState:
    """What the loop owns and a checkpoint holds: the step count, the model, its method and optimiser (rebuilt
    in place when a resume restructures the method), and this step's gradients for checkpoint.save_grads. The
    RNG streams are torch's own, saved and restored with it; the lr schedule is the method's function of the step."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    tokens_per_step: int  # tokens of one optimiser step, over all ranks
    step: int = 0
    last_grads: dict[str, torch.Tensor] | None = None

    @property
    def tokens(self) -> int:
        return self.step * self.tokens_per_step


def tokens_per_step(cfg: RunConfig, world_size: int) -> int:
    t = cfg.train
    return t.batch_size * t.grad_accum * t.seq_len * world_size


def log_spaced_steps(max_steps: int, n: int) -> set[int]:
    """n steps spaced evenly in log-space between 1 and max_steps (dense early in training)."""
    if n <= 0:
        return set()
    return {int(round(x)) for x in np.geomspace(1, max_steps, n)}


def kept_steps(cfg) -> set[int]:
    """The steps whose checkpoints are saved and kept forever: checkpoint.keep_steps and checkpoint.log_spaced."""
    return set(cfg.checkpoint.keep_steps) | log_spaced_steps(cfg.train.max_steps, cfg.checkpoint.log_spaced)


def checkpoint_due(cfg, done: int, keep_forever: set[int]) -> bool:
    """Whether a checkpoint is saved after `done` steps: the last step, every checkpoint.every, and the kept ones."""
    every = cfg.checkpoint.every
    return done == cfg.train.max_steps or bool(every and done % every == 0) or done in keep_forever


def save(state: TrainState, run: RunFacts) -> None:
    """Rank 0 writes; every rank's dropout RNG is gathered into the one checkpoint. Under FSDP
    the shards are gathered first, so the files are the same as an unsharded run's."""
    rngs = distributed.gather_objects(torch.get_rng_state(), run.dist)
    model_state = sharding.full_model_state(state.model)
    opt_tensors, opt_meta = optimizer_to_tensors(state.optimizer)
    opt_tensors = sharding.full_optimizer_tensors(opt_tensors, keep=run.dist.is_main)
    if not run.dist.is_main:
        distributed.barrier(run.dist)
        return
    extra = {"rng.torch": rngs[0], **{f"rng.torch.{r}": t for r, t in enumerate(rngs)}}
    if run.device.type == "cuda":
        extra["rng.cuda"] = torch.cuda.get_rng_state(run.device)
    files = {"model": model_state, "optimizer": opt_tensors, "extra": extra}
    if run.cfg.checkpoint.save_grads and state.last_grads:
        files["grads"] = state.last_grads
    meta = {
        "optimizer": opt_meta,
        "method": state.method.state_dict(),
        "method_name": state.method.name,
        "adapters": state.method.adapter_facts(state.model),
        "world_size": run.dist.world_size,
        "tokens": state.tokens,
        "tokenizer_hash": run.corpus.manifest["tokenizer"]["hash"],
        "corpus": str(run.corpus.root.resolve()),
        "config": run.cfg.to_dict(),
    }
    root = run.run_dir / "checkpoints"
    ckpt.save_checkpoint(root, state.step, files, meta, log=run.log)
    ckpt.prune_checkpoints(root, run.cfg.checkpoint.keep_last, kept_steps(run.cfg), log=run.log)
    distributed.barrier(run.dist)


def find_checkpoint(run: RunFacts, restart: bool) -> ckpt.Checkpoint | None:
    """Rank 0: the newest valid checkpoint; None for a fresh start (with `restart`, existing ones are set
    aside); refuses to start over in silence when checkpoints exist but none is valid."""
    root = run.run_dir / "checkpoints"
    ckpt.recover(root, run.log)  # a re-save killed between its two renames
    folders = ckpt.list_checkpoints(root)
    if restart:
        for _, path in folders:
            run.log(f"[train] --restart: {path.name} set aside as {ckpt.set_aside(path, 'restart').name}")
        return None
    found = ckpt.latest_valid(root, log=run.log, set_aside_invalid=True)  # damaged newer ones kept as evidence
    if found is None and folders:
        raise CheckpointError(
            f"{root} holds {len(folders)} checkpoint folder(s) but none is valid (see above); "
            "repair one (restore it from a copy) "
            "or re-run with --restart to train from step 0 (the folders are set aside, not deleted)"
        )
    return found


def resume(run: RunFacts, restart: bool) -> ckpt.Checkpoint | None:
    """The checkpoint to resume from, the same one on every rank (rank 0 picks it); None for a fresh start.
    The loop builds the model for its method state (`method_state`) and hands it to `restore`."""
    found = distributed.on_rank0(lambda: find_checkpoint(run, restart), run.dist)
    if found is None and run.dist.is_main:
        truncate_metrics(run.run_dir, 0)  # rows of an attempt that died before its first checkpoint
    return found


def method_state(found: ckpt.Checkpoint) -> dict[str, Any]:
    """The method state a checkpoint was written with: the model to load it into must have its structure."""
    return found.meta["method"]


def restore(found: ckpt.Checkpoint, state: TrainState, run: RunFacts) -> None:
    """Load `found` into `state` (built for its method state): weights, optimiser, every rank's RNG, the
    method's state and the step; the metrics log is cut back to that step."""
    # under FSDP the full tensors stay on the CPU; each rank moves only its shards to the device
    where = "cpu" if run.sharded else str(run.device)
    try:
        sharding.load_full_model_state(state.model, found.load("model", where))
        opt_tensors = sharding.shard_optimizer_tensors(state.optimizer, found.load("optimizer", where))
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. a step folder copied from another run: its hashes verify
        raise CheckpointError(f"checkpoint {found.path} does not fit this run's model ({str(e).strip().splitlines()[0][:160]}); "
                              "it comes from another run or config: move it out of checkpoints/, or resume with the config "
                              "it was written with") from None
    optimizer_from_tensors(state.optimizer, opt_tensors, found.meta["optimizer"])
    restore_rng(found, run)
    state.method.load_state_dict(method_state(found))
    state.step = found.step
    if run.dist.is_main:
        truncate_metrics(run.run_dir, found.step)
    run.log(f"[train] resumed from {found.path} (step {found.step})")


def restore_rng(found: ckpt.Checkpoint, run: RunFacts) -> None:
    """This rank's dropout stream as saved; resumed on more ranks than it was saved with, a fresh,
    deterministic one for the new ranks."""
    extra = found.load("extra")
    own = f"rng.torch.{run.dist.rank}"
    if found.meta.get("world_size", 1) == run.dist.world_size and own in extra:
        torch.set_rng_state(extra[own])
    elif run.dist.is_main:
        torch.set_rng_state(extra["rng.torch"])
    else:
        torch.manual_seed(run.cfg.train.seed * 100_003 + found.step * 101 + run.dist.rank)
    if "rng.cuda" in extra and run.device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng.cuda"], run.device)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from, so the log has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if ln.strip() and _row_step(ln) <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62


def machine_failure(e: OSError, run_dir: Path) -> MachineError | None:
    """A MachineError (exit code 3) for an OSError of the machine during training (disk full, read-only; errors.MACHINE_ERRNOS),
    naming what failed and the last good checkpoint; None for other OSErrors."""
    if e.errno not in MACHINE_ERRNOS:
        return None
    try:
        last = ckpt.latest_valid(run_dir / "checkpoints", log=lambda *_: None)
    except OSError:
        last = None
    where = f" ({e.filename})" if e.filename else ""
    kept = f"the last good checkpoint is {last.path}" if last else "no checkpoint was written yet"
    return MachineError(f"the machine failed while training: {e.strerror or e}{where}; {kept}; "
                        "free space (or make the file system writable) and re-run the same command to resume")
