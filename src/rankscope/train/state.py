"""A run's state in checkpoints: `save` writes the model, optimiser, method state and every rank's
RNG (rank 0 writes, under FSDP after gathering the shards); `resume` finds the newest valid
checkpoint (rank 0) and loads that same one on every rank, so a killed run resumed reaches
bit-identical weights. The functions take the Trainer whose state they save or restore;
only the training loop calls them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rankscope.store import checkpoint as ckpt
from rankscope.train import distributed, sharding
from rankscope.core.errors import MACHINE_ERRNOS, CheckpointError, MachineError

if TYPE_CHECKING:
    from rankscope.train.loop import Trainer


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


def save(trainer: Trainer) -> None:
    """Rank 0 writes; every rank's dropout RNG is gathered into the one checkpoint. Under FSDP
    the shards are gathered first, so the files are the same as an unsharded run's."""
    rngs = distributed.gather_objects(torch.get_rng_state(), trainer.dist)
    model_state = sharding.full_model_state(trainer.model)
    opt_tensors, opt_meta = ckpt.optimizer_to_tensors(trainer.optimizer)
    opt_tensors = sharding.full_optimizer_tensors(opt_tensors, keep=trainer.dist.is_main)
    if not trainer.dist.is_main:
        distributed.barrier(trainer.dist)
        return
    extra = {"rng.torch": rngs[0], **{f"rng.torch.{r}": t for r, t in enumerate(rngs)}}
    if trainer.device.type == "cuda":
        extra["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    files = {"model": model_state, "optimizer": opt_tensors, "extra": extra}
    if trainer.cfg.checkpoint.save_grads and trainer.last_grads:
        files["grads"] = trainer.last_grads
    meta = {
        "optimizer": opt_meta,
        "method": trainer.method.state_dict(),
        "method_name": trainer.method.name,
        "adapters": trainer.method.adapter_facts(trainer.model),
        "world_size": trainer.dist.world_size,
        "tokens": trainer.tokens_seen(trainer.step),
        "tokenizer_hash": trainer.corpus.manifest["tokenizer"]["hash"],
        "corpus": str(trainer.corpus.root.resolve()),
        "config": trainer.cfg.to_dict(),
    }
    root = trainer.run_dir / "checkpoints"
    ckpt.save_checkpoint(root, trainer.step, files, meta, log=trainer.log)
    ckpt.prune_checkpoints(root, trainer.cfg.checkpoint.keep_last, trainer.keep_forever, log=trainer.log)
    distributed.barrier(trainer.dist)


def find_checkpoint(trainer: Trainer) -> ckpt.Checkpoint | None:
    """Rank 0: the newest valid checkpoint; None for a fresh start; refuses to start over in
    silence when checkpoints exist but none is valid."""
    root = trainer.run_dir / "checkpoints"
    ckpt.recover(root, trainer.log)  # a re-save killed between its two renames
    folders = ckpt.list_checkpoints(root)
    if trainer.restart:
        for _, path in folders:
            trainer.log(f"[train] --restart: {path.name} set aside as {ckpt.set_aside(path, 'restart').name}")
        return None
    found = ckpt.latest_valid(root, log=trainer.log, set_aside_invalid=True)  # damaged newer ones kept as evidence
    if found is None and folders:
        raise CheckpointError(
            f"{root} holds {len(folders)} checkpoint folder(s) but none is valid (see above); "
            "repair one (restore it from a copy) "
            "or re-run with --restart to train from step 0 (the folders are set aside, not deleted)"
        )
    return found


def resume(trainer: Trainer) -> None:
    """Rank 0 picks the checkpoint; every rank loads that same one."""
    found = distributed.on_rank0(lambda: find_checkpoint(trainer), trainer.dist)
    if found is None:
        if trainer.dist.is_main:
            truncate_metrics(trainer.run_dir, 0)  # rows of an attempt that died before its first checkpoint
        return
    if found.meta["method"] != trainer.method.state_dict():  # e.g. past a switch to adapters, or new ranks
        trainer.setup_model(found.meta["method"])
    # under FSDP the full tensors stay on the CPU; each rank moves only its shards to the device
    where = "cpu" if trainer.sharded else str(trainer.device)
    try:
        sharding.load_full_model_state(trainer.model, found.load("model", where))
        opt_tensors = sharding.shard_optimizer_tensors(trainer.optimizer, found.load("optimizer", where))
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. a step folder copied from another run: its hashes verify
        raise CheckpointError(f"checkpoint {found.path} does not fit this run's model ({str(e).strip().splitlines()[0][:160]}); "
                              "it comes from another run or config: move it out of checkpoints/, or resume with the config "
                              "it was written with") from None
    ckpt.optimizer_from_tensors(trainer.optimizer, opt_tensors, found.meta["optimizer"])
    extra = found.load("extra")
    own = f"rng.torch.{trainer.dist.rank}"
    if found.meta.get("world_size", 1) == trainer.dist.world_size and own in extra:
        torch.set_rng_state(extra[own])
    elif trainer.dist.is_main:
        torch.set_rng_state(extra["rng.torch"])
    else:  # resumed on more ranks than it was saved with: a fresh, deterministic dropout stream
        torch.manual_seed(trainer.cfg.train.seed * 100_003 + found.step * 101 + trainer.dist.rank)
    if "rng.cuda" in extra and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(extra["rng.cuda"], trainer.device)
    trainer.method.load_state_dict(found.meta["method"])
    trainer.step = found.step
    if trainer.dist.is_main:
        truncate_metrics(trainer.run_dir, found.step)
    trainer.log(f"[train] resumed from {found.path} (step {found.step})")


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
