"""Nothing lost, nothing crashes, round two (issue 24): one test (or a few) per defect D1-D8. Each fails on
the code before the fix: damaged checkpoints kept as evidence and re-saves in two renames (D1), one writer
per run folder and sweep (D2), inert SLURM values (D3), one line for each former traceback (D4) and under
--nproc (D5), no ignored values (D6), paths kept inside the study folder (D7), report.md escaped and a
prompt second signal (D8)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import one_line_error, REPO, tiny_config, tiny_overrides, write_study

from rankscope.store import checkpoint as ckpt
from rankscope.cli import main
from rankscope.methods import load_config
from rankscope.core.errors import ConfigError
from rankscope.train.loop import train

QUIET = {"log": lambda *_: None}
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run4(data_dir, tmp_path_factory):
    """A finished 4-step run with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("lost") / "run"
    train(tiny_config(data_dir, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=10", "train.tensorboard=false"),
          out, **QUIET)
    return out


@pytest.fixture
def copy(run4, tmp_path):
    return Path(shutil.copytree(run4, tmp_path / "run"))


def train_argv(data_dir, run: Path, *extra: str) -> list[str]:
    """A tiny train command; --extend, since several tests resume a 4-step run with train.max_steps=6 on purpose."""
    return ["train", "--extend", str(REPO / "configs" / "micro.yaml"),
            *tiny_overrides(data_dir, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=10", "train.tensorboard=false",
                            *extra), "-o", str(run)]


def reseal(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    meta["files"] = {f: ckpt._sha256(folder / f) for f in meta["files"]}
    ckpt.write_meta(folder, meta)


# --------------------------------------------------------------------------- D1 checkpoints kept as evidence
def test_d1_a_damaged_newest_checkpoint_is_set_aside_when_found_not_deleted(data_dir, copy, capsys):
    """The issue's reproduction: flip one byte of the newest checkpoint, run the same command again."""
    model = copy / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    assert main(train_argv(data_dir, copy)) == 0
    aside = sorted((copy / "checkpoints").glob("invalid-step_000004-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == bytes(data)  # the evidence, byte for byte
    assert ckpt.verify(ckpt.step_dir(copy / "checkpoints", 4)).step == 4  # and the step was trained again beside it


def _save(root: Path, step: int, value: float) -> Path:
    return ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((4,), value)}}, {})


def _value(root: Path, step: int) -> float:
    return float(ckpt.verify(ckpt.step_dir(root, step)).load("model")["w"][0])


def test_d1_a_resave_over_an_invalid_folder_sets_it_aside(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 3, 1.0)
    (ckpt.step_dir(root, 3) / "meta.json").write_text("{}")  # a hand edit the user meant to repair
    _save(root, 3, 2.0)
    assert _value(root, 3) == 2.0
    aside = list(root.glob("invalid-step_000003-*"))
    assert len(aside) == 1 and (aside[0] / "meta.json").read_text() == "{}"


@pytest.mark.parametrize("killed_at", [1, 2])
def test_d1_a_kill_between_the_renames_of_a_resave_leaves_a_complete_folder(tmp_path, monkeypatch, killed_at):
    """A re-save of step 5 is killed at its n-th rename (1: before the old folder moved, 2: between the
    two renames); the next prune (as at the next save) finds step 5 complete, old or new, never nothing."""
    root = tmp_path / "checkpoints"
    _save(root, 5, 1.0)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst).parent == root and len(calls) == killed_at:
            raise KeyboardInterrupt  # the kill
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 5, 2.0)
    monkeypatch.setattr(ckpt.os, "replace", real)
    ckpt.prune_checkpoints(root, keep_last=3, keep_steps=set(), log=lambda *_: None)
    assert _value(root, 5) in (1.0, 2.0)
    assert not list(root.glob(".old_step_*"))


def test_d1_prune_keeps_a_complete_tmp_folder_that_is_the_only_copy(tmp_path):
    root = tmp_path / "checkpoints"
    final = _save(root, 7, 3.0)
    os.replace(final, root / ".tmp_step_000007_12345")  # as left by a kill between rmtree/rename of the old code
    ckpt.prune_checkpoints(root, keep_last=3, keep_steps=set(), log=lambda *_: None)
    assert _value(root, 7) == 3.0


