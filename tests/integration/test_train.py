import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, Crash, CrashAfter, assert_same_final_weights, crash_and_resume, tiny_config, tiny_overrides

from rankscope.store import checkpoint as ckpt
from rankscope.cli import main
from rankscope.core.errors import TrainingError
from rankscope.train.loop import Trainer, train


def rows(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]




def test_loss_drops_and_run_directory_is_complete(data_dir, tmp_path):
    cfg = tiny_config(data_dir, "train.max_steps=40", "train.eval_every=20")
    summary = train(cfg, tmp_path / "run", log=lambda *_: None)
    r = rows(tmp_path / "run")
    train_rows = [x for x in r if "train_loss" in x]
    assert train_rows[0]["train_loss"] - train_rows[-1]["train_loss"] > 1.0
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s"} <= set(train_rows[0])
    assert [x["step"] for x in r if "val_loss" in x] == [20, 40]
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 32
    for f in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "run" / f).is_file()
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [30, 40]  # keep_last=2 of every-10


def test_log_spaced_and_listed_checkpoints_are_kept(data_dir, tmp_path):
    cfg = tiny_config(data_dir, "train.max_steps=30", "checkpoint.keep_steps=[10]", "checkpoint.log_spaced=4", "checkpoint.keep_last=1")
    train(cfg, tmp_path / "run", log=lambda *_: None)
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [1, 3, 10, 30]  # geomspace(1, 30, 4) -> 1, 3, 10, 30 (10 also listed)


def test_resume_mid_run_is_bit_exact(data_dir, tmp_path):
    over = tiny_overrides(data_dir, "train.max_steps=30", "checkpoint.every=5", "method.relora.dropout=0.0")
    straight, resumed = crash_and_resume(over, tmp_path, crash_at=16)  # resumes from step 15
    assert_same_final_weights(straight, resumed)
    # metrics.jsonl has no duplicated steps after the resume, and the same losses
    steps = [x["step"] for x in rows(resumed) if "train_loss" in x]
    assert steps == sorted(set(steps)) and steps[-1] == 30
    assert [x["train_loss"] for x in rows(straight) if "train_loss" in x] == [x["train_loss"] for x in rows(resumed) if "train_loss" in x]


def test_corrupt_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path):
    cfg = tiny_config(data_dir, "train.max_steps=20", "checkpoint.every=5", "checkpoint.keep_last=3")
    train(cfg, tmp_path / "ref", log=lambda *_: None)
    run = tmp_path / "run"
    trainer = Trainer(cfg, run, log=lambda *_: None)
    trainer.callbacks.append(CrashAfter(16))
    with pytest.raises(Crash):
        trainer.run()
    newest = ckpt.step_dir(run / "checkpoints", 15) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated write
    messages = []
    found = ckpt.latest_valid(run / "checkpoints", log=messages.append)
    assert found.step == 10 and "corrupt" in messages[0] and "falling back" in messages[0]
    train(cfg, run, log=lambda *_: None)
    assert_same_final_weights(tmp_path / "ref", run)


def test_nan_loss_stops_with_the_step_and_parameter_and_keeps_checkpoints(data_dir, tmp_path):
    class Poison:
        def on_step_end(self, trainer, step):
            if step == 6:
                with torch.no_grad():
                    trainer.model.blocks[1].mlp.w2.weight.fill_(float("nan"))

    trainer = Trainer(tiny_config(data_dir, "checkpoint.every=2"), tmp_path / "run", log=lambda *_: None)
    trainer.callbacks.append(Poison())
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 7; first non-finite gradient: [a-z_]+[.\w]*weight") as err:
        trainer.run()
    assert "last good checkpoint is kept" in str(err.value)
    found = ckpt.latest_valid(tmp_path / "run" / "checkpoints")
    assert found.step == 6  # written before the poison took effect at step 7; nothing after it


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["train", "configs/micro.yaml", "model.n_heads=7", "-o", str(tmp_path / "r")]) == 2
    assert "must divide" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_directory_refuses_a_different_config(data_dir, tmp_path):
    train(tiny_config(data_dir, "train.max_steps=4"), tmp_path / "run", log=lambda *_: None)
    from rankscope.core.errors import ConfigError

    with pytest.raises(ConfigError, match="different config"):
        train(tiny_config(data_dir, "train.max_steps=4", "train.lr=1e-4"), tmp_path / "run", log=lambda *_: None)


def test_sigkill_at_random_moments_then_resume_is_bit_exact(data_dir, tmp_path):
    """Kill a training subprocess several times (also during checkpoint writes), resume each time."""
    over = tiny_overrides(data_dir, "train.max_steps=60", "checkpoint.every=3", "checkpoint.keep_last=2", "train.log_every=1", "train.threads=1")
    train(tiny_config(data_dir, "train.max_steps=4"), tmp_path / "warm", log=lambda *_: None)  # corpus prepared once
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "rankscope", "train", str(REPO / "configs" / "micro.yaml"), *over]
    subprocess.run([*cmd, "-o", str(ref)], check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen([*cmd, "-o", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until it is training (a new metrics row), then kill after a random delay
        start_rows = len(rows(run)) if (run / "metrics.jsonl").exists() else 0
        t0 = time.time()
        while time.time() - t0 < 60 and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(rows(run)) > start_rows:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 3
    final = subprocess.run([*cmd, "-o", str(run)], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_final_weights(ref, run)
