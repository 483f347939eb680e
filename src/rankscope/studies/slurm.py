"""Studies on a SLURM cluster: each study point is one SLURM job, submitted through submitit.

    rankscope sweep studies/slurm-example.yaml --launcher slurm             # submit, wait, report back
    rankscope sweep studies/slurm-example.yaml --launcher slurm --dry-run   # print every sbatch script
    rankscope sweep studies/slurm-example.yaml --status                     # jobs, states, steps, ETA

Resources come from the study file's `slurm:` section (SlurmResources' fields), overridden by CLI
flags (--partition, --time, ...). Inside a job of more than one GPU or node the run starts through
torchrun (rankscope.parallel.distributed.launch, the same code as `rankscope train --nproc`): one submitit
task per node, each starting `rankscope train ... --nproc G --nnodes N` at a c10d rendezvous on the
first node of the allocation (the sbatch script exports RANKSCOPE_RDZV_ENDPOINT).

Preemption follows submitit's checkpointing protocol: SLURM sends USR2 `signal_delay_s` before the
time limit (`--signal`), and SIGTERM on preemption. The job passes SIGTERM on to its train process,
which finishes its step, saves a checkpoint and exits 143 (rankscope.core.preemption); the job then
answers submitit's checkpoint() with the same command (a DelayedSubmission of a fresh PointJob) and
submitit requeues it; the requeued job resumes from that checkpoint in the same run directory.

`sweep.json` (in the study's runs_dir) keeps one record per point under "jobs": job id, cluster,
state, node list, log paths. Re-running the command skips finished points, waits on jobs that are
still queued or running (it re-attaches, it does not resubmit) and resubmits failed ones.

This module is the login-node side (submitting, waiting, --dry-run, --status, the sweep verb's SLURM flags);
the job itself is rankscope.studies.slurm_job, the resources rankscope.studies.slurm_resources.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rankscope.core.errors import ConfigError
from rankscope.studies.points import point_state, prepare_point, training_finished
from rankscope.studies.progress import duration
from rankscope.studies.record import load_jobs, save_jobs
from rankscope.studies.slurm_job import PointJob, train_command
from rankscope.studies.slurm_resources import SlurmResources, job_folder, job_name, resources, slurm_parameters

# SLURM and submitit states of a job that has not ended (a requeued job is pending again)
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
         "SIGNALING", "STAGE_OUT"}  # PREEMPTED is final unless SLURM requeues the job (it is PENDING again then)


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
    return "" if seconds is None else duration(seconds)


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

    # ---- the interface sweep.run_study uses
    def run(self, points, study) -> None:
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
