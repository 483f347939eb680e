"""Inside a SLURM job: one study point as a submitit job (`PointJob`), run on the allocated node(s). It trains
(resuming from a checkpoint if there is one; through torchrun at a rendezvous when the job has several GPUs or
nodes), then runs the study's `after` steps on the first task, and follows submitit's checkpointing protocol:
a train process stopped by SIGTERM saves a checkpoint, and the job hands itself back to be requeued.
The login-node side (submitting, waiting, --status) is rankscope.studies.slurm."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from rankscope.core.errors import TrainingError
from rankscope.studies.points import mark_step_done, point_commands, prepare_point, read_marker
from rankscope.studies.slurm_resources import SlurmResources

STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}  # exit codes of a train stopped by a signal


def train_command(point, study, res: SlurmResources, threads: int) -> list[str]:
    """The train command each task of the job runs; ${VAR}s are read from the job's environment."""
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
