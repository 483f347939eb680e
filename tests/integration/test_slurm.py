"""rankscope.studies.slurm: studies as SLURM jobs through submitit. The end-to-end tests run submitit's real
code path with its local executor (cluster="local": a controller process per job, the pickled job,
its signal handlers and requeue); the sbatch script is checked against a golden file."""

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_final_weights, tiny_overrides, write_study

from rankscope.cli import main
from rankscope.config import merge_dicts, parse_overrides
from rankscope.core.errors import ConfigError
from rankscope.studies.points import point_state
from rankscope.studies.record import load_jobs
from rankscope.studies.slurm import SlurmLauncher, job_key, sbatch_script, status_rows
from rankscope.studies.slurm_resources import SlurmResources, resources, time_minutes
from rankscope.studies.study import load_study
from rankscope.studies.sweep import run_study

GOLDEN = Path(__file__).parent / "golden" / "slurm-2node-4gpu.sbatch"


@pytest.fixture()
def prepared(data_dir):
    """Prepare the tiny corpus once here, so that jobs running side by side do not both build it."""
    from rankscope.methods import load_config
    from rankscope.data.corpus import prepare

    prepare(load_config(None, tiny_overrides(data_dir)).data)
    return data_dir


def wait_for(job, timeout=120):
    t0 = time.time()
    while job.state == "RUNNING":
        assert time.time() - t0 < timeout, "the job did not finish"
        time.sleep(0.2)


def test_resources_come_from_the_study_then_the_cli(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0]}, slurm={"partition": "gpu", "time": "1-00:00:00", "sbatch": ["--exclusive"]})
    res = resources(path, {"partition": "debug", "nodes": 2, "sbatch": ["--mail-type=END"], "qos": None})
    assert (res.partition, res.minutes, res.nodes, res.sbatch) == ("debug", 1440, 2, ["--exclusive", "--mail-type=END"])
    assert [time_minutes(t) for t in (90, "1:30", "02:00:00", "2-12")] == [90, 2, 120, 3600]
    with pytest.raises(ConfigError, match="not a time limit"):
        time_minutes("soon")
    with pytest.raises(ConfigError, match="unknown study key 'slurm.gpus'; valid keys here: .*gpus_per_node"):
        resources(write_study(tmp_path, data_dir, {"train.seed": [0]}, slurm={"gpus": 4}))
    with pytest.raises(ConfigError, match="must start with --"):
        SlurmResources(sbatch=["exclusive"])


def test_slurm_without_sbatch_is_one_clear_line(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="needs SLURM's `sbatch` on PATH"):
        SlurmLauncher(SlurmResources())
    path = write_study(tmp_path, data_dir, {"train.seed": [0]})
    assert main(["sweep", str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --launcher slurm needs SLURM's `sbatch`")


def _golden_text(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0, 1]}, slurm={
        "partition": "gpu", "account": "lab", "time": "2-00:00:00", "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 32, "mem": "400G",
        "constraint": "h100", "qos": "normal", "sbatch": ["--exclusive", "--mail-type=END"], "setup": ["module load cuda/12.8"]})
    study = load_study(path)
    text = sbatch_script(study.points[0], study, resources(path), python="PYTHON")
    return text.replace(str(tmp_path.resolve()), "TMP").replace(sys.executable, "PYTHON"), path, study


def test_sbatch_script_of_a_two_node_four_gpu_point_matches_the_golden_file(tmp_path, data_dir, capsys):
    text, path, study = _golden_text(tmp_path, data_dir)
    if os.environ.get("RANKSCOPE_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=USR2@120",
                 "#SBATCH --time=2880", "#SBATCH --exclusive", "RANKSCOPE_RDZV_ENDPOINT=", "--nproc=4 --nnodes=2"):
        assert line in text
    # --dry-run prints the same script for every point and submits nothing
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("#!/bin/bash") == 2 and "--rdzv-endpoint=${RANKSCOPE_RDZV_ENDPOINT}" in out
    assert not (study.runs_dir / "sweep.json").exists()


