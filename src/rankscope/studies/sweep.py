"""A sweep: a study's stages run in order through a launcher (pretrain, tune, confirm, main, control), each
stage's finished runs skipped and interrupted ones resumed, the record rewritten after every stage."""

from __future__ import annotations

import os
import subprocess
import sys

from rankscope.core.errors import ConfigError
from rankscope.studies.local import LocalLauncher
from rankscope.studies.points import refresh, training_finished
from rankscope.studies.progress import stage_header
from rankscope.studies.record import write_sweep_summary
from rankscope.studies.study import SAME_AS_MAIN, Launcher, Point, Study, pretrain_dir
from rankscope.studies.tuning import run_tuning, staged_points


def run_study(study: Study, launcher: Launcher | None = None, parallel: int | None = None, show=print) -> list[Point]:
    """Run the study's stages in order (tune, main, control) through `launcher` (default LocalLauncher)."""
    launcher = launcher or LocalLauncher(parallel, show)
    if study.pretrain is not None:
        run_pretrain(study, show)
    if study.tune is not None:
        run_tuning(study, launcher, show)
        study.points = [p for p in study.points if p.stage in ("tune", "confirm")] + staged_points(study)
    for stage in ("main", "control"):
        points = [p for p in study.points if p.stage == stage]
        if not points:
            continue
        for p in points:
            if p.status not in ("failed", SAME_AS_MAIN):
                refresh(p, study)
        todo = [p for p in points if p.status not in ("done", "failed", SAME_AS_MAIN)]
        stage_header(study, stage, points, todo, show)
        if todo:
            launcher.run(todo, study)
        write_sweep_summary(study)
    write_sweep_summary(study)
    for p in study.points:
        if p.status == "failed":
            show(f"FAILED {p.stage} {p.name}: {p.error}  (log: {p.run_dir / 'sweep.log'})")
    return study.points


def run_pretrain(study: Study, show=print) -> None:
    """Train (or resume) a fine-tuning study's base in <runs_dir>/pretrain/base, unless it is finished."""
    from rankscope.methods import load_config

    out = pretrain_dir(study.runs_dir)
    if training_finished(out, load_config(study.pretrain[0], study.pretrain[1:]).train.max_steps):
        return
    show(f"study {study.name}, stage pretrain: the base -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.log", "a") as log:
        cmd = [sys.executable, "-m", "rankscope", "train", study.pretrain[0], *study.pretrain[1:], "-o", str(out), "train.progress=false"]
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.write(res.stderr)
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        raise ConfigError(f"pretraining the study's base failed: {lines[-1] if lines else res.returncode} (log: {out / 'sweep.log'})")
