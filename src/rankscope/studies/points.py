"""The point lifecycle both launchers share (the local one and SLURM's): a point's run folder with its
study-config.yaml and study.json marker (`prepare_point`), its state (done / partial / left, and a folder of
another study refused: `point_state`), the command lines it runs (`point_commands`: train, then the study's
`after` steps) and the record of a finished step (`mark_step_done`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from rankscope.core.errors import ConfigError
from rankscope.core.jsonfiles import read_json_object
from rankscope.core.lock import LOCK_NAME
from rankscope.studies.study import Point, Study

SUMMARY_FIX = "delete it and run the sweep again: the point's training resumes from its last checkpoint and rewrites it"


def after_steps(point: Point, study: Study) -> list[str]:
    """The `after` steps a point runs: none for tuning runs (their loss is all the tuner reads)."""
    return [] if point.stage in ("tune", "confirm") else study.after


def read_marker(marker: Path, study: Study) -> dict[str, Any]:
    """A point's study.json (owner study, steps done); a corrupt one names the two ways out."""
    data = read_json_object(marker, f"write {{\"study\": \"{study.name}\"}} into it to keep the run (its eval/analyze steps "
                                    "then run again), or delete its folder to run the point afresh", ConfigError)
    if not isinstance(data.get("steps_done", []), list):
        raise ConfigError(f"{marker}: steps_done must be a list of step names; write [] to run them again")
    return data


def training_finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run in `run_dir` trained all `max_steps` (its summary.json says so)."""
    summary = run_dir / "summary.json"
    return summary.exists() and read_json_object(summary, SUMMARY_FIX, ConfigError).get("steps") == max_steps


def point_state(point: Point, study: Study) -> str:
    """done / partial / left, and refuse a run directory that belongs to another study."""
    marker = point.run_dir / "study.json"
    if marker.exists():
        owner = read_marker(marker, study).get("study")
        if owner != study.name:
            raise ConfigError(f"{point.run_dir} belongs to study {owner!r}, not {study.name!r}; use another runs_dir (--runs-dir)")
    elif point.run_dir.exists() and any(p.name != LOCK_NAME for p in point.run_dir.iterdir()):  # a lock file alone: no run
        raise ConfigError(f"{point.run_dir} holds a run that is not part of study {study.name!r}; use another runs_dir (--runs-dir)")
    if training_finished(point.run_dir, point.config["train"]["max_steps"]):
        done = read_marker(marker, study).get("steps_done", []) if marker.exists() else []
        return "done" if all(s in done for s in after_steps(point, study)) else "partial"
    return "left"


def refresh(point: Point, study: Study) -> str:
    """The point's state read from its folder, kept in `point.status`."""
    point.status = point_state(point, study)
    return point.status


def point_commands(point: Point, study: Study, threads: int) -> list[tuple[str, list[str]]]:
    """(step, argv) of each command a point runs: train, then its `after` steps."""
    py = [sys.executable, "-m", "rankscope"]
    cfg_path = point.run_dir / "study-config.yaml"
    base = (point.config.get("finetune") or {}).get("base")  # a fine-tuning point (rankscope.train.finetune)
    verb = ["finetune", str(base), "--config", str(cfg_path)] if base else ["train", str(cfg_path)]
    cmds = [("train", [*py, *verb, "-o", str(point.run_dir), "train.progress=false", f"train.threads={threads}"])]
    after = after_steps(point, study)
    if "eval" in after:
        cmds.append(("eval", [*py, "eval", str(point.run_dir), "--json", str(point.run_dir / "eval.json"), *study.eval_args]))
    if "analyze" in after:
        cmds.append(("analyze", [*py, "analyze", str(point.run_dir), *study.analyze_args]))
    return cmds


def prepare_point(point: Point, study: Study, threads: int = 1) -> None:
    """Create the run folder with its study-config.yaml and study.json marker (keeping finished steps)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    (point.run_dir / "study-config.yaml").write_text(yaml.safe_dump(point.config, sort_keys=False))
    marker = point.run_dir / "study.json"
    old = read_marker(marker, study) if marker.exists() else {}
    marker.write_text(json.dumps({"study": study.name, "study_file": str(study.path), "stage": point.stage, "point": point.values,
                                  "steps_done": old.get("steps_done", [])}, indent=1))


def mark_step_done(point: Point, step: str) -> None:
    marker = point.run_dir / "study.json"
    data = json.loads(marker.read_text())
    data["steps_done"] = sorted(set(data.get("steps_done", [])) | {step})
    marker.write_text(json.dumps(data, indent=1))
