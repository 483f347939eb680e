"""The local launcher: a stage's points as subprocesses on this machine, `parallel` at a time, the CPU threads
split between them. Any object with `run(points, study)` can stand in for it (rankscope.studies.sweep.Launcher)."""

from __future__ import annotations

import json
import os
import subprocess
import time

from rankscope.studies.points import mark_step_done, point_commands, prepare_point
from rankscope.studies.progress import ProgressTable
from rankscope.studies.study import Point, Study


def run_point(point: Point, study: Study, threads: int) -> None:
    """Train (or resume) one point, then its `after` steps; a failure is recorded, not raised."""
    prepare_point(point, study, threads)
    t0 = time.time()
    done = json.loads((point.run_dir / "study.json").read_text()).get("steps_done", [])
    log = open(point.run_dir / "sweep.log", "a")
    try:
        for step, cmd in point_commands(point, study, threads):
            if step != "train" and step in done:
                continue
            # eval / analyze get the run's share of the cores too: torch's default (all cores) in
            # `parallel` processes at once oversubscribes the CPU several times over
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
            res = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, text=True, env=env)
            log.write(res.stderr)
            if res.returncode != 0:
                lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
                point.status, point.error = "failed", f"{step}: {lines[-1] if lines else f'exit code {res.returncode}'}"
                return
            if step != "train":
                mark_step_done(point, step)
        point.status = "done"
    finally:
        log.close()
        point.seconds = time.time() - t0


class LocalLauncher:
    """Runs points as subprocesses on this machine, `parallel` at a time (threads split between them)."""

    def __init__(self, parallel: int | None = None, show=print):
        self.parallel, self.show = parallel, show

    def run(self, points: list[Point], study: Study) -> None:
        if not points:
            return
        from concurrent.futures import ThreadPoolExecutor

        parallel = max(1, self.parallel or study.parallel)
        threads = max(1, (os.cpu_count() or 1) // parallel)
        with ProgressTable(points, self.show, points[0].stage, parallel) as progress, ThreadPoolExecutor(parallel) as pool:
            def work(p: Point) -> None:
                p.status = "running"
                progress.refresh()
                run_point(p, study, threads)
                progress.refresh()

            for f in [pool.submit(work, p) for p in points]:
                f.result()
