"""Nothing lost, nothing crashes (issue 14): retention, meta.json schema, rank-0 run folders,
preemption-safe stops, no silent start-over, one-line errors, and fuzzing of config and CLI."""

from __future__ import annotations

import json
import os
import random
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
from helpers import REPO, assert_same_final_weights, tiny_config, tiny_overrides

from rankscope.store import checkpoint as ckpt
from rankscope.cli import main
from rankscope.core.errors import CheckpointError, ConfigError
from rankscope.core.preemption import Preempted
from rankscope.train.loop import Trainer, train

QUIET = {"log": lambda *_: None}
STOP_LINE = re.compile(r"^stopped at step (\d+); checkpoint saved; re-run the same command to resume$")


def steps_of(run: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """A finished 20-step run with checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("reliab") / "base"
    train(tiny_config(data_dir, "train.max_steps=20", "train.tensorboard=false"), run, **QUIET)
    return run


def copy_run(base_run: Path, dest: Path) -> Path:
    shutil.copytree(base_run, dest)
    return dest


# --------------------------------------------------------------------------- retention
def test_an_invalid_folder_does_not_count_toward_keep_last(data_dir, base_run, tmp_path):
    """The issue's reproduction: `mkdir R/checkpoints/step_999999`, then keep_last=1."""
    run = copy_run(base_run, tmp_path / "R")
    (run / "checkpoints" / "step_999999").mkdir()
    messages: list[str] = []
    train(tiny_config(data_dir, "train.max_steps=40", "train.tensorboard=false", "checkpoint.keep_last=1"), run, log=messages.append,
          extend=True)  # a longer budget than base_run's 20 steps
    assert steps_of(run) == [40]
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", 40)).step == 40
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("invalid-step_999999-")]
    assert len(aside) == 1  # renamed, not deleted
    assert any("set aside as invalid-step_999999-" in m for m in messages)


def test_retention_keeps_the_newest_verified_and_listed_steps(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        ckpt.save_checkpoint(root, step, {"model": {"w": torch.full((2,), float(step))}}, {})
    newest = ckpt.step_dir(root, 5) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-3])  # the newest one is corrupt
    ckpt.prune_checkpoints(root, keep_last=1, keep_steps={2}, log=lambda *_: None)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]  # 4: the newest that verifies
    assert [p.name.split("-")[1] for p in root.glob("invalid-*")] == ["step_000005"]


# --------------------------------------------------------------------------- meta.json
def _reseal(folder: Path, meta: dict) -> None:
    ckpt.write_meta(folder, meta)


def _meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


