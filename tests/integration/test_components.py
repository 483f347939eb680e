"""Methods as components: per-layer adapter facts make adaptive and grow runs exportable and
analysable, and a new method is one file registered from outside the package."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import tiny_overrides

from rankscope.analysis.run import analyze_run
from rankscope.store.checkpoint import open_checkpoint
from rankscope.cli import main
from rankscope.config import check, option
from rankscope.methods import load_config
from rankscope.export import dense_state_dict
from rankscope.evaluate.loading import load_trained
from rankscope.methods import METHODS, register_method
from rankscope.methods.base import Method, StepEvents
from rankscope.adapters.lora import lora_modules
from rankscope.adapters.stored import adapter_layout, merged_state_dict
from rankscope.train.loop import train


def _adaptive_run(data_dir, tmp_path, *extra):
    over = tiny_overrides(data_dir, "method.name=adaptive", "method.adaptive.rank=8", "method.adaptive.reset_every=5", "method.adaptive.restart_warmup_steps=1",
                          "method.adaptive.dropout=0", "train.max_steps=12", "checkpoint.every=6", *extra)
    run = tmp_path / "run"
    summary = train(load_config(None, over), run, log=lambda s: None)
    return run, summary


@pytest.mark.parametrize("schedule", ["adaptive", "grow"])
def test_export_check_and_analyze_after_rank_changes(data_dir, tmp_path, schedule):
    run, summary = _adaptive_run(data_dir, tmp_path, f"method.adaptive.rank_schedule={schedule}", "method.adaptive.rank_min=2")
    # the first checkpoint whose adapters are no longer uniform rank 8: re-allocated (adaptive) or grown (grow)
    cks = [open_checkpoint(run / "checkpoints" / f"step_{s:06d}") for s in (6, 12)]
    changed = [ck for ck in cks if {f["rank"] for f in ck.meta["adapters"].values()} != {8}]
    assert changed, "no re-allocation happened: the test would not exercise per-layer ranks"
    ck = changed[0]
    dense, _ = dense_state_dict(ck)
    model = load_trained(ck.path).model
    ref = merged_state_dict(model.state_dict(), adapter_layout(model))
    assert all(torch.equal(dense[k], ref[k].float()) for k in ref)
    assert main(["export", str(ck.path), "-o", str(tmp_path / "hf"), "--check"]) == 0
    result = analyze_run(run)
    assert result.rows["run"] and "relora_merge" not in result.rows


@dataclass
class ToyConfig:
    lr_scale: float = option(0.5, "multiplier of the cosine schedule")

    def validate(self) -> None:
        check(self.lr_scale > 0, "method.toy.lr_scale must be positive")


class ToyMethod(Method):
    """Full-rank AdamW at a scaled learning rate, counting its steps: the smallest real method."""

    name = "toy"
    config_class = ToyConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.steps = 0

    def lr_multiplier(self, step: int) -> float:
        return self.config.lr_scale * super().lr_multiplier(step)

    def after_step(self, step, model, optimizer, notify=None) -> StepEvents:
        self.steps += 1
        return StepEvents({"toy_steps": self.steps} if step % 2 == 0 else {})

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))


def test_toy_method_registers_and_trains(data_dir, tmp_path):
    register_method(ToyMethod)
    try:
        cfg = load_config(None, tiny_overrides(data_dir, "method.name=toy", "method.toy.lr_scale=0.25", "train.max_steps=4"))
        assert cfg.to_dict()["method"] == {"name": "toy", "toy": {"lr_scale": 0.25}}
        summary = train(cfg, tmp_path / "toy", log=lambda s: None)
        assert summary["steps"] == 4 and summary["method"] == "toy"
        ck = open_checkpoint(tmp_path / "toy" / "checkpoints" / "step_000004")
        assert ck.meta["method"] == {"steps": 4}
        rows = [r for r in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines() if "toy_steps" in r]
        assert len(rows) == 2
        with pytest.raises(Exception, match="lr_scale must be positive"):
            load_config(None, tiny_overrides(data_dir, "method.name=toy", "method.toy.lr_scale=0"))
    finally:
        METHODS.pop("toy", None)


def test_the_registry_lists_every_method_once_and_refuses_a_second_of_a_name():
    """Registry order: full (base.py) first, then the modules alphabetically; a duplicate name raises."""
    from rankscope.methods import registry_of
    from rankscope.methods.relora import ReLoRAMethod

    known = ["full", "adaptive", "galore", "hybrid", "lora", "relora", "so", "so_single"]
    assert [n for n in METHODS if n in known] == known and list(METHODS)[0] == "full"
    assert METHODS["full"] is Method and METHODS["relora"] is ReLoRAMethod

    class Twin(Method):
        name = "lora"

    with pytest.raises(TypeError, match="two methods are named 'lora'"):
        register_method(Twin)
    assert METHODS["lora"].__name__ == "LoRAMethod"  # the shipped one stays
    with pytest.raises(TypeError, match="two methods are named 'full'"):
        registry_of([Method, type("Again", (Method,), {})])
    with pytest.raises(TypeError, match="register_method takes subclasses"):
        register_method(int)
    register_method(METHODS["relora"])  # the same class again is no second method


CYCLE = ["method.relora.reset_every=10", "method.relora.restart_warmup_steps=1"]  # ReLoRA cycles that fit a tiny run


def test_flat_method_options_are_refused_in_one_line_naming_the_nested_key(data_dir):
    from rankscope.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"write method\.relora\.rank=4 .*not method\.rank$"):
        load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.rank=4", *CYCLE))
    with pytest.raises(ConfigError, match=r"unknown config key 'method\.bogus'; valid keys here: name, adaptive"):
        load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.bogus=4", *CYCLE))
    nested = load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.relora.rank=4", *CYCLE))
    assert nested.method.options.rank == 4 and not hasattr(nested.method, "rank")
    assert set(lora_modules(torch.nn.Module())) == set()


def test_method_option_names_and_a_switch_of_method():
    """What a study's shared method options are checked against, and memory matching's reference method."""
    from rankscope.methods import method_option_names, switch_method

    assert {"rank", "alpha", "reset_every"} <= method_option_names("relora") and "rank" not in method_option_names("so")
    assert method_option_names("full") == set()
    cfg = load_config(None, ["method.name=so", "method.so.targets=[wv,wo]", "method.relora.rank=3", "method.relora.reset_every=10",
                             "method.relora.restart_warmup_steps=1", "method.so.support_every=10", "train.max_steps=40"])
    ref = switch_method(cfg, "relora")
    assert ref.method.name == "relora" and ref.method.options.rank == 3 and ref.method.options.targets == ["wv", "wo"]
    assert cfg.method.name == "so" and switch_method(ref, "so").method.options == cfg.method.options


def test_options_shared_by_several_methods_have_one_default():
    """An option several methods have has one default, so a switch of method (switch_method: the old
    method's values of the options both have) never depends on which method a value came from."""
    import dataclasses

    from rankscope.methods import METHODS

    defaults: dict[str, dict[str, object]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.config_class):
            defaults.setdefault(f.name, {})[name] = getattr(cls.config_class(), f.name)
    differing = {k: v for k, v in defaults.items() if len({repr(x) for x in v.values()}) > 1}
    assert not differing, differing
