"""The pre-flight check: each findings rule measurable or why not, before any compute; retention as analyze sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankscope.studies import preflight
from rankscope.cli import main
from rankscope.studies.study import load_study
from rankscope.train.loop import train
from helpers import REPO, tiny_config, write_study

CYCLES = {"reset_every": 5, "restart_warmup_steps": 1}  # shared method options: relora takes them, full has none
RULES = {"method": "relora", "reference": "full", "rules": [
    {"id": "a-loss", "test": "paired", "metric": "final_val_loss", "claim": "higher"},
    {"id": "b-loss", "test": "slope", "metric": "final_val_loss", "claim": "higher"},
    {"id": "c-blimp", "test": "paired", "metric": "blimp_overall", "claim": "lower", "chance": 0.5, "margin": 0.05},
    {"id": "d-grad", "test": "rank", "kind": "grad", "component": ["wv", "ov"], "metric": "per", "phase": "early", "claim": "lower"},
    {"id": "d-cum", "test": "rank", "kind": "cumulative_update", "component": ["wv", "ov"], "metric": "per", "phase": "early",
     "claim": "lower"},
]}


def reasons(study_path: Path) -> dict[str, str]:
    return {c.rule: (c.reason if not c.measurable else "measurable") for c in preflight.check_rules(load_study(study_path))}


def test_every_unmeasurable_rule_is_named_with_its_reason(tmp_path, data_dir, capsys):
    grad_ov = {"id": "d-grad-ov", "test": "rank", "kind": "grad", "component": "ov", "metric": "per", "phase": "early", "claim": "lower"}
    path = write_study(tmp_path, data_dir, {"method.name": ["full", "relora"], "train.seed": [0, 1]},
                       "checkpoint.keep_last=1", method_options=CYCLES, findings={**RULES, "rules": [*RULES["rules"], grad_ov]}, after=["analyze"])
    got = reasons(path)
    assert got["a-loss"] == "measurable"
    assert "1 size(s) for a slope: it needs 3 or more" in got["b-loss"]
    assert "BLiMP is not scored" in got["c-blimp"]
    assert "gradients are not saved: set checkpoint.save_grads=true" in got["d-grad [grad wv]"]
    assert "no early checkpoint kept" in got["d-cum [cumulative_update wv]"]
    assert "OV circuits" in got["d-grad-ov [grad ov]"]  # analyze forms OV circuits of weights and updates, not of gradients
    assert "no early checkpoint kept" in got["d-cum [cumulative_update ov]"]
    assert main(["sweep", "--check", str(path)]) == 2  # an error before any compute
    out, err = capsys.readouterr()
    assert "cannot be measured" in err and err.strip().count("\n") == 0
    for rule in got:
        assert rule in out


def test_a_study_that_fixes_them_is_measurable_and_gets_an_estimate(tmp_path, data_dir, monkeypatch, capsys):
    rules = {**RULES, "rules": [r for r in RULES["rules"] if r["id"] != "c-blimp"]}
    rules["rules"][-1] = {**rules["rules"][-1], "component": "wv"}
    rules["rules"][-2] = {**rules["rules"][-2], "component": "wv"}
    path = write_study(tmp_path, data_dir, {"model.d_model": [32, 48, 64], "method.name": ["full", "relora"], "train.seed": [0, 1]},
                       "checkpoint.save_grads=true", "checkpoint.log_spaced=3", method_options=CYCLES, findings=rules, after=["analyze"],
                       parallel=2)
    assert set(reasons(path).values()) == {"measurable"}
    monkeypatch.setattr(preflight, "time_steps", lambda cfg, steps=3, threads=1: 0.5)
    assert main(["sweep", "--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimated training wall time: 1 min 00 s" in out  # 12 runs x 20 steps x 0.5 s / 2 at once
    assert "micro d32/full" in out and "micro d48/relora" in out  # timed per width, not once for the preset


def test_the_estimate_counts_the_tuning_runs_the_tuner_makes(tmp_path, data_dir, monkeypatch, capsys):
    # 2 cells (method) x 3 lrs at the tuning seed and budget, plus 2 confirmation runs per cell at the main horizon; not one
    # set per main seed (the estimate counted 3 seeds x 3 lrs x 2 methods before)
    tune = {"field": "train.lr", "grid": [1e-3, 2e-3, 4e-3], "cell": ["method.name"], "overrides": ["train.max_steps=10"], "confirm": 2}
    path = write_study(tmp_path, data_dir, {"method.name": ["full", "relora"], "train.seed": [0, 1, 2]}, method_options=CYCLES,
                       tune=tune, parallel=2)
    configs = load_study(path).tuning_configs()
    assert len(configs) == 2 * (3 + 2)
    assert {c["train"]["seed"] for c in configs} == {1000}
    assert sorted(c["train"]["max_steps"] for c in configs) == [10] * 6 + [20] * 4
    monkeypatch.setattr(preflight, "time_steps", lambda cfg, steps=3, threads=1: 0.5)
    assert main(["sweep", "--check", str(path)]) == 0
    # (6 main runs x 20 steps + 6 x 10 + 4 x 20) x 0.5 s / 2 at once = 65 s
    assert "estimated training wall time: 1 min 05 s" in capsys.readouterr().out


SLOPE = {"id": "b", "test": "slope", "metric": "final_val_loss", "claim": "higher"}


@pytest.mark.parametrize("widths, ok", [([32, 64], False), ([32, 48, 64], True)])
def test_a_size_slope_needs_three_sizes_as_the_engine_does(tmp_path, data_dir, widths, ok):
    path = write_study(tmp_path, data_dir, {"model.d_model": widths, "method.name": ["full", "relora"], "train.seed": [0, 1]},
                       method_options=CYCLES, findings={"rules": [SLOPE]})
    got = reasons(path)["b"]
    assert got == "measurable" if ok else "2 size(s) for a slope: it needs 3 or more" in got


@pytest.mark.parametrize("steps, ok", [([20, 40], False), ([20, 40, 80], True)])
def test_a_token_slope_needs_three_budgets(tmp_path, data_dir, steps, ok):
    rule = {**SLOPE, "axis": "tokens_per_param"}
    path = write_study(tmp_path, data_dir, {"train.max_steps": steps, "method.name": ["full", "relora"], "train.seed": [0, 1]},
                       method_options=CYCLES, findings={"rules": [rule]})
    got = reasons(path)["b"]
    assert got == "measurable" if ok else "2 token budget(s) for a slope on tokens per parameter: it needs 3 or more" in got


@pytest.mark.parametrize("min_seeds, note", [(None, True), (3, False)])
def test_a_primary_with_too_few_seeds_is_measurable_with_a_note(tmp_path, data_dir, min_seeds, note):
    rules = {"rules": [{"id": "a", "test": "paired", "metric": "final_val_loss", "claim": "higher", "primary": True},
                       {"id": "a2", "test": "paired", "metric": "final_train_loss", "claim": "higher"}]}
    if min_seeds:
        rules["min_primary_seeds"] = min_seeds
    path = write_study(tmp_path, data_dir, {"method.name": ["full", "relora"], "train.seed": [0, 1, 2]}, method_options=CYCLES, findings=rules)
    checks = {c.rule: c for c in preflight.check_rules(load_study(path))}
    assert checks["a"].measurable and checks["a2"].measurable and checks["a2"].reason == ""
    want = "3 paired seeds: a primary endpoint needs 5 or more (findings.min_primary_seeds), so its verdict stays inconclusive"
    assert checks["a"].reason == (want if note else "")
    if note:
        assert f"a   measurable ({want})" in "\n".join(preflight.Preflight(list(checks.values())).lines())


def test_expect_unmeasured_lets_a_study_through(tmp_path, data_dir, monkeypatch):
    path = write_study(tmp_path, data_dir, {"method.name": ["full", "relora"], "train.seed": [0, 1]}, method_options=CYCLES, findings=RULES,
                       after=["analyze"], expect_unmeasured=["b-loss", "c-blimp", "d-grad", "d-cum"])
    monkeypatch.setattr(preflight, "time_steps", lambda cfg, steps=3, threads=1: 0.01)
    assert main(["sweep", "--check", str(path)]) == 0


def test_time_steps_measures_a_real_step(data_dir):
    cfg = tiny_config(data_dir).to_dict()
    assert 0 < preflight.time_steps(cfg, steps=1) < 60


def test_kept_checkpoints_are_what_retention_leaves(tmp_path, data_dir):
    cfg = tiny_config(data_dir, "checkpoint.every=4", "checkpoint.keep_last=2", "checkpoint.log_spaced=3",
                      "checkpoint.keep_steps=[6]", "train.tensorboard=false")
    train(cfg, tmp_path / "run", log=lambda *_: None)
    on_disk = {int(p.name.removeprefix("step_")) for p in (tmp_path / "run" / "checkpoints").glob("step_*")}
    assert on_disk == preflight.kept_checkpoints(cfg.to_dict())
    assert {1, 6, 20}.issubset(on_disk)


@pytest.mark.parametrize("study", ["studies/quick.yaml", "studies/paper-cpu.yaml", "studies/paper-gpu-short.yaml", "studies/methods-cpu.yaml"])
def test_the_shipped_studies_pass_the_check(study):
    bad = [(c.rule, c.reason) for c in preflight.check_rules(load_study(REPO / study)) if not c.measurable and not c.expected]
    assert not bad


@pytest.mark.parametrize("config", ["configs/micro.yaml", "configs/mini.yaml", "configs/english-cpu.yaml"])
def test_the_cpu_configs_keep_every_cycle_end_and_early_steps(config):
    from rankscope.methods import load_config

    cfg = load_config(REPO / config).to_dict()
    kept, steps, every = preflight.kept_checkpoints(cfg), cfg["train"]["max_steps"], cfg["checkpoint"]["every"]
    assert set(range(every, steps + 1, every)) <= kept  # every ReLoRA cycle end (a tenth of the run)
    assert len([s for s in kept if s <= steps / 4]) >= 4  # finding (d)'s early phase
