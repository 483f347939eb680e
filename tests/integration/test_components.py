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
from rankscope.config import check, load_config, option
from rankscope.export import dense_state_dict
from rankscope.evaluate.loading import load_trained
from rankscope.methods import METHODS, register_method
from rankscope.methods.base import Method, StepEvents
from rankscope.methods.lora import lora_modules, merged_state_dict, adapter_layout
from rankscope.train.loop import train


def _adaptive_run(data_dir, tmp_path, *extra):
    over = tiny_overrides(data_dir, "method.name=adaptive", "method.rank=8", "method.reset_every=5", "method.restart_warmup_steps=1",
                          "method.dropout=0", "train.max_steps=12", "checkpoint.every=6", *extra)
    run = tmp_path / "run"
    summary = train(load_config(None, over), run, log=lambda s: None)
    return run, summary


@pytest.mark.parametrize("schedule", ["adaptive", "grow"])
def test_export_check_and_analyze_after_rank_changes(data_dir, tmp_path, schedule):
    run, summary = _adaptive_run(data_dir, tmp_path, f"method.rank_schedule={schedule}", "method.rank_min=2")
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


TOY_MODULE = """
from rankscope.methods.base import Method
from rankscope.methods.relora import ReLoRAMethod  # imported, not listed here: relora's method


class Helper(Method):  # a helper base: not listed, so not a method
    pass


class DroppedIn(Helper):
    name = "dropped_in"


class Unlisted(Method):  # has a name, but METHODS does not list it: not registered
    name = "unlisted"


METHODS = [DroppedIn]
"""


def test_a_method_module_dropped_into_the_package_is_discovered(tmp_path, monkeypatch):
    import sys

    import rankscope.methods as pkg
    from rankscope.methods import discover_methods

    (tmp_path / "dropped_in.py").write_text(TOY_MODULE)
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])  # the file, as if it sat in src/rankscope/methods/
    try:
        found = discover_methods()
        assert found["dropped_in"].__module__ == "rankscope.methods.dropped_in"
        assert set(found) == set(METHODS) | {"dropped_in"}  # the package's own methods, each once; no Helper, no Unlisted
        assert "unlisted" not in found
        assert list(found)[0] == "full" and found["relora"].__module__ == "rankscope.methods.relora"
        (tmp_path / "twin.py").write_text("from rankscope.methods.base import Method\n\nclass Twin(Method):\n    name = 'lora'\n")
        assert set(discover_methods()) == set(found)  # a module without METHODS exports nothing
        (tmp_path / "twin.py").write_text("from rankscope.methods.base import Method\n\nclass Twin(Method):\n    name = 'lora'\n"
                                          "\n\nMETHODS = [Twin]\n")
        sys.modules.pop("rankscope.methods.twin", None)
        with pytest.raises(TypeError, match="two methods are named 'lora'"):
            discover_methods()
        (tmp_path / "twin.py").write_text("METHODS = [int]\n")
        sys.modules.pop("rankscope.methods.twin", None)
        with pytest.raises(TypeError, match="rankscope.methods.twin.METHODS takes subclasses"):
            discover_methods()
    finally:
        for mod in ("rankscope.methods.dropped_in", "rankscope.methods.twin"):
            sys.modules.pop(mod, None)
    assert "dropped_in" not in METHODS  # discovery returns a registry; it does not change the live one


def test_the_package_modules_list_their_methods():
    """Registry order: full (base.py) first, then the modules alphabetically, each in its METHODS order."""
    known = ["full", "adaptive", "galore", "hybrid", "lora", "relora", "so", "so_single"]
    assert [n for n in METHODS if n in known] == known and list(METHODS)[0] == "full"
    assert METHODS["full"] is Method


CYCLE = ["method.relora.reset_every=10", "method.relora.restart_warmup_steps=1"]  # ReLoRA cycles that fit a tiny run


def test_flat_method_options_are_mapped_with_a_deprecation_line(data_dir):
    with pytest.warns(FutureWarning, match="method.relora"):
        flat = load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.rank=4", *CYCLE))
    nested = load_config(None, tiny_overrides(data_dir, "method.name=relora", "method.relora.rank=4", *CYCLE))
    assert flat.method.options == nested.method.options and nested.method.rank == 4
    assert set(lora_modules(torch.nn.Module())) == set()


def test_options_shared_by_several_methods_have_one_default():
    """An option of the earlier flat form that a method lacks reads the first registered method's
    default (config.MethodSection); with one default per shared name the registry order cannot matter."""
    import dataclasses

    from rankscope.methods import METHODS

    defaults: dict[str, dict[str, object]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls.config_class):
            defaults.setdefault(f.name, {})[name] = getattr(cls.config_class(), f.name)
    differing = {k: v for k, v in defaults.items() if len({repr(x) for x in v.values()}) > 1}
    assert not differing, differing
