import functools
import json

import pytest
import torch
from helpers import tiny_config

from rankscope.train import autotune
from rankscope.train.loop import Trainer, train


def losses(run):
    return [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]


def settings(run):
    return json.loads((run / "env.json").read_text())["settings"]


def test_auto_settings_are_measured_cached_recorded_and_leave_the_run_unchanged(data_dir, tmp_path):
    cache = tmp_path / "cache" / "autotune.json"
    auto = ["train.precision=auto", "train.compile=auto", "train.autotune_min_steps=0", f"train.autotune_cache={cache}",
            "method.name=lora", "method.lora.dropout=0.1", "train.max_steps=6", "checkpoint.every=0"]
    train(tiny_config(data_dir, *auto), tmp_path / "measured", log=lambda *_: None)
    first = settings(tmp_path / "measured")
    assert first["chosen_by"] == "measured" and first["timings_s"]["fp32_eager"] > 0
    assert first["compile"] is False and "compile_skipped_run_s" in first["timings_s"]  # 6 steps cannot repay a compile
    assert cache.exists() and str(tmp_path) not in json.dumps(json.loads(cache.read_text()))  # keyed by shapes, not by run
    train(tiny_config(data_dir, *auto), tmp_path / "cached", log=lambda *_: None)
    assert settings(tmp_path / "cached")["chosen_by"] == "cache"
    # the timing neither consumed the dropout RNG nor stepped the weights: same curve as pinned settings
    pinned = [*auto, f"train.precision={first['precision']}", "train.compile=false"]
    train(tiny_config(data_dir, *pinned), tmp_path / "pinned", log=lambda *_: None)
    assert settings(tmp_path / "pinned")["chosen_by"] == "config"
    assert losses(tmp_path / "measured") == losses(tmp_path / "pinned")


def test_short_runs_take_the_static_choice_and_resumes_keep_theirs(data_dir, tmp_path):
    cfg = tiny_config(data_dir, "train.precision=auto", "train.compile=auto", "train.max_steps=3",
                      f"train.autotune_cache={tmp_path / 'c.json'}")
    tr = Trainer(cfg, tmp_path / "run", log=lambda *_: None)
    assert tr.settings["chosen_by"].startswith("static") and tr.settings["compile"] is False
    again = Trainer(cfg, tmp_path / "run", log=lambda *_: None)  # the same run directory: a resume
    assert again.settings["chosen_by"].startswith("resumed") and again.precision == tr.precision
    assert not (tmp_path / "c.json").exists()


def test_the_compiled_candidate_is_timed_and_reused(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "COMPILE_MIN_RUN_S", 0.0)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo only: fast
    cfg = tiny_config(data_dir, "train.precision=fp32", "train.compile=auto", "train.autotune_min_steps=0",
                      f"train.autotune_cache={tmp_path / 'c.json'}")
    tr = Trainer(cfg, tmp_path / "run", log=lambda *_: None)
    assert set(tr.settings["timings_s"]) == {"fp32_eager", "fp32_compiled"}
    assert (tr.forward_model is not tr.model) == tr.settings["compile"]


def recompiles_over_relora(data_dir, tmp_path, backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    class Count:
        def on_step_end(self, trainer, step):
            graphs.append(counters["stats"]["unique_graphs"])

    cfg = tiny_config(data_dir, "method.name=relora", "method.relora.reset_every=3", "method.relora.restart_warmup_steps=1", "method.relora.dropout=0.0",
                      "train.max_steps=16", "train.compile=true", "checkpoint.every=8")
    tr = Trainer(cfg, tmp_path / backend, log=lambda *_: None)
    tr.callbacks.append(Count())
    assert tr.run()["relora_merges"] == 5
    return graphs


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_does_not_recompile_at_relora_merges(data_dir, tmp_path, monkeypatch, backend):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    graphs = recompiles_over_relora(data_dir, tmp_path, backend)
    assert graphs[0] > 0 and graphs[-1] == graphs[0], graphs  # every graph compiled at step 1, none after 5 merges
