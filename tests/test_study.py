import json

import pytest
import yaml
from helpers import tiny_overrides

from rankscope.config import parse_overrides, merge_dicts
from rankscope.errors import ConfigError
from rankscope.study import load_study, point_state, run_study


def write_study(tmp_path, data_dir, grid, **extra):
    base = {}
    for o in tiny_overrides(data_dir, "train.max_steps=6", "checkpoint.every=3", "train.threads=1"):
        base = merge_dicts(base, parse_overrides([o]))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "t", "base": "base.yaml", "grid": grid, "runs_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expands_to_the_cartesian_product(tmp_path, data_dir):
    study = load_study(write_study(tmp_path, data_dir, {"train.seed": [0, 1, 2], "train.lr": [1e-3, 2e-3]}, when={"train.seed=2": ["train.max_steps=8"]}))
    assert len(study.points) == 6
    names = [p.name for p in study.points]
    assert len(set(names)) == 6 and names[0] == "seed=0,lr=1e-3"
    assert {p.config["train"]["max_steps"] for p in study.points if p.values["train.seed"] == 2} == {8}
    assert {p.config["train"]["max_steps"] for p in study.points if p.values["train.seed"] != 2} == {6}


@pytest.mark.parametrize(
    "grid,message",
    [({"train.nonsense": [1]}, "not a config field"), ({}, "non-empty lists"), ({"train.seed": []}, "non-empty lists"), ({"model.n_heads": [5]}, "must divide")],
)
def test_bad_studies_are_clear_errors(tmp_path, data_dir, grid, message):
    with pytest.raises(ConfigError, match=message):
        load_study(write_study(tmp_path, data_dir, grid))


def test_sweep_runs_skips_finished_resumes_partial_and_reports_failures(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0, 1], "data.tokenizer": ["bpe", str(tmp_path / "missing.json")]})
    study = load_study(path)
    # a run interrupted earlier: train the first point to step 3 only
    from rankscope.config import config_from_dict
    from rankscope.study import _start
    from rankscope.train import Trainer

    first = study.points[0]
    _start(first, study, 1)

    class Stop:
        def on_step_end(self, trainer, step):
            if step == 4:
                raise KeyboardInterrupt

    trainer = Trainer(config_from_dict(first.config), first.run_dir, log=lambda *_: None)
    trainer.callbacks.append(Stop())
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert point_state(first, study) == "left"

    points = run_study(study, parallel=2, show=lambda *_: None)
    status = {p.name: p.status for p in points}
    assert sum(s == "done" for s in status.values()) == 2 and sum(s == "failed" for s in status.values()) == 2
    failed = [p for p in points if p.status == "failed"][0]
    assert "tokenizer file" in failed.error and "not found" in failed.error
    assert "resumed from" in (first.run_dir / "sweep.log").read_text()
    summary = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["status"] for r in summary["runs"]].count("failed") == 2

    # a second sweep re-runs nothing that finished
    mtimes = {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in points if p.status == "done"}
    again = run_study(load_study(path), show=lambda *_: None)
    assert {p.name: (p.run_dir / "summary.json").stat().st_mtime for p in again if p.name in mtimes} == mtimes


def test_run_directory_of_another_study_is_refused(tmp_path, data_dir):
    path = write_study(tmp_path, data_dir, {"train.seed": [0]})
    study = load_study(path)
    study.points[0].run_dir.mkdir(parents=True)
    (study.points[0].run_dir / "study.json").write_text(json.dumps({"study": "other"}))
    with pytest.raises(ConfigError, match="belongs to study 'other'"):
        run_study(study, show=lambda *_: None)