# --------------------------------------------------------------------------- D2 one writer
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d on host elsewhere\\n" % os.getpid())
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (as a second `rankscope train` would)."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder / ".rankscope.lock")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_d2_a_second_writer_on_a_run_folder_is_refused_in_one_line(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        assert main(train_argv(data_dir, run)) == 2
        one_line_error(capsys, str(run), f"pid {holder.pid} on host elsewhere")
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: nothing stale to clean up
    assert main(train_argv(data_dir, run)) == 0
    assert len([ln for ln in (run / "metrics.jsonl").read_text().splitlines() if "train_loss" in ln]) == 4


def test_d2_a_second_sweep_on_one_runs_folder_is_refused(data_dir, tmp_path, capsys):
    study = write_study(tmp_path, data_dir, {"train.seed": [0]}, "train.max_steps=3")
    holder = hold_lock(tmp_path / "runs")
    try:
        assert main(["sweep", str(study)]) == 2
        one_line_error(capsys, "sweep folder", "in use", f"pid {holder.pid}")
        assert not (tmp_path / "runs" / "seed=0").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_d2_two_real_trains_on_one_folder_the_second_refuses(data_dir, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "rankscope", *train_argv(data_dir, run, "train.max_steps=400", "checkpoint.every=1")]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while not (run / "metrics.jsonl").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    second = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=240)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=240)
    assert second.returncode == 2 and second.stderr.count("\n") == 1 and f"pid {first.pid}" in second.stderr, second.stderr


# --------------------------------------------------------------------------- D3 inert SLURM values
@pytest.mark.parametrize("where,value", [("partition", "gpu\ntouch /tmp/pwned"), ("account", "a b"), ("qos", "x$(id)"),
                                         ("mem", "64G\n#"), ("constraint", "h100;id"), ("sbatch", ["--mail-type=END\nid"]),
                                         ("name", "t\ntouch x")])
def test_d3_a_slurm_value_that_could_end_its_line_is_refused(data_dir, tmp_path, capsys, where, value):
    study = write_study(tmp_path, data_dir, {"train.seed": [0]}, "train.max_steps=3")
    spec = yaml.safe_load(study.read_text())
    if where == "name":
        spec["name"] = value
    else:
        spec["slurm"] = {where: value}
    study.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(study), "--dry-run"]) == 2
    out = capsys.readouterr()
    assert "#SBATCH" not in out.out and "Traceback" not in out.err and out.err.startswith("error: ") and out.err.count("\n") == 1


def test_d3_a_cli_flag_with_a_newline_is_refused_too(data_dir, tmp_path, capsys):
    study = write_study(tmp_path, data_dir, {"train.seed": [0]}, "train.max_steps=3")
    assert main(["sweep", str(study), "--dry-run", "--partition", "debug\necho hi"]) == 2
    assert "slurm.partition" in capsys.readouterr().err


def test_d3_inside_the_job_user_strings_are_not_expanded(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rankscope.studies import slurm

    seen = []

    class Proc:
        returncode = 0

        def __init__(self, argv, **kw):
            seen.append(argv)

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Proc)
    monkeypatch.setenv("SECRET_VAR", "expanded")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    job = slurm.PointJob(SimpleNamespace(run_dir=tmp_path), None, slurm.SlurmResources())
    job._run(["train", "train.wandb_project=$SECRET_VAR", "name-${SECRET_VAR}", "--rdzv-id=${SLURM_JOB_ID}"])
    assert seen[0][1:3] == ["train.wandb_project=$SECRET_VAR", "name-${SECRET_VAR}"]
    assert seen[0][3] == "--rdzv-id=77"  # the launcher's own placeholder still works


# --------------------------------------------------------------------------- D4 no traceback left
def test_d4_a_float_field_given_a_huge_integer_is_one_line():
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=" + "9" * 400])


def test_d4_every_config_field_given_a_huge_number_is_accepted_or_one_config_error():
    from rankscope.methods import describe_fields

    for name, *_ in describe_fields():
        for value in ("9" * 400, "-" + "9" * 400, str(2**64)):
            try:
                cfg = load_config(None, [f"{name}={value}"])
            except ConfigError:
                continue
            assert not any(isinstance(v, int) and abs(v) >= 2**63 for sec in cfg.to_dict().values() if isinstance(sec, dict)
                           for v in sec.values()), (name, "kept an integer beyond 64 bits")


