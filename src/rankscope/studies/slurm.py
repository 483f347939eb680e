"""Studies on a SLURM cluster: each study point is one SLURM job, submitted through submitit.

    rankscope sweep studies/slurm-example.yaml --launcher slurm             # submit, wait, report back
    rankscope sweep studies/slurm-example.yaml --launcher slurm --dry-run   # print every sbatch script
    rankscope sweep studies/slurm-example.yaml --status                     # jobs, states, steps, ETA

Resources come from the study file's `slurm:` section (SlurmResources' fields), overridden by CLI
flags (--partition, --time, ...). Inside a job of more than one GPU or node the run starts through
torchrun (rankscope.train.distributed.launch, the same code as `rankscope train --nproc`): one submitit
task per node, each starting `rankscope train ... --nproc G --nnodes N` at a c10d rendezvous on the
first node of the allocation (the sbatch script exports RANKSCOPE_RDZV_ENDPOINT).

Preemption follows submitit's checkpointing protocol: SLURM sends USR2 `signal_delay_s` before the
time limit (`--signal`), and SIGTERM on preemption. The job passes SIGTERM on to its train process,
which finishes its step, saves a checkpoint and exits 143 (rankscope.train.preemption); the job then
answers submitit's checkpoint() with the same command (a DelayedSubmission of a fresh PointJob) and
submitit requeues it; the requeued job resumes from that checkpoint in the same run directory.

`sweep.json` (in the study's runs_dir) keeps one record per point under "jobs": job id, cluster,
state, node list, log paths. Re-running the command skips finished points, waits on jobs that are
still queued or running (it re-attaches, it does not resubmit) and resubmits failed ones.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rankscope.config import safe_load
from rankscope.core.errors import ConfigError, TrainingError
from rankscope.core.jsonfiles import read_json_object

JOBS_FIX = "delete it (the runs themselves are kept; it is rewritten from the run folders) and submit again"

# The sbatch script computes the rendezvous once, on the first node, before srun starts one task
# per node; every task reads it from the environment srun passes on.
RDZV_SETUP = ['export RANKSCOPE_RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
              '$((29500 + SLURM_JOB_ID % 10000))"']
# SLURM and submitit states of a job that has not ended (a requeued job is pending again)
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
         "SIGNALING", "STAGE_OUT"}  # PREEMPTED is final unless SLURM requeues the job (it is PENDING again then)
# What a value written into an `#SBATCH` line may hold: no white space, quote, `$`, `;` or line end,
# so that no value can end its line (and start a shell line of the job script) or expand in a shell
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/&|!*\[\]()-]+")
SBATCH_FIELDS = ("partition", "account", "mem", "constraint", "qos")
STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}  # exit codes of a train stopped by a signal


@dataclass
class SlurmResources:
    """What each point's job asks SLURM for (the study file's `slurm:` section)."""

    partition: str | None = None
    """SLURM partition (sbatch --partition)."""
    account: str | None = None
    """account charged for the job (--account)."""
    time: str | int = 60
    """time limit per job: minutes, or [D-]HH:MM[:SS]; a run longer than this checkpoints and requeues."""
    nodes: int = 1
    """nodes per job; more than one starts torchrun on each at a rendezvous on the first."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); more than one starts torchrun with one process per GPU."""
    cpus_per_task: int | None = None
    """CPUs per node (one task per node)."""
    mem: str | None = None
    """memory per node, SLURM syntax: 64G, 500000M, 0 (all)."""
    constraint: str | None = None
    """node features (--constraint), e.g. h100."""
    qos: str | None = None
    """quality of service (--qos)."""
    sbatch: list[str] = field(default_factory=list)
    """extra sbatch options, one per item: --exclusive, --mail-type=END, --reservation=x."""
    setup: list[str] = field(default_factory=list)
    """shell lines run before the job starts (module load ..., source .venv/bin/activate)."""
    signal_delay_s: int = 120
    """seconds between the USR2 warning and the time limit (time to save a checkpoint)."""
    max_requeues: int = 20
    """time-limit requeues per job before submitit gives up (preemptions do not count)."""
    poll_s: float = 30.0
    """seconds between two looks at the jobs while waiting."""

    def __post_init__(self) -> None:
        self.minutes = time_minutes(self.time)
        for name in ("nodes", "gpus_per_node", "signal_delay_s", "max_requeues"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name == "nodes" else 0):
                raise ConfigError(f"slurm.{name}={v!r} must be a whole number{' >= 1' if name == 'nodes' else ' >= 0'}")
        if self.cpus_per_task is not None and (not isinstance(self.cpus_per_task, int) or self.cpus_per_task < 1):
            raise ConfigError(f"slurm.cpus_per_task={self.cpus_per_task!r} must be a whole number >= 1")
        for name in ("sbatch", "setup"):
            if not isinstance(getattr(self, name), list):
                raise ConfigError(f"slurm.{name} must be a list of strings, e.g. [--exclusive]")
        for opt in self.sbatch:
            if not str(opt).startswith("--"):
                raise ConfigError(f"slurm.sbatch option {opt!r} must start with --, e.g. --exclusive or --mail-type=END")
            inert(str(opt)[2:], "slurm.sbatch item")
        for name in SBATCH_FIELDS:
            v = getattr(self, name)
            if v is not None:
                inert(v, f"slurm.{name}")

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
    section = spec.get("slurm") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"study {study_path}: `slurm` must be a mapping (partition, time, nodes, gpus_per_node, ...)")
    valid = [f.name for f in fields(SlurmResources)]
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f"study {study_path}: unknown slurm key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    values = {**section}
    for k, v in (overrides or {}).items():
        if v is None or v == []:
            continue
        values[k] = [*values.get(k, []), *v] if k == "sbatch" else v
    return SlurmResources(**values)


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