CORRUPTIONS = {
    "a list": lambda f: (f / "meta.json").write_text("[1, 2]"),
    "empty mapping": lambda f: (f / "meta.json").write_text("{}"),
    "no step (resealed)": lambda f: _reseal(f, {k: v for k, v in _meta(f).items() if k != "step"}),
    "step is a string (resealed)": lambda f: _reseal(f, {**_meta(f), "step": "20"}),
    "empty file list (resealed)": lambda f: _reseal(f, {**_meta(f), "files": {}}),
    "empty file list + truncated model": lambda f: (
        (f / "meta.json").write_text(json.dumps({**_meta(f), "files": {}})),
        (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100])),
    "hash of a file is not hex (resealed)": lambda f: _reseal(f, {**_meta(f), "files": {**_meta(f)["files"], "model.safetensors": "x"}}),
    "redirected cache_dir (hand edit)": lambda f: (f / "meta.json").write_text(json.dumps(
        {**_meta(f), "config": {**_meta(f)["config"], "data": {**_meta(f)["config"]["data"], "cache_dir": "/tmp/elsewhere"}}})),
    "no own hash": lambda f: (f / "meta.json").write_text(json.dumps({k: v for k, v in _meta(f).items() if k != "meta_sha256"})),
    "step differs from its folder (resealed)": lambda f: _reseal(f, {**_meta(f), "step": 7}),
    "a file outside the folder (resealed)": lambda f: _reseal(f, {**_meta(f), "files": {**_meta(f)["files"], "../x": "0" * 64}}),
    "an unlisted file": lambda f: (f / "notes.safetensors").write_bytes(b"x"),
    "aliases of the wrong shape (resealed)": lambda f: _reseal(f, {**_meta(f), "aliases": [1]}),
    "not JSON": lambda f: (f / "meta.json").write_text("{"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_meta_corruption_is_one_line_for_eval_and_resume(data_dir, base_run, tmp_path, capsys, name):
    run = copy_run(base_run, tmp_path / "run")
    shutil.rmtree(ckpt.step_dir(run / "checkpoints", 10))
    folder = ckpt.step_dir(run / "checkpoints", 20)
    CORRUPTIONS[name](folder)
    with pytest.raises(CheckpointError, match="corrupt|incomplete|missing"):
        ckpt.verify(folder)
    assert main(["eval", str(folder), "--max-docs", "1"]) == 2
    one_line_error(capsys)
    assert main(["eval", str(run), "--max-docs", "1"]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    # resume refuses to start over: the only checkpoint is bad
    cfg = tiny_config(data_dir, "train.max_steps=20", "train.tensorboard=false")
    with pytest.raises(CheckpointError, match=r"none is valid .*--restart"):
        train(cfg, run, **QUIET)


def test_no_silent_start_over_and_restart_sets_folders_aside(data_dir, base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path / "run")
    for _, folder in ckpt.list_checkpoints(run / "checkpoints"):
        (folder / "meta.json").write_text("[1, 2]")
    over = tiny_overrides(data_dir, "train.max_steps=20", "train.tensorboard=false")
    argv = ["train", str(REPO / "configs" / "micro.yaml"), *over, "-o", str(run)]
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "none is valid" in err and "repair" in err and "--restart" in err
    assert main([*argv, "--restart"]) == 0
    capsys.readouterr()
    assert sorted(p.name.split("-")[1] for p in (run / "checkpoints").glob("restart-step_*")) == ["step_000010", "step_000020"]
    assert_same_final_weights(base_run, run)  # a fresh run from step 0, bit for bit
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "train_loss" in x]
    assert steps == list(range(1, 21))  # the earlier attempt's rows are gone, none duplicated


def test_eval_writes_a_corpus_only_where_the_user_asked(data_dir, base_run, tmp_path):
    from rankscope.evaluate.loading import load_trained

    folder = tmp_path / "step"
    shutil.copytree(ckpt.step_dir(base_run / "checkpoints", 20), folder)
    meta = _meta(folder)
    elsewhere = tmp_path / "elsewhere"
    meta["config"]["data"]["cache_dir"] = str(elsewhere)  # a run folder from another machine: its corpus is gone
    meta["corpus"] = str(tmp_path / "gone")
    _reseal(folder, meta)
    loaded = load_trained(folder, cache_dir=str(data_dir))
    assert Path(loaded.corpus.root).parent == Path(data_dir)
    assert not elsewhere.exists()


# --------------------------------------------------------------------------- preemption
class SignalAt:
    """A callback that sends `signum` to this very process at the end of step `step`."""

    def __init__(self, step: int, signum: int, rank: int | None = None):
        self.step, self.signum, self.rank = step, signum, rank

    def wants(self, trainer, step):
        return False

    def on_step_end(self, trainer, step):
        if step == self.step and (self.rank is None or trainer.dist.rank == self.rank):
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resumes_bit_exact(data_dir, base_run, tmp_path, signum, code):
    stop = random.Random(int(signum)).randint(3, 17)  # not a multiple of checkpoint.every=10 (except by chance)
    cfg = tiny_config(data_dir, "train.max_steps=20", "train.tensorboard=false")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    trainer.callbacks.append(SignalAt(stop, signum))
    with pytest.raises(Preempted) as err:
        trainer.run()
    assert err.value.step == stop and err.value.exit_code == code and STOP_LINE.match(str(err.value))
    assert signal.getsignal(signum) != trainer.stop._first  # the handler is uninstalled afterwards
    assert ckpt.verify(ckpt.step_dir(tmp_path / "run" / "checkpoints", stop)).step == stop
    train(cfg, tmp_path / "run", **QUIET)
    assert_same_final_weights(base_run, tmp_path / "run", files=("model", "optimizer"))


SECOND_SIGNAL = """
import os, signal, sys, time
import rankscope.core.preemption as p
p.DUPLICATE_WINDOW_S = float(sys.argv[1])
with p.StopOnSignal() as s:
    os.kill(os.getpid(), signal.SIGTERM)
    while not s.requested:
        time.sleep(0.01)
    print("first", flush=True)
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once_and_a_duplicate_is_ignored():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    at_once = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, "0"], capture_output=True, text=True, timeout=60, env=env)
    assert at_once.returncode == 143 and at_once.stdout == "first\n" and "second signal" in at_once.stderr
    duplicate = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, "10"], capture_output=True, text=True, timeout=60, env=env)
    assert duplicate.returncode == 0 and duplicate.stdout == "first\nstill running\n"


def rows_in(run: Path) -> int:
    path = run / "metrics.jsonl"
    return sum(1 for x in path.read_text().splitlines() if "train_loss" in x) if path.exists() else 0


def sigterm_cli_run(cmd: list[str], run: Path, at_rows: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start `cmd`, send SIGTERM once `at_rows` steps are logged, return the finished process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None and rows_in(run) < at_rows:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankscope", "train", str(REPO / "configs" / "micro.yaml"), *args]


def test_sigterm_from_outside_exits_143_with_one_line_then_resumes_bit_exact(data_dir, base_run, tmp_path):
    over = tiny_overrides(data_dir, "train.max_steps=40", "train.tensorboard=false", "train.threads=1")
    ref = tmp_path / "ref"
    train(tiny_config(data_dir, *over[len(tiny_overrides(data_dir)):]), ref, **QUIET)
    run = tmp_path / "run"
    stopped = sigterm_cli_run(cli(*over, "-o", str(run)), run, at_rows=random.Random(14).randint(3, 30))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    step = int(STOP_LINE.match(last).group(1))
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", step)).step == step < 40
    done = subprocess.run(cli(*over, "-o", str(run)), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_final_weights(ref, run, files=("model", "optimizer"))


def test_two_gloo_ranks_stop_at_the_same_step_and_resume_bit_exact(data_dir, base_run, tmp_path):
    """`--nproc 2`: SIGTERM to the launcher reaches both ranks; they agree on the step, save once,
    exit 143; resuming on 2 ranks ends bit-identical to an uninterrupted 2-rank run. The straight
    and the interrupted launch both start in fresh run folders (the rank race of issue 14)."""
    over = [*tiny_overrides(data_dir, "train.max_steps=24", "train.tensorboard=false", "train.threads=1"), "--nproc", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    straight = subprocess.run(cli(*over, "-o", str(ref)), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = sigterm_cli_run(cli(*over, "-o", str(run)), run, at_rows=random.Random(2).randint(3, 18), timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    lines = [ln for ln in (stopped.stdout + stopped.stderr).splitlines() if STOP_LINE.match(ln)]
    assert len(lines) == 1, stopped.stderr[-3000:]  # printed by rank 0 only
    step = int(STOP_LINE.match(lines[0]).group(1))
    assert steps_of(run)[-1] == step
    done = subprocess.run(cli(*over, "-o", str(run)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_final_weights(ref, run, files=("model", "optimizer"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agree_worker(rank, world, port, data_dir, run_dir, stop_at, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rankscope.parallel import distributed

    trainer = Trainer(tiny_config(data_dir, "train.max_steps=20", "train.tensorboard=false"), Path(run_dir), **QUIET)
    trainer.callbacks.append(SignalAt(stop_at, signal.SIGTERM, rank=1))  # only rank 1 is signalled
    try:
        trainer.run()
        step = None
    except Preempted as e:
        step = e.step
    Path(out, f"rank{rank}.json").write_text(json.dumps(step))
    trainer = None
    distributed.shutdown()


def test_ranks_agree_on_the_stop_step_when_one_rank_is_signalled(data_dir, base_run, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(agree_worker, args=(2, free_port(), str(data_dir), str(tmp_path / "run"), 7, str(tmp_path)), nprocs=2, join=True)
    # rank 0 is not signalled itself; it learns of rank 1's signal (sent after step 7's all-reduce)
    # in step 8's loss all-reduce, so both finish step 8 and stop there
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [8, 8]
    assert steps_of(tmp_path / "run") == [8]


def _fresh_launches(data_dir, tmp_path, n: int, extra: tuple[str, ...]) -> None:
    over = [*tiny_overrides(data_dir, "train.max_steps=2", "train.warmup_steps=1", "train.tensorboard=false", "train.threads=1",
                            "eval.per_domain=false", *extra), "--nproc", "2"]
    for i in range(n):
        r = subprocess.run(cli(*over, "-o", str(tmp_path / f"fresh{i}")), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert steps_of(tmp_path / f"fresh{i}") == [2]


@pytest.mark.slow
def test_many_fresh_two_rank_launches_do_not_race_on_the_run_folder(data_dir, base_run, tmp_path):
    """Issue 14's race (FSDP + ReLoRA, rank 1 read a half-written config.yaml) over 8 fresh launches;
    the default suite covers 2 fresh launches in test_two_gloo_ranks_stop_at_the_same_step_and_resume_bit_exact."""
    _fresh_launches(data_dir, tmp_path, 8, ("train.parallel=fsdp", "method.name=relora", "method.relora.rank=4", "method.relora.reset_every=2",
                                            "method.relora.restart_warmup_steps=1"))


# --------------------------------------------------------------------------- one-line errors
BAD_TRAIN = [
    (["model.n_kv_heads=0"], "model.n_kv_heads must be positive"),
    (["model.n_heads=0"], "model.n_heads must be positive"),
    (["model.preset=[1,2]"], "unknown model.preset"),
    (["model.rope_theta=0"], "model.rope_theta must be positive"),
    (["model.norm_eps=-1"], "model.norm_eps must be positive"),
    (["train.lr=.nan"], "finite number"),
    (["train.beta2=1.0"], "train.beta2 must be in [0, 1)"),
    (["train.warmup_steps=500", "train.max_steps=20"],
     "train.warmup_steps=500 must be in [0, train.max_steps=20]; lower train.warmup_steps or raise"),
    (["checkpoint.keep_steps=[0]"], "checkpoint.keep_steps"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "-1"], "--nproc must be >= 1, got -1"),
]


@pytest.mark.parametrize("extra,message", BAD_TRAIN)
def test_bad_train_values_are_one_line_errors(data_dir, tmp_path, capsys, extra, message):
    assert main(["train", "configs/micro.yaml", *extra, "-o", str(tmp_path / "r")]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_bad_output_paths_are_refused_before_any_compute(data_dir, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = ((a_file, "exists and is not a folder"), (a_file / "sub", "cannot be written"),
             (Path("/proc/rankscope-x"), "cannot be written"))
    for target, why in cases:
        assert main(["train", "configs/micro.yaml", *tiny_overrides(data_dir), "-o", str(target)]) == 2
        assert why in one_line_error(capsys)
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert main(["train", "configs/micro.yaml", *tiny_overrides(data_dir), "-o", str(ro / "run")]) == 2
        assert "cannot be written" in one_line_error(capsys)


def test_eval_options_and_json_target_are_checked_before_evaluating(base_run, tmp_path, capsys):
    assert main(["eval", str(base_run), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in one_line_error(capsys)
    assert main(["eval", str(base_run), "--json", "/proc/x.json"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "--json /proc/x.json cannot be written" in err.err and err.err.count("\n") == 1
    assert main(["eval", str(base_run), "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys)


# --------------------------------------------------------------------------- fuzzing
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rankscope.methods import describe_fields, load_config  # noqa: E402
from rankscope.core.errors import RankscopeError  # noqa: E402

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
FIELDS = [name for name, *_ in describe_fields()]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["micro", "relora", "fsdp", "bf16", "0", "-1", "1e-3", "[1, 2]", "{a: 1}", ".inf"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                      max_leaves=4)


def _raw(value) -> str:
    import yaml

    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


OVERRIDE = st.one_of(st.tuples(st.sampled_from(FIELDS), VALUES).map(lambda kv: f"{kv[0]}={_raw(kv[1])}"),
                     st.tuples(st.sampled_from(["model", "train", "", "model.x.y", "train.lr.z", "base"]), VALUES)
                     .map(lambda kv: f"{kv[0]}={_raw(kv[1])}"),
                     st.text(max_size=12))


@settings(FUZZ, max_examples=400)
@given(st.lists(OVERRIDE, max_size=6), st.sampled_from([None, "configs/micro.yaml", "configs/mini.yaml"]))
def test_fuzz_load_config_with_random_overrides(overrides, path):
    from rankscope.model import Decoder

    try:
        cfg = load_config(path, overrides)
    except ConfigError:
        return
    m = cfg.model
    if m.n_layers * m.d_model * max(m.ffn_dim, m.vocab_size) < 10**9:  # an accepted config builds (on the meta device)
        with torch.device("meta"):
            Decoder(m)


def _bad_run_folder(root: Path, content: bytes, where: str) -> Path:
    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    target = {"meta": run / "checkpoints" / "step_000010" / "meta.json", "config": run / "config.yaml",
              "model": run / "checkpoints" / "step_000010" / "model.safetensors"}[where]
    target.write_bytes(content)
    return run


CONTENT = st.one_of(st.binary(max_size=64), VALUES.map(lambda v: json.dumps(v).encode()),
                    st.sampled_from([b"[1,2]", b"{}", b'{"step": 1}', b'{"step": 10, "files": {}}', b"model: {n_heads: 0}"]))
VERBS = st.sampled_from([["eval"], ["analyze"], ["export", "-o", "{tmp}/hf"], ["eval", "--json", "/proc/x.json"],
                         ["eval", "--batch-size", "0"], ["report", "-o", "{tmp}/rep"]])


@settings(FUZZ, max_examples=60)
@given(VERBS, CONTENT, st.sampled_from(["meta", "config", "model"]), st.sampled_from(["run", "folder", "missing", "file"]))
def test_fuzz_cli_verbs_on_bad_run_folders_and_paths(tmp_path_factory, verb, content, where, shape):
    tmp = tmp_path_factory.mktemp("fuzz")
    run = _bad_run_folder(tmp, content, where)
    path = {"run": run, "folder": run / "checkpoints" / "step_000010", "missing": tmp / "nowhere", "file": run / "config.yaml"}[shape]
    if shape == "file":
        path.write_bytes(content)
    argv = [verb[0], str(path), *(a.replace("{tmp}", str(tmp)) for a in verb[1:])]
    _expect_clean_exit(argv)


def _expect_clean_exit(argv: list[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage error
        assert e.code == 2, argv
        return
    except RankscopeError:
        return
    assert code == 2, argv


@settings(FUZZ, max_examples=40)
@given(st.sampled_from(["prepare", "train", "sweep"]), CONTENT, st.sampled_from(["file", "missing", "folder"]))
def test_fuzz_config_verbs_on_bad_files(tmp_path_factory, verb, content, shape):
    from unittest import mock

    tmp = tmp_path_factory.mktemp("fuzz")
    path = {"file": tmp / "c.yaml", "missing": tmp / "none.yaml", "folder": tmp}[shape]
    if shape == "file":
        path.write_bytes(content)

    class Reached(RankscopeError):
        """A random file that happens to be a valid config: stop before any compute."""

    def reached(*a, **k):
        raise Reached("compute reached")

    with mock.patch("rankscope.data.corpus.prepare", reached), mock.patch("rankscope.train.loop.train", reached):
        extra = {"prepare": [], "train": ["-o", str(tmp / "out")], "sweep": ["--list", "--runs-dir", str(tmp / "runs")]}[verb]
        _expect_clean_exit([verb, str(path), *extra])