def test_d4_a_study_base_that_is_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("name: s\nbase: [a.yaml, b.yaml]\ngrid: {train.seed: [0]}\n")
    assert main(["sweep", str(tmp_path / "s.yaml"), "--list"]) == 2
    one_line_error(capsys, "'base' must be str")


def test_d4_a_checkpoint_of_another_shape_is_one_line(data_dir, copy, capsys):
    folder = copy / "checkpoints" / "step_000004"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)  # a step folder copied from a run of another shape: its hashes verify
    save_file(tensors, str(folder / "model.safetensors"))
    reseal(folder)
    assert main(train_argv(data_dir, copy, "train.max_steps=6")) == 2
    one_line_error(capsys, "step_000004", "does not fit")


def test_d4_a_resealed_malformed_optimiser_plain_state_is_one_line(data_dir, copy, capsys):
    folder = copy / "checkpoints" / "step_000004"
    meta = json.loads((folder / "meta.json").read_text())
    reseal(folder, optimizer={**meta["optimizer"], "plain_state": {"nodot": 1}})
    assert main(train_argv(data_dir, copy, "train.max_steps=6")) == 2
    one_line_error(capsys, "optimizer state")


def test_d4_ctrl_c_during_the_imports_is_one_line():
    # a verb whose module imports torch (`info` and `--help` no longer do: rankscope.cli imports verbs lazily)
    # the child starts with SIGINT's default disposition, as a shell in a terminal gives it (an ignored SIGINT is inherited)
    proc = subprocess.Popen([sys.executable, "-m", "rankscope", "export", "no-such-run", "-o", "no-such-out"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps, t0 = Path(f"/proc/{proc.pid}/maps"), time.time()
    while proc.poll() is None and time.time() - t0 < 60 and "libtorch" not in maps.read_text():
        time.sleep(0.005)  # until torch's libraries load: inside the imports (rankscope.export imports torch)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and err.count("\n") == 1 and out == "", (proc.returncode, err)


@pytest.fixture
def tmpfs(tmp_path):
    """A 6 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_d4_disk_full_while_a_checkpoint_is_written_exits_3_naming_the_last_good_one(data_dir, tmpfs, capsys):
    """A real full disk: a 6 MiB tmpfs holds the first checkpoint (3.7 MB), then is filled to ~100 kB."""
    run = tmpfs / "run"
    assert main(train_argv(data_dir, run, "train.max_steps=3", "checkpoint.every=3", "checkpoint.log_spaced=0", "checkpoint.save_grads=false")) == 0
    capsys.readouterr()
    with open(tmpfs / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(tmpfs / "filler", max(0, (tmpfs / "filler").stat().st_size - 100_000))
    assert main(train_argv(data_dir, run)) == 3
    line = one_line_error(capsys, "No space left on device", "step_000003", "re-run the same command to resume")
    assert "machine failed" in line
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", 3)).step == 3 and not list((run / "checkpoints").glob(".tmp_step_*"))


def test_d4_a_read_only_file_system_mid_run_exits_3(data_dir, copy, capsys, monkeypatch):
    """Simulated (no remount mid-run in a test): the checkpoint write meets EROFS."""

    def read_only(tensors, path, metadata=None):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(ckpt, "save_file", read_only)
    assert main(train_argv(data_dir, copy, "train.max_steps=6")) == 3
    one_line_error(capsys, "Read-only file system", "step_000004")


# --------------------------------------------------------------------------- D5 --nproc
@pytest.mark.slow
def test_d5_nproc_with_bad_input_exits_2_with_one_line(data_dir, copy):
    for folder in (copy / "checkpoints").glob("step_*"):
        (folder / "meta.json").write_text("{}")  # none valid: every rank refuses (exit 2)
    argv = [sys.executable, "-m", "rankscope", *train_argv(data_dir, copy, "train.max_steps=6"), "--nproc", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=240)
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "ChildFailedError" not in done.stderr and "exitcode" not in done.stderr, done.stderr


@pytest.mark.slow
def test_d5_a_signal_stop_under_nproc_prints_only_the_promised_line(data_dir, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "rankscope", *train_argv(data_dir, run, "train.max_steps=400", "train.threads=1"), "--nproc", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 240 and (not (run / "metrics.jsonl").exists()
                                                              or (run / "metrics.jsonl").read_text().count("\n") < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, (out, err)
    assert re.fullmatch(r"stopped at step \d+; checkpoint saved; re-run the same command to resume\n", err), err


# --------------------------------------------------------------------------- D6 nothing ignored
def test_d6_an_inactive_method_section_is_validated():
    with pytest.raises(ConfigError, match="rank"):
        load_config(None, ["method.name=full", "method.relora.rank=0"])


def test_d6_a_duplicate_yaml_key_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.001\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'train'"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("extra,message", [({"when": {"method.name": ["train.lr=1"]}}, "field=value"),
                                           ({"when": {"train.lr=0.1": ["train.max_steps=3"]}}, "neither a grid field"),
                                           ({"parallel": 0}, "`parallel`"),
                                           ({"name": "../../x"}, "`name`")])
def test_d6_d7_study_keys_that_would_be_ignored_or_leave_the_folder_are_refused(data_dir, tmp_path, capsys, extra, message):
    study = write_study(tmp_path, data_dir, {"train.seed": [0, 1]}, "train.max_steps=3")
    spec = {**yaml.safe_load(study.read_text()), **extra}
    if extra.get("name"):
        spec.pop("runs_dir")
    study.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(study), "--list"]) == 2
    one_line_error(capsys, message)


def test_d6_report_spectra_steps_must_be_steps(run4, tmp_path, capsys):
    assert main(["report", str(run4), "-o", str(tmp_path / "rep"), "--spectra-steps", "-1"]) == 2
    one_line_error(capsys, "--spectra-steps")


def test_d6_unreadable_metrics_rows_are_counted_and_reported(copy, tmp_path):
    with open(copy / "metrics.jsonl", "ab") as fh:
        fh.write(b'[1]\n{"step": 1, "lo\n')
    with pytest.warns(UserWarning, match="2 line"):
        assert main(["report", str(copy), "-o", str(tmp_path / "rep")]) == 0


# --------------------------------------------------------------------------- D7 paths stay in the study folder
def test_d7_report_does_not_follow_sweep_json_out_of_the_study_folder(run4, tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    outside = Path(shutil.copytree(run4, tmp_path / "elsewhere"))
    (study / "sweep.json").write_text(json.dumps({"runs": [{"name": "../elsewhere", "status": "done"},
                                                           {"name": "x", "run_dir": str(outside), "status": "done"}]}))
    assert main(["report", str(study), "-o", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, "outside the study folder")


# --------------------------------------------------------------------------- D8 escaping, a prompt second signal
def test_d8_report_md_escapes_what_it_quotes(run4, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(run4, study / "ok")
    (study / "bad").mkdir()
    (study / "bad" / "config.yaml").write_text("{}")
    payload = "<img src=x onerror=alert(1)>\n| injected | row |"
    (study / "sweep.json").write_text(json.dumps({"runs": [{"name": "ok", "status": "done"},
                                                           {"name": "bad", "status": "<b>failed</b>", "error": payload}]}))
    assert main(["report", str(study), "-o", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "<img" not in md and "<b>" not in md and "&lt;img src=x" in md and "\n| injected" not in md


SECOND = """
import datetime, sys
import rankscope.core.preemption as p
import torch.distributed as dist
p.DUPLICATE_WINDOW_S = 0.2
with p.StopOnSignal():
    print("ready", flush=True)
    # blocks in C++ waiting for a rank 1 that never comes (as a collective does while its peer is busy)
    dist.init_process_group("gloo", rank=0, world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[1]}",
                            timeout=datetime.timedelta(seconds=200))
"""


def test_d8_a_second_signal_acts_while_the_main_thread_is_inside_a_long_c_call():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SECOND, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # past the duplicate window
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a hang guard, far below the 200 s the C call would take
    finally:
        proc.kill()
    assert proc.returncode == 143 and "second signal" in err