# --------------------------------------------------------------------------- inside the job
def train_command(point, study, res: SlurmResources, threads: int) -> list[str]:
    """The train command each task of the job runs; ${VAR}s are read from the job's environment."""
    from rankscope.studies.study import point_commands

    cmd = point_commands(point, study, threads)[0][1]
    if res.distributed:
        cmd += [f"--nproc={res.nproc}", f"--nnodes={res.nodes}", "--rdzv-endpoint=${RANKSCOPE_RDZV_ENDPOINT}", "--rdzv-id=${SLURM_JOB_ID}"]
    return cmd


JOB_VARS = ("RANKSCOPE_RDZV_ENDPOINT", "SLURM_JOB_ID")  # the only ${VAR}s train_command writes


def expand_job_vars(arg: str) -> str:
    """`arg` with train_command's own ${VAR}s (JOB_VARS) read from the job's environment; nothing else is
    expanded (a `$` in a run name or an override value stays as written)."""
    for var in JOB_VARS:
        arg = arg.replace("${" + var + "}", os.environ.get(var, ""))
    return arg


def _ignore_usr2() -> None:
    # SLURM's --signal reaches every process of the job step: the train process and torchrun's workers
    # must not die of it (USR2's default action); the job answers it by sending them SIGTERM instead
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class PointJob:
    """One study point as a submitit job: train (resuming if a checkpoint is there), then the study's
    `after` steps on the first task. Checkpointable in submitit's sense (its signal handler calls a job's
    `checkpoint()` when it has one; submitit.helpers.Checkpointable is that method's default, not
    subclassed here so that `rankscope` does not import submitit at start): `checkpoint()` stops the
    train process with SIGTERM (it saves a checkpoint) and returns the same job to requeue."""

    def __init__(self, point, study, res: SlurmResources):
        self.point, self.study, self.res = point, study, res
        self.proc = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "proc": None}

    def _threads(self) -> int:
        """CPU threads per train process: the job's CPUs (cpus_per_task, else what it may run on) per GPU."""
        return max(1, (self.res.cpus_per_task or len(os.sched_getaffinity(0))) // self.res.nproc)

    def _run(self, cmd: list[str]) -> tuple[int, str]:
        import subprocess

        log_path = self.point.run_dir / "sweep.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self._threads())}
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen([expand_job_vars(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         preexec_fn=_ignore_usr2)
            # poll, not wait(): checkpoint() runs in a signal handler while this loop waits and polls too
            while self.proc.poll() is None:
                time.sleep(0.2)
        rc = self.proc.returncode
        with open(log_path, errors="replace") as fh:
            fh.seek(start)
            lines = [ln.strip() for ln in fh.read().splitlines() if ln.strip()]
        return rc, (lines[-1] if lines else f"exit code {rc}")

    def _forward(self, signum, frame) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def __call__(self) -> str:
        from submitit import JobEnvironment

        from rankscope.studies.study import mark_step_done, point_commands, prepare_point, read_marker

        env = JobEnvironment()
        first = env.global_rank == 0
        if first:
            prepare_point(self.point, self.study, self._threads())
        done = read_marker(self.point.run_dir / "study.json", self.study).get("steps_done", [])
        previous = signal.signal(signal.SIGTERM, self._forward)  # submitit ignores SIGTERM; the train process must see it
        try:
            for step, cmd in point_commands(self.point, self.study, self._threads()):
                if step == "train":
                    cmd = train_command(self.point, self.study, self.res, self._threads())
                elif not first or step in done:
                    continue
                rc, last = self._run(cmd)
                if rc in STOPPED:
                    self._requeue(env, last)
                if rc != 0:
                    raise TrainingError(f"{step}: {last}")
                if step != "train":
                    mark_step_done(self.point, step)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return "done"

    def _requeue(self, env, last: str) -> None:
        """The train process was stopped by a signal and saved a checkpoint: requeue through submitit's
        own handler (the USR2 it installed), which calls checkpoint() and exits this process."""
        if env.cluster not in ("slurm", "local"):
            raise TrainingError(f"train: {last}")
        print(f"[rankscope] train stopped ({last}); requeueing through submitit", flush=True)
        os.kill(os.getpid(), env._usr_sig())
        # the handler runs at once and ends this process; on the other tasks of a multi-node job submitit
        # leaves the requeue to the first task, whose requeue ends these too
        time.sleep(60)
        raise TrainingError(f"train: {last}; the job was not requeued")

    def checkpoint(self, *args, **kwargs):
        """submitit's checkpointing protocol: stop the train process (SIGTERM: it finishes its step and
        saves a checkpoint), wait for it, then hand back the same job for the requeue."""
        from submitit.helpers import DelayedSubmission

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + max(10, self.res.signal_delay_s - 15)
            while self.proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if self.proc.poll() is None:
                self.proc.kill()  # out of time: the periodic checkpoints still allow an exact resume
        return DelayedSubmission(PointJob(self.point, self.study, self.res))


# --------------------------------------------------------------------------- the launcher
def _jobs_file(study) -> Path:
    return study.runs_dir / "sweep.json"


def load_jobs(study) -> dict[str, dict[str, Any]]:
    path = _jobs_file(study)
    if not path.exists():
        return {}
    return dict(read_json_object(path, JOBS_FIX, ConfigError).get("jobs") or {})


def save_jobs(study, jobs: dict[str, dict[str, Any]]) -> None:
    path = _jobs_file(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_json_object(path, JOBS_FIX, ConfigError) if path.exists() else {"study": study.name, "study_file": str(study.path), "runs": []}
    data["jobs"] = jobs
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def job_key(point, study) -> str:
    return os.path.relpath(point.run_dir, study.runs_dir)


def progress(run_dir: Path, max_steps: int) -> tuple[int, float | None]:
    """(last logged step, seconds left at the last logged speed) of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for ln in path.read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:  # a line being written
                pass
    train = [r for r in rows if "train_loss" in r and r.get("tokens_per_s")]
    step = max((r.get("step", 0) for r in rows), default=0)
    if not train or step <= 0:
        return step, None
    last = train[-1]
    per_step = last["tokens"] / max(last["step"], 1)
    return step, max(0, max_steps - step) * per_step / last["tokens_per_s"]


def _eta(seconds: float | None) -> str:
    from rankscope.studies.study import _duration

    return "" if seconds is None else _duration(seconds)


class SlurmLauncher:
    """Runs study points as SLURM jobs (or submitit's local executor: cluster="local", for tests and
    single machines). `run(points, study)` blocks until every point has finished and has its status."""

    def __init__(self, res: SlurmResources, cluster: str | None = None, poll_s: float | None = None, show=print,
                 require_sbatch: bool = True):
        if require_sbatch and cluster in (None, "slurm") and shutil.which("sbatch") is None:
            raise ConfigError("--launcher slurm needs SLURM's `sbatch` on PATH and it is not there; run on a login node of the cluster, "
                              "or use --launcher local (or --dry-run to see the job scripts)")
        self.res, self.cluster, self.show = res, cluster or "slurm", show
        self.poll_s = res.poll_s if poll_s is None else poll_s
        self.live: dict[str, Any] = {}  # jobs submitted by this process (submitit Job objects), by run folder
        self.attached: dict[str, Any] = {}  # jobs of earlier processes, re-attached from sweep.json

    # ---- one job
    def executor(self, point, study):
        import submitit

        ex = submitit.AutoExecutor(folder=job_folder(point), cluster=self.cluster,
                                   slurm_max_num_timeout=self.res.max_requeues, local_max_num_timeout=self.res.max_requeues)
        # generic names for the local executor; slurm_* (its own names) win on SLURM, as in the dry run
        ex.update_parameters(name=job_name(point, study), timeout_min=self.res.minutes, tasks_per_node=1,
                             gpus_per_node=self.res.gpus_per_node, cpus_per_task=self.res.cpus_per_task,
                             **{f"slurm_{k}": v for k, v in slurm_parameters(self.res, job_name(point, study)).items()})
        return ex

    def submit(self, point, study) -> dict[str, Any]:
        from rankscope.studies.study import prepare_point

        prepare_point(point, study, 1)  # claims the run directory for the study before the job starts
        job = self.executor(point, study).submit(PointJob(point, study, self.res))
        try:
            job_folder(point).rmdir()  # submitit makes the un-substituted folder too; an empty `%j` confuses
        except OSError:
            pass
        self.live[str(point.run_dir.resolve())] = job
        return {"point": point.name, "job_id": job.job_id, "cluster": self.cluster, "state": "PENDING", "nodes": "",
                "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "folder": str(job.paths.folder),
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _job(self, rec: dict[str, Any]):
        import submitit

        run = str(Path(rec["folder"]).parent.parent.resolve())
        for known in (self.live.get(run), self.attached.get(run)):
            if known is not None and known.job_id == rec["job_id"]:
                return known
        cls = submitit.SlurmJob if rec["cluster"] == "slurm" else submitit.LocalJob
        self.attached[run] = cls(folder=Path(rec["folder"]).parent / "%j", job_id=rec["job_id"])
        return self.attached[run]

    def refresh(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Update a job record's state and node list from SLURM (sacct) or the local process."""
        job = self._job(rec)
        if rec["cluster"] == "slurm":
            info = job.get_info(mode="standard")  # one sacct call for all jobs, at most every few seconds
            rec["state"] = (info.get("State") or "UNKNOWN").split()[0]
            if rec["state"] == "UNKNOWN" and job in self.live.values():
                rec["state"] = "PENDING"  # just submitted: sacct does not list it yet
            rec["nodes"] = info.get("NodeList", rec.get("nodes", ""))
        elif getattr(job, "_process", None) is not None:  # a local job of this process
            rec["state"] = job.state  # submitit's words: RUNNING, FINISHED, INTERRUPTED
            rec["nodes"] = socket.gethostname()
        else:  # a local job of an earlier process: its controller's pid is the job id
            try:
                os.kill(int(rec["job_id"]), 0)
                rec["state"] = "RUNNING"
            except (ProcessLookupError, PermissionError, ValueError):
                rec["state"] = "FINISHED" if job.paths.result_pickle.exists() else "GONE"
        return rec

    def _error(self, rec: dict[str, Any]) -> str:
        try:
            exc = self._job(rec).exception()
        except Exception as e:  # no result written (killed, out of memory, cancelled)
            return f"job {rec['job_id']} ended {rec['state']} without a result ({type(e).__name__}); see {rec['stderr']}"
        if exc is None:
            return f"job {rec['job_id']} ended {rec['state']}; see {rec['stderr']}"
        # submitit's message holds the job's traceback; its last "Error: message" line is the cause
        causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", str(exc), flags=re.M)
        if not causes:
            return f"job {rec['job_id']} failed; see {rec['stderr']}"
        kind, message = causes[-1]
        return message if kind in ("TrainingError", "ConfigError", "DataError", "CheckpointError") else f"{kind}: {message}"

    # ---- the interface study.run_study uses
    def run(self, points, study) -> None:
        from rankscope.studies.study import point_state

        jobs = load_jobs(study)
        waiting = []
        for p in points:
            key = job_key(p, study)
            p.status = point_state(p, study)
            if p.status == "done":
                continue
            rec = jobs.get(key)
            if rec is not None and self.refresh(rec)["state"] in ALIVE:
                self.show(f"{p.name}: job {rec['job_id']} is {rec['state']}; waiting for it (not resubmitted)")
            else:
                if rec is not None:
                    self.show(f"{p.name}: job {rec['job_id']} ended {rec['state']}; resubmitting")
                jobs[key] = self.submit(p, study)
                self.show(f"{p.name}: submitted job {jobs[key]['job_id']} ({self.cluster}) -> {p.run_dir}")
            p.status = "running"
            waiting.append(p)
        save_jobs(study, jobs)
        started = time.time()
        while waiting:
            time.sleep(self.poll_s)
            for p in list(waiting):
                key = job_key(p, study)
                rec = self.refresh(jobs[key])
                if rec["state"] in ALIVE:
                    continue
                waiting.remove(p)
                p.seconds = time.time() - started
                p.status = point_state(p, study)
                if p.status != "done":
                    p.status, p.error = "failed", self._error(rec)
                self.show(f"{p.name}: job {rec['job_id']} {rec['state']} -> {p.status}")
            save_jobs(study, jobs)

    # ---- --dry-run and --status
    def script(self, point, study) -> str:
        return sbatch_script(point, study, self.res)

    def status_rows(self, study) -> list[dict[str, Any]]:
        return status_rows(study, self)


def sbatch_script(point, study, res: SlurmResources, python: str | None = None) -> str:
    """The sbatch script submitit writes for this point (same parameters as `submit`), and the train
    command each task then runs. Needs no SLURM: for --dry-run and the golden-file test."""
    from submitit.slurm.slurm import _make_sbatch_string  # the function SlurmExecutor writes its scripts with

    folder = job_folder(point)
    python = python or shlex.quote(sys.executable)
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    text = _make_sbatch_string(command=command, folder=folder, **slurm_parameters(res, job_name(point, study)))
    threads = max(1, (res.cpus_per_task or 1) // res.nproc)
    train = shlex.join(train_command(point, study, res, threads)).replace("'", "")
    tasks = f"each of the {res.nodes} tasks (one per node)" if res.nodes > 1 else "the job"
    return f"{text.rstrip()}\n\n# inside the job, {tasks} runs (then the study's `after` steps on the first):\n# {train}\n"


def status_rows(study, launcher: SlurmLauncher | None = None) -> list[dict[str, Any]]:
    """One row per point of the study and per job recorded in sweep.json (main-stage jobs of a staged
    study exist only once tuning has finished): state, job id, nodes, step reached, ETA, log."""
    from rankscope.studies.study import point_state

    jobs = load_jobs(study)
    rows, seen = [], set()
    items = [(job_key(p, study), p.name, p.run_dir, p.config["train"]["max_steps"], lambda p=p: point_state(p, study))
             for p in study.points]
    for key, rec in jobs.items():
        if key not in {i[0] for i in items}:
            run_dir = study.runs_dir / key
            cfg = yaml.safe_load((run_dir / "study-config.yaml").read_text()) if (run_dir / "study-config.yaml").exists() else {}
            max_steps = cfg.get("train", {}).get("max_steps", 0)
            items.append((key, rec.get("point", key), run_dir, max_steps, lambda d=run_dir, m=max_steps: _finished(d, m)))
    for key, name, run_dir, max_steps, state_of in items:
        if key in seen:
            continue
        seen.add(key)
        rec = jobs.get(key)
        if rec is not None and launcher is not None:
            try:
                rec = launcher.refresh(dict(rec))
            except Exception:  # sacct unreachable: show the recorded state
                pass
        step, eta = progress(run_dir, max_steps)
        state = state_of()
        job_state = rec["state"] if rec else ""
        rows.append({"point": key, "state": state if state == "done" or not rec else job_state.lower(), "job": rec["job_id"] if rec else "",
                     "nodes": rec.get("nodes", "") if rec else "", "step": f"{step}/{max_steps}",
                     "eta": _eta(eta) if job_state == "RUNNING" and state != "done" else "", "log": rec["stdout"] if rec else ""})
    return rows


def _finished(run_dir: Path, max_steps: int) -> str:
    from rankscope.studies.study import training_finished

    return "done" if training_finished(run_dir, max_steps) else "left"


def format_status(rows: list[dict[str, Any]]) -> str:
    cols = ["point", "job", "state", "nodes", "step", "eta", "log"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols} if rows else {c: len(c) for c in cols}
    out = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    out += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI flags (rankscope sweep)
CLI_FLAGS = [("partition", str, "SLURM partition"), ("account", str, "account charged"),
             ("time", str, "time limit per job: minutes or [D-]HH:MM:SS"), ("nodes", int, "nodes per job"),
             ("gpus-per-node", int, "GPUs per node"), ("cpus-per-task", int, "CPUs per node"), ("mem", str, "memory per node, e.g. 64G"),
             ("constraint", str, "node features, e.g. h100"), ("qos", str, "quality of service")]


def add_args(p) -> None:
    """`rankscope sweep` flags for SLURM; each overrides the study file's `slurm:` value."""
    g = p.add_argument_group("SLURM (--launcher slurm; each flag overrides the study file's `slurm:` section)")
    g.add_argument("--launcher", choices=["local", "slurm"], default="local", 
                   help="local subprocesses (default) or one SLURM job per point")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script of every point; submit nothing")
    g.add_argument("--status", action="store_true", help="print points, job ids, states, steps reached and ETA")
    for flag, tp, help in CLI_FLAGS:
        g.add_argument(f"--{flag}", type=tp, default=None, help=help)
    g.add_argument("--sbatch", action="append", default=None, metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--exclusive (repeatable)")


def resources_from_args(study_path, args) -> SlurmResources:
    over = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in CLI_FLAGS}
    over["sbatch"] = args.sbatch
    return resources(study_path, over)


def cli_launcher(study, args) -> SlurmLauncher | None:
    """`rankscope sweep` with --launcher slurm / --dry-run / --status: the launcher to run the study
    with, or None once --dry-run or --status has printed its answer."""
    res = resources_from_args(study.path, args)
    if args.dry_run:
        for p in study.points:
            print(f"# ---- {p.stage} {p.name}: {p.run_dir}\n{sbatch_script(p, study, res)}")
        if getattr(study, "tune", None) is not None:
            print(f"# the main (and control) jobs are submitted after every tuning job has finished, at the tuned {study.tune.field}")
        return None
    if args.status:
        print(format_status(status_rows(study, SlurmLauncher(res, require_sbatch=False))))
        return None
    return SlurmLauncher(res)
