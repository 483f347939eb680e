"""Data-parallel training with PyTorch's own engine (torchrun): DDP, or FSDP2 for large presets.

    torchrun --nproc-per-node 2 -m rankscope train configs/mini.yaml -o runs/ddp
    rankscope train configs/mini.yaml -o runs/ddp --nproc 2      # the same, launched for you

gloo on CPU, NCCL on GPU. `train.batch_size` is per process, so the global batch is
batch_size x grad_accum x world_size, and rank r reads rows [(m*world + r)*B, ...) of the
deterministic stream (rankscope.data.stream): N processes see exactly the rows one process with
N times the batch sees. Checkpoints are written once, by rank 0, and hold nothing rank-specific
except each rank's dropout RNG, so a run resumes on any number of ranks.

`train.parallel=fsdp` shards weights, gradients and optimiser state instead of replicating them
(rankscope.parallel.sharding); the loop, the batch stream and the checkpoint files stay the same.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from rankscope.core import errors
from rankscope.parallel import sharding


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_initialized():
        # free what still holds collectives (FSDP's pending reduce-scatters sit in reference cycles
        # of the dropped trainer) while the process group exists
        gc.collect()
        dist.destroy_process_group()


def mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Average a Python float over ranks (identity on one process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def mean_and_any(value: float, flag: bool, info: DistInfo, device: torch.device) -> tuple[float, bool]:
    """Average a float over ranks and learn whether `flag` is set on any rank, in one all-reduce
    (the train loop's stop request rides on its loss reduction; identity on one process)."""
    if not info.enabled:
        return value, flag
    t = torch.tensor([value, 1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    loss, stop = t.tolist()  # one device-to-host copy
    return loss / info.world_size, stop > 0


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (identity on one process); every rank calls it."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], Any], info: DistInfo) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its error, to every rank (a broadcast): a
    RankscopeError keeps its type and message on every rank, any other error is a TrainingError there."""
    out: Any = None
    if info.is_main:
        try:
            out = ("ok", fn())
        except errors.RankscopeError as e:
            if not info.enabled:
                raise
            out = ("error", type(e).__name__, str(e))
            broadcast_object(out, info)
            raise
        except Exception as e:
            if info.enabled:
                broadcast_object(("error", "TrainingError", f"rank 0 failed ({type(e).__name__}: {e})"), info)
            raise
    out = broadcast_object(out, info)
    if out[0] == "error":
        error = getattr(errors, out[1], errors.TrainingError)(out[2])
        error.from_rank0 = True  # rank 0 prints it; the CLI keeps the other ranks quiet
        raise error
    return out[1]


def wrap_ddp(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel under torchrun (gradients all-reduced); itself on one process."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(forward_model: torch.nn.Module, model: torch.nn.Module, sync: bool, sharded: bool):
    """The context one micro-batch's forward + backward runs in: gradients are reduced across ranks
    only when `sync` (the step's last micro-batch). FSDP is told so on `model`; DDP skips its
    all-reduce inside `forward_model.no_sync()`."""
    if sharded:
        sharding.set_gradient_sync(model, sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else forward_model.no_sync()


def is_main_process() -> bool:
    """Rank 0 of the initialised process group, or a single process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank (identity on one process); every rank calls it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank_true(flag: bool, device: torch.device) -> bool:
    return not all_ranks_true(not flag, device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def launch(argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine, or on each of
    `nnodes` machines that meet at the c10d rendezvous `rdzv_endpoint` (HOST:PORT; rankscope.studies.slurm
    takes it from the SLURM allocation). Returns the exit code: 128 + N when a signal N stopped it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from rankscope.core.preemption import exit_code

    # torchrun prints a multi-line OMP_NUM_THREADS banner and sets 1 when the variable is unset;
    # setting it ourselves (the training config's train.threads still applies per process) keeps it quiet
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if nnodes > 1 or rdzv_endpoint:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id or 'rankscope'}"]
    else:
        where = ["--standalone"]
    args = [*where, f"--nproc-per-node={nproc}", "-m", "rankscope", *argv]
    # torchrun logs a warning per worker it stops and an error per worker that exits non-zero: the ranks
    # already printed the one line that matters (a stop, bad input, a machine failure); a crash gets the dump below
    quiet = {name: logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"))}
    levels = {name: lg.level for name, lg in quiet.items()}
    for lg in quiet.values():
        lg.setLevel(logging.CRITICAL)
    try:
        torchrun(args)
    except SystemExit as e:
        return int(e.code or 0)
    except SignalException as e:  # the launcher was signalled: it forwarded the signal, the workers saved and stopped
        return exit_code(e.sigval)
    except ChildFailedError as e:  # the workers alone were signalled (and stopped cleanly), bad input, or one crashed
        codes = {f.exitcode for f in e.failures.values()} - {-signal.SIGTERM, -signal.SIGKILL}  # those torchrun stopped
        if len(codes) == 1 and codes <= {exit_code(signal.SIGTERM), exit_code(signal.SIGINT), 2, errors.MACHINE_EXIT_CODE}:
            return codes.pop()  # a stop, bad input (2) or a machine failure (3): the ranks printed their line
        print(e.format_msg(), file=sys.stderr, flush=True)
        print(f"error: a training process failed ({type(e).__name__}); see the output above", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        print(f"error: a training process failed ({type(e).__name__}); see the output above", flush=True)
        return 1
    finally:
        for name, lg in quiet.items():
            lg.setLevel(levels[name])
    return 0
