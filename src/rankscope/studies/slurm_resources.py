"""What each point's SLURM job asks for: the study file's `slurm:` section as an `option()` dataclass
(SlurmResources, built by the one schema loader), overridden by `rankscope sweep`'s flags (--partition, --time,
...), and how it is written for submitit and sbatch (`slurm_parameters`, `job_name`, `job_folder`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.core.schema import build, check, option, safe_load

# The sbatch script computes the rendezvous once, on the first node, before srun starts one task
# per node; every task reads it from the environment srun passes on.
RDZV_SETUP = ['export RANKSCOPE_RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
              '$((29500 + SLURM_JOB_ID % 10000))"']
# What a value written into an `#SBATCH` line may hold: no white space, quote, `$`, `;` or line end,
# so that no value can end its line (and start a shell line of the job script) or expand in a shell
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/&|!*\[\]()-]+")
SBATCH_FIELDS = ("partition", "account", "mem", "constraint", "qos")


@dataclass
class SlurmResources:
    """What each point's job asks SLURM for (the study file's `slurm:` section)."""

    partition: str | None = option(None, "SLURM partition (sbatch --partition)")
    account: str | None = option(None, "account charged for the job (--account)")
    time: str | int = option(60, "time limit per job: minutes, or [D-]HH:MM[:SS]; a run longer than this checkpoints and requeues")
    nodes: int = option(1, "nodes per job; more than one starts torchrun on each at a rendezvous on the first")
    gpus_per_node: int = option(0, "GPUs per node (--gpus-per-node); more than one starts torchrun with one process per GPU")
    cpus_per_task: int | None = option(None, "CPUs per node (one task per node)")
    mem: str | None = option(None, "memory per node, SLURM syntax: 64G, 500000M, 0 (all)")
    constraint: str | None = option(None, "node features (--constraint), e.g. h100")
    qos: str | None = option(None, "quality of service (--qos)")
    sbatch: list[str] = option([], "extra sbatch options, one per item: --exclusive, --mail-type=END, --reservation=x")
    setup: list[str] = option([], "shell lines run before the job starts (module load ..., source .venv/bin/activate)")
    signal_delay_s: int = option(120, "seconds between the USR2 warning and the time limit (time to save a checkpoint)")
    max_requeues: int = option(20, "time-limit requeues per job before submitit gives up (preemptions do not count)")
    poll_s: float = option(30.0, "seconds between two looks at the jobs while waiting")

    def __post_init__(self) -> None:
        self.validate()  # built by the loader or by hand (tests, the launcher's callers): checked either way

    def validate(self) -> None:
        time_minutes(self.time)
        for name in ("nodes", "gpus_per_node", "signal_delay_s", "max_requeues"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= (1 if name == "nodes" else 0),
                  f"slurm.{name}={v!r} must be a whole number{' >= 1' if name == 'nodes' else ' >= 0'}")
        check(self.cpus_per_task is None or (isinstance(self.cpus_per_task, int) and self.cpus_per_task >= 1),
              f"slurm.cpus_per_task={self.cpus_per_task!r} must be a whole number >= 1")
        for name in ("sbatch", "setup"):
            check(isinstance(getattr(self, name), list), f"slurm.{name} must be a list of strings, e.g. [--exclusive]")
        for opt in self.sbatch:
            check(str(opt).startswith("--"), f"slurm.sbatch option {opt!r} must start with --, e.g. --exclusive or --mail-type=END")
            inert(str(opt)[2:], "slurm.sbatch item")
        for name in SBATCH_FIELDS:
            v = getattr(self, name)
            if v is not None:
                inert(v, f"slurm.{name}")

    @property
    def minutes(self) -> int:
        """The time limit in whole minutes."""
        return time_minutes(self.time)

    @property
    def nproc(self) -> int:
        """Processes per node: one per GPU."""
        return max(1, self.gpus_per_node)

    @property
    def distributed(self) -> bool:
        return self.nodes > 1 or self.gpus_per_node > 1


def inert(value: Any, what: str) -> str:
    """`value` as it may stand in an `#SBATCH` line (SBATCH_VALUE), else a ConfigError naming `what`."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if text is None or not SBATCH_VALUE.fullmatch(text):
        raise ConfigError(f"{what}={value!r} is not a single SLURM value; use letters, digits and _ . , : @ % + = / & | ! * [ ] ( ) - "
                          "(no spaces, quotes, $ or line breaks)")
    return text


def time_minutes(value: str | int) -> int:
    """SLURM's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes."""
    text = str(value).strip()
    days, dash, rest = text.rpartition("-")
    try:
        parts = [int(x) for x in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        parts, d = [], 0
    if dash and not days:
        parts = []
    if days and 1 <= len(parts) <= 3:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif not days and 1 <= len(parts) <= 3:  # MM, MM:SS, HH:MM:SS
        h, m, s = ([0, 0] + parts)[-3:] if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) == 2 else 0)
    else:
        h = m = s = -10**9
    total = d * 1440 + h * 60 + m + (1 if s > 0 else 0)
    if total <= 0:
        raise ConfigError(f"slurm time {value!r} is not a time limit; give minutes (90) or [D-]HH:MM:SS (2-00:00:00)")
    return total


def resources(study_path: str | Path, overrides: dict[str, Any] | None = None) -> SlurmResources:
    """The study file's `slurm:` section, then the CLI's values (those that are not None)."""
    spec = safe_load(Path(study_path).read_text()) or {}
    values = dict(spec.get("slurm") or {}) if isinstance(spec.get("slurm") or {}, dict) else spec["slurm"]
    for k, v in (overrides or {}).items():
        if v is None or v == [] or not isinstance(values, dict):
            continue
        values[k] = [*values.get(k, []), *v] if k == "sbatch" else v
    try:
        return build(SlurmResources, values, "slurm", kind="study")
    except ConfigError as e:
        raise ConfigError(f"study {study_path}: {e}") from None


def slurm_parameters(res: SlurmResources, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (its names: time in minutes, ntasks_per_node, ...)."""
    extra: dict[str, Any] = {}
    for opt in res.sbatch:
        key, eq, value = str(opt)[2:].partition("=")
        extra[key] = value if eq else True
    inert(name, "the job name (study name and point name)")
    params = {"job_name": name, "time": res.minutes, "nodes": res.nodes, "ntasks_per_node": 1, "signal_delay_s": res.signal_delay_s,
              "setup": [*res.setup, *(RDZV_SETUP if res.distributed else [])],
              "partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint, "mem": res.mem,
              "gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task, "additional_parameters": extra or None}
    return {k: v for k, v in params.items() if v is not None and v != []}


def job_name(point, study) -> str:
    return f"{study.name}.{point.name}"


def job_folder(point) -> Path:
    """submitit's folder of a point's jobs (submission script, pickles, logs): <run>/slurm/<job id>/."""
    return point.run_dir.resolve() / "slurm" / "%j"
