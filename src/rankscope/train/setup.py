"""A training run's set-up, in the order `rankscope.train.loop.Trainer` calls it: this process (ranks, device),
the run directory, the data, then the model, method and optimiser, the precision / compile settings,
and the module the loop calls. Each step takes what it needs and returns what it builds; the Trainer
holds the results (and rebuilds the model through `build_parts` when a resume restructures the method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rankscope.parallel import distributed, sharding
from rankscope.train import autotune
from rankscope.train.callbacks import Callback, build_callbacks
from rankscope.config import RunConfig
from rankscope.data.corpus import Corpus, prepare
from rankscope.data.stream import BatchStream, run_streams
from rankscope.parallel.distributed import DistInfo
from rankscope.core.errors import ConfigError
from rankscope.methods import build_model
from rankscope.methods.runconfig import normalised_config
from rankscope.methods.base import Method
from rankscope.store.run_dir import write_run_dir, write_settings
from rankscope.core.runtime import pick_device

Log = Callable[[str], None]


def start_process(cfg: RunConfig) -> tuple[DistInfo, torch.device]:
    """This process's rank (torchrun's environment, or one process) and device; sets the thread count
    (train.threads) and joins the process group under torchrun."""
    dist = distributed.from_env()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, dist.local_rank if dist.enabled else None)
    distributed.init(dist, device)
    return dist, device


def open_run_dir(run_dir: Path, cfg: RunConfig, device: torch.device, dist: DistInfo, new_schedule_ok: bool = False) -> dict | None:
    """Rank 0 checks and writes the run directory; the other ranks never read it (a fresh folder's
    config.yaml may be half-written while they look) and learn the verdict by broadcast. Returns the
    precision / compile a previous attempt chose (a resumed run keeps them), None for a fresh run."""
    return distributed.on_rank0(lambda: write_run_dir(run_dir, cfg, device, dist.world_size, new_schedule_ok, normalised_config), dist)


def build_data(cfg: RunConfig, dist: DistInfo, log: Log) -> tuple[Corpus, BatchStream, BatchStream]:
    """The prepared corpus and this rank's (training, validation) batch streams."""
    corpus = prepare(cfg.data, log=log)
    vocab = corpus.manifest["tokenizer"]["vocab_size"]
    if vocab > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
                          f"raise model.vocab_size to >= {vocab}")
    train_stream, val_stream = run_streams(corpus, cfg.train, dist.rank, dist.world_size)
    return corpus, train_stream, val_stream


def is_sharded(cfg: RunConfig, dist: DistInfo, log: Log) -> bool:
    """Whether the model is sharded with FSDP: train.parallel=fsdp under torchrun (one process has nothing to shard)."""
    sharded = dist.enabled and cfg.train.parallel == "fsdp"
    if cfg.train.parallel == "fsdp" and not sharded:
        log("[train] train.parallel=fsdp on one process: nothing to shard, training unsharded")
    return sharded


def rank_callbacks(cfg: RunConfig, callbacks: list[Callback] | None, dist: DistInfo) -> list[Callback]:
    """This rank's callbacks: `callbacks` (None: those `cfg` turns on, rankscope.train.callbacks.build_callbacks)
    on rank 0; none on the others, which wait at the next all-reduce while rank 0 evaluates. Every rank
    builds them, so that a config they refuse stops every rank alike."""
    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    return list(callbacks) if dist.is_main else []


def build_parts(cfg: RunConfig, method_state: dict[str, Any] | None, device: torch.device, sharded: bool,
                precision: str, init: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Method, torch.optim.Optimizer]:
    """(model, method, optimiser): the method in `method_state` (a checkpoint's, or None for a fresh
    run), from the dense weights `init` where given (a fine-tune's base); under FSDP the model is
    sharded first, so that the optimiser holds the shards."""
    # under FSDP only the shards move to the device (sharding.shard_model)
    model, method = build_model(cfg, method_state, None if sharded else device, init)
    if sharded:
        sharding.shard_model(model, precision, device)
    return model, method, method.build_optimizer(model, device)


def choose_settings(cfg: RunConfig, model: nn.Module, device: torch.device, dist: DistInfo, previous: dict | None,
                    run_dir: Path, log: Log) -> tuple[dict[str, Any], nn.Module | None]:
    """(settings, compiled module or None). precision / compile: as configured, or for `auto` by timing
    this model (rankscope.train.autotune); the choice and its timings go into env.json (rank 0)."""
    settings, compiled = autotune.choose(cfg, model, device, dist.enabled, previous, log=log)
    if dist.is_main:
        write_settings(run_dir, settings)
    return settings, compiled


def forward_module(model: nn.Module, settings: dict[str, Any], dist: DistInfo, device: torch.device, sharded: bool,
                   compiled: nn.Module | None = None) -> nn.Module:
    """The module the loop calls: `model` in DDP over ranks (FSDP shards it in place instead), then
    torch.compile'd when settings["compile"]; `compiled` is autotune's, which wraps the bare model."""
    module = model if sharded else distributed.wrap_ddp(model, dist, device)
    if not settings["compile"]:
        return module
    return compiled if compiled is not None and module is model else torch.compile(module)
