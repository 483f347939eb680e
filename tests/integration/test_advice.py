"""Advice that works: every schedule refusal and the refusal of the flat method form name a fix, and the fix runs as printed."""

from __future__ import annotations

import json
import re
import shlex
import warnings

import pytest
import yaml

from rankscope.cli import main
from rankscope.methods import load_config
from rankscope.core.errors import ConfigError
from helpers import REPO, tiny_overrides

METHODS_WITH_SCHEDULES = ["lora", "relora", "adaptive", "hybrid", "galore", "so", "so_single"]


def printed_fix(message: str) -> list[str]:
    """The overrides after 'set ' in a refusal, up to the parenthesis: `set a.b=1 c.d=2 (...)`."""
    m = re.search(r"; set (.+?) \(", message)
    assert m, message
    return shlex.split(m.group(1))


@pytest.mark.parametrize("config", ["configs/micro.yaml", "configs/mini.yaml", "configs/english-cpu.yaml"])
@pytest.mark.parametrize("name", METHODS_WITH_SCHEDULES)
def test_the_cpu_configs_ship_schedules_that_fit(config, name):
    cfg = load_config(REPO / config, [f"method.name={name}"])
    c, steps = cfg.method.options, cfg.train.max_steps
    for period in ("reset_every", "update_proj_gap", "support_every"):
        if hasattr(c, period):
            assert getattr(c, period) * 10 == steps, (period, getattr(c, period))  # the paper's 10 cycles per run
    if hasattr(c, "restart_warmup_steps"):
        assert c.restart_warmup_steps <= max(1, round(0.05 * c.reset_every) + 1)  # ~5% of a cycle


@pytest.mark.parametrize("name, option", [("relora", "reset_every"), ("adaptive", "reset_every"), ("hybrid", "reset_every"),
                                          ("galore", "update_proj_gap"), ("so", "support_every"), ("so_single", "support_every")])
def test_a_schedule_longer_than_the_run_is_refused_and_the_printed_fix_loads(data_dir, name, option):
    over = tiny_overrides(data_dir, f"method.name={name}")  # a 20-step run, the method's default period
    with pytest.raises(ConfigError, match=rf"method\.{name}\.{option}=\d+ does not fit a 20-step run") as err:
        load_config(None, over)
    message = str(err.value)
    assert "\n" not in message
    cfg = load_config(None, [*over, *printed_fix(message)])
    assert getattr(cfg.method.options, option) < cfg.train.max_steps


def test_a_warm_start_as_long_as_the_run_is_refused(data_dir):
    with pytest.raises(ConfigError, match=r"method\.lora\.warm_start_steps=20 covers the whole 20-step run"):
        load_config(None, tiny_overrides(data_dir, "method.name=lora", "method.lora.warm_start_steps=20"))
    over = tiny_overrides(data_dir, "method.name=relora", "method.relora.reset_every=10", "method.relora.warm_start_steps=15")
    with pytest.raises(ConfigError, match=r"method\.relora\.reset_every=10 does not fit a 5-step run") as err:
        load_config(None, over)  # merges count from the switch to adapters: 5 adapter steps
    load_config(None, [*over, *printed_fix(str(err.value))])


def test_relora_refusal_fix_trains_and_merges(data_dir, tmp_path):
    """`rankscope train configs/micro.yaml method.name=relora` on a short run: refused, then the printed fix merges."""
    over = [*tiny_overrides(data_dir, "method.name=relora"), "method.relora.reset_every=2000"]
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *over, "-o", str(tmp_path / "refused")]) == 2
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "micro.yaml", over)
    fix = printed_fix(str(err.value))
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *over, *fix, "-o", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["relora_merges"] >= 9, summary.get("relora_merges")


def test_the_flat_method_form_is_refused_with_a_fix_that_loads(data_dir):
    """`method.rank=4` (the retired flat form) is refused in one line naming the nested key to write (under the run's
    own method where it has the option, else a method that has it); the fix, as printed, loads and sets it there."""
    from rankscope.methods import method_option_names

    for name, flat in (("full", "method.alpha=16"), ("relora", "method.rank=4"), ("full", "method.targets=[wq,wv]"),
                       ("so", "method.support_every=5")):
        over = tiny_overrides(data_dir, f"method.name={name}", "method.relora.reset_every=10", "method.relora.restart_warmup_steps=1",
                              "method.so.support_every=5", "method.galore.update_proj_gap=5")
        over = [o for o in over if o.split("=")[0] != flat.split("=")[0].replace("method.", f"method.{name}.")]
        with pytest.raises(ConfigError) as err:
            load_config(None, [*over, flat])
        message = str(err.value)
        assert "\n" not in message and flat.split("=")[0] in message, message
        fix = re.search(r"write (\S+=\S+)", message).group(1)
        key, value = flat.split("=")
        option = key.split(".")[-1]
        section = fix.split("=")[0].split(".")[1]
        assert fix == f"method.{section}.{option}={value}" and option in method_option_names(section), message
        assert section == name or option not in method_option_names(name), message
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cfg = load_config(None, [*over, f"method.name={section}", fix])  # as printed: no notice, no error
        assert cfg.to_dict()["method"][section][option] == yaml.safe_load(value)
        assert load_config(None, [*over, fix]).method.name == name  # beside another method: checked, unused


def test_extending_a_finished_run_asks_for_extend(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    over = tiny_overrides(data_dir, "train.max_steps=6", "checkpoint.every=3", "train.tensorboard=false")
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *over, "-o", str(run)]) == 0
    capsys.readouterr()
    longer = [*over, "train.max_steps=8"]
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *longer, "-o", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.max_steps=6" in err and "--extend" in err, err
    # both printed fixes run: the schedule it had (already finished) ...
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *longer, "train.max_steps=6", "-o", str(run)]) == 0
    # ... or --extend, which trains the 2 steps more
    assert main(["train", str(REPO / "configs" / "micro.yaml"), *longer, "-o", str(run), "--extend"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_a_trained_run_with_an_old_schedule_stays_readable(data_dir):
    """Runs trained before the check (ReLoRA with no merge) are still evaluated, exported and analysed."""
    from rankscope.methods import config_from_dict

    raw = load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.relora.reset_every=10",
                                           "method.relora.restart_warmup_steps=1")).to_dict()
    raw["method"]["relora"]["reset_every"] = 2000
    with pytest.raises(ConfigError, match="does not fit"):
        config_from_dict(raw)
    assert config_from_dict(raw, schedule=False).method.options.reset_every == 2000
