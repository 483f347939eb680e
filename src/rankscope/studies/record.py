"""The sweep record, <runs_dir>/sweep.json: every run with its stage and state, the tuning choices, the control
convention and the pre-registered findings rules (`write_sweep_summary`), and under "jobs" the SLURM launcher's
job records (`load_jobs` / `save_jobs`), which a rewrite of the rest keeps."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rankscope.core.errors import ConfigError
from rankscope.core.jsonfiles import read_json_object
from rankscope.studies.study import Study

JOBS_FIX = "delete it (the runs themselves are kept; it is rewritten from the run folders) and submit again"


def write_sweep_summary(study: Study) -> Path:
    """<runs_dir>/sweep.json: every run (with its stage), the tuning choices and the pre-registered findings rules.

    A run's `name` is its folder relative to runs_dir (tune/NAME, control/NAME, or NAME)."""
    rows = []
    for p in study.points:
        rel = str(p.run_dir.relative_to(study.runs_dir)) if p.run_dir.is_relative_to(study.runs_dir) else p.name
        rows.append({"name": rel, "stage": p.stage, "values": p.values, "cell": p.cell, "status": p.status, "error": p.error,
                     "run_dir": str(p.run_dir), "seconds": round(p.seconds, 1), **({"same_as": p.same_as} if p.same_as else {})})
    data: dict[str, Any] = {"study": study.name, "study_file": str(study.path), "runs": rows}
    if study.tune is not None:
        data["tuning"] = {**asdict(study.tune), "metric_source": "summary.json", "lower_is_better": True,
                          "cells": [asdict(ct) for ct in study.tuning]}
    if study.control is not None:
        data["control"] = asdict(study.control)
    if study.findings:
        data["findings"] = study.findings
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    out = study.runs_dir / "sweep.json"
    if out.exists() and "jobs" in (old := read_json_object(out, "delete it: it is rewritten from the run folders "
                                                             "(SLURM job records in it are lost; finished runs are kept)", ConfigError)):
        data["jobs"] = old["jobs"]  # the SLURM launcher's job records (save_jobs), kept across rewrites
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out)
    return out


def load_jobs(study: Study) -> dict[str, dict[str, Any]]:
    """The SLURM job record of each point (by its folder relative to runs_dir), as the launcher last saved it."""
    path = study.runs_dir / "sweep.json"
    if not path.exists():
        return {}
    return dict(read_json_object(path, JOBS_FIX, ConfigError).get("jobs") or {})


def save_jobs(study: Study, jobs: dict[str, dict[str, Any]]) -> None:
    path = study.runs_dir / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_json_object(path, JOBS_FIX, ConfigError) if path.exists() else {"study": study.name, "study_file": str(study.path), "runs": []}
    data["jobs"] = jobs
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