def test_dry_run_is_what_submitit_hands_to_sbatch(tmp_path, data_dir, monkeypatch):
    """A fake `sbatch` / `srun` on PATH: submitit's SlurmExecutor writes its script and "submits" it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = write_study(tmp_path, data_dir, {"train.seed": [0]}, 
                       slurm={"nodes": 2, "gpus_per_node": 4, "partition": "gpu", "sbatch": ["--exclusive"]})
    study = load_study(path)
    launcher = SlurmLauncher(resources(path))
    rec = launcher.submit(study.points[0], study)
    assert rec["job_id"] == "4242" and rec["cluster"] == "slurm" and rec["stdout"].endswith("4242/4242_0_log.out")
    submitted = (tmp_path / "submitted.sh").read_text()
    assert submitted.rstrip() == sbatch_script(study.points[0], study, launcher.res).split("\n\n# inside the job")[0].rstrip()


@pytest.mark.slow  # ~25 s on 2 loaded cores: two jobs, each a controller, the job and its train process
def test_local_study_is_submitted_finished_reported_and_not_rerun(tmp_path, prepared, capsys):
    path = write_study(tmp_path, prepared, {"train.seed": [0, 1]}, "train.max_steps=6", slurm={"time": 10, "cpus_per_task": 1})
    study = load_study(path)
    launcher = SlurmLauncher(resources(path), cluster="local", poll_s=0.5, show=lambda *_: None)
    points = run_study(study, launcher=launcher, show=lambda *_: None)
    assert [p.status for p in points] == ["done", "done"], [p.error for p in points]
    sweep = json.loads((study.runs_dir / "sweep.json").read_text())
    assert [r["status"] for r in sweep["runs"]] == ["done", "done"]
    jobs = sweep["jobs"]
    for p in points:
        rec = jobs[job_key(p, study)]
        assert rec["state"] == "FINISHED" and rec["nodes"] and Path(rec["stdout"]).exists() and Path(rec["stderr"]).exists()
    rows = status_rows(study, launcher)
    assert [(r["state"], r["step"]) for r in rows] == [("done", "6/6"), ("done", "6/6")]
    assert main(["sweep", str(path), "--status"]) == 0
    table = capsys.readouterr().out
    assert all(rec["job_id"] in table for rec in jobs.values()) and "6/6" in table

    from rankscope.reports.report import write_report

    written = write_report([study.runs_dir], tmp_path / "report", log=lambda *_: None)
    assert all(Path(f).exists() for f in written.values())

    # submitted again: nothing is rerun, no job is submitted
    mtimes = {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in points}
    again = SlurmLauncher(resources(path), cluster="local", poll_s=0.5, show=lambda *_: None)
    points = run_study(load_study(path), launcher=again, show=lambda *_: None)
    assert [p.status for p in points] == ["done", "done"] and not again.live
    assert load_jobs(study) == jobs
    assert {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in points} == mtimes


@pytest.mark.slow  # ~20 s on 2 loaded cores
def test_failed_point_is_resubmitted_and_a_running_job_is_left_alone(tmp_path, prepared):
    path = write_study(tmp_path, prepared, {"data.tokenizer": [str(tmp_path / "missing.json")]}, "train.max_steps=6",
                       slurm={"cpus_per_task": 1})
    study = load_study(path)
    launcher = SlurmLauncher(resources(path), cluster="local", poll_s=0.3, show=lambda *_: None)
    run_study(study, launcher=launcher, show=lambda *_: None)
    p = study.points[0]
    assert p.status == "failed" and "tokenizer file" in p.error and "not found" in p.error
    first = load_jobs(study)[job_key(p, study)]["job_id"]
    # a second process sees a job of an earlier process still running: it waits on it instead of resubmitting
    jobs = load_jobs(study)
    jobs[job_key(p, study)] = {**jobs[job_key(p, study)], "job_id": str(os.getpid())}  # this process: alive
    from rankscope.studies.record import save_jobs

    save_jobs(study, jobs)
    other = SlurmLauncher(resources(path), cluster="local", show=lambda *_: None)
    assert other.refresh(dict(jobs[job_key(p, study)]))["state"] == "RUNNING"
    # once that job is gone, the failed point is submitted again
    jobs[job_key(p, study)]["job_id"] = first
    save_jobs(study, jobs)
    again = SlurmLauncher(resources(path), cluster="local", poll_s=0.3, show=lambda *_: None)
    run_study(load_study(path), launcher=again, show=lambda *_: None)
    assert list(again.live) == [str(p.run_dir.resolve())] and load_jobs(study)[job_key(p, study)]["job_id"] != first


@pytest.mark.slow  # ~25 s each on 2 loaded cores: a job, a requeue, a resume
@pytest.mark.parametrize("how", ["sigterm", "usr2"])
def test_a_signalled_job_requeues_and_ends_bit_identical(tmp_path, prepared, how):
    """sigterm: preemption (SLURM's SIGTERM, here to the job's controller, which passes it to the job);
    usr2: the time-limit warning of `--signal=USR2@N`, to the job process, whose submitit handler calls
    checkpoint(). Both: the train process saves its step, the job requeues and resumes."""
    import psutil

    from rankscope.methods import config_from_dict
    from rankscope.studies.record import save_jobs
    from rankscope.train.loop import train

    path = write_study(tmp_path, prepared, {"train.seed": [0]}, "train.max_steps=60", "checkpoint.every=10", "train.log_every=1",
                       slurm={"cpus_per_task": 1})
    study = load_study(path)
    point = study.points[0]
    launcher = SlurmLauncher(resources(path), cluster="local", show=lambda *_: None)
    rec = launcher.submit(point, study)
    save_jobs(study, {job_key(point, study): rec})
    job = launcher.live[str(point.run_dir.resolve())]
    metrics = point.run_dir / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.exists() and metrics.read_text().count("train_loss") >= 15):
        assert time.time() - t0 < 120 and job.state == "RUNNING", "training did not start"
        time.sleep(0.02)
    if how == "sigterm":
        job._process.send_signal(signal.SIGTERM)
    else:
        psutil.Process(job._process.pid).children()[0].send_signal(signal.SIGUSR2)
    row = status_rows(study, launcher)[0]  # --status while it runs: job id, state, step reached, ETA
    assert row["job"] == rec["job_id"] and row["state"] == "running" and int(row["step"].split("/")[0]) >= 15 and row["eta"]
    wait_for(job)
    log = (point.run_dir / "sweep.log").read_text()
    out = Path(rec["stdout"]).read_text() + Path(rec["stderr"]).read_text()
    assert "Calling checkpoint method" in out and "Requeued job" in out, out[-2000:]
    assert out.count("Starting with JobEnvironment") == 2 and "resumed from" in log, log[-2000:]
    assert "checkpoint saved; re-run the same command to resume" in log  # rankscope.core.preemption: saved at the stop step
    assert point_state(point, study) == "done"
    # the same run, unkilled, with the job's thread count (1: cpus_per_task)
    cfg = config_from_dict(merge_dicts(point.config, parse_overrides(["train.threads=1", "train.progress=false"])))
    train(cfg, tmp_path / "straight", log=lambda *_: None)
    assert_same_final_weights(point.run_dir, tmp_path / "straight", ("model", "optimizer"))


def test_the_example_study_file_loads_and_renders(capsys):
    path = Path(__file__).resolve().parents[2] / "studies" / "slurm-example.yaml"
    study = load_study(path, "/tmp/rankscope-example-not-created")
    res = resources(path)
    assert len(study.points) == 12 and (res.nodes, res.gpus_per_node, res.minutes) == (2, 4, 1440)
    text = sbatch_script(study.points[0], study, res)
    assert "#SBATCH --nodes=2" in text and "module load cuda/12.8" in text and "--nproc=4 --nnodes=2" in text


@pytest.mark.slow  # ~40 s on 2 loaded cores: two tuning jobs, then the main job
def test_staged_study_submits_the_main_job_after_every_tuning_job_ended(tmp_path, prepared):
    tune = {"field": "train.lr", "grid": [1e-3, 3e-3], "widen": 0, "overrides": ["train.max_steps=3"]}
    path = write_study(tmp_path, prepared, {"train.seed": [0]}, "train.max_steps=4", tune=tune, slurm={"cpus_per_task": 1})
    study = load_study(path)
    calls = []

    class Recording(SlurmLauncher):
        def run(self, points, study):
            tuned = [p for p in study.points if p.stage == "tune"]
            calls.append((points[0].stage, [point_state(p, study) for p in tuned], [p.values.get("train.lr") for p in points]))
            super().run(points, study)

    points = run_study(study, launcher=Recording(resources(path), cluster="local", poll_s=0.3, show=lambda *_: None), show=lambda *_: None)
    assert [c[0] for c in calls] == ["tune", "main"]
    assert calls[1][1] == ["done", "done"]  # every tuning job had ended before the main job was submitted
    chosen = json.loads((study.runs_dir / "sweep.json").read_text())["tuning"]["cells"][0]["chosen"]
    assert calls[1][2] == [chosen] and all(p.status == "done" for p in points)
    jobs = load_jobs(study)
    assert len(jobs) == 3 and sum(k.startswith("tune/") for k in jobs) == 2  # two tuning jobs, one main job


@pytest.mark.slow  # ~12 s: torchrun with 2 gloo ranks
def test_the_rendezvous_launch_each_node_runs_trains(tmp_path, prepared):
    """What each task of a multi-node job runs (`--nnodes --rdzv-endpoint`, torchrun's c10d rendezvous),
    here with one node of 2 CPU ranks: the global batch is both ranks' rows."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    over = tiny_overrides(prepared, "train.max_steps=3", "train.threads=1", "train.tensorboard=false")
    from helpers import REPO

    cmd = [sys.executable, "-m", "rankscope", "train", str(REPO / "configs" / "micro.yaml"), *over, "-o", str(tmp_path / "run"),
           "--nproc", "2", "--nnodes", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 4 * 32 * 2
