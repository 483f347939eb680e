"""What a sweep shows while it runs: the one duration format of the studies (`duration`), each stage's header line,
and the progress of a stage's runs (`ProgressTable`: a live rich table on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import sys
import threading
import time

from rankscope.studies.study import STAGE_DIRS, Point, Study


def duration(seconds: float) -> str:
    """A wall time as people read it: `3 min 05 s`, `1 h 02 min` (the sweep's ETA, SLURM's --status, the pre-flight estimate)."""
    s = int(round(seconds))
    return f"{s // 3600} h {s // 60 % 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def stage_header(study: Study, stage: str, points: list[Point], todo: list[Point], show, extra: str = "") -> None:
    show(f"study {study.name}, stage {stage}{extra}: {len(points)} runs, {len(points) - len(todo)} done, {len(todo)} to run "
         f"-> {study.runs_dir / STAGE_DIRS[stage] if STAGE_DIRS[stage] else study.runs_dir}")


class ProgressTable:
    """Runs done of total with an ETA: a live table (rich) on a terminal; plain lines otherwise."""

    def __init__(self, points: list[Point], show, stage: str = "main", parallel: int = 1):
        self.points, self.show, self.stage, self.parallel, self.live = points, show, stage, parallel, None
        self.t0 = time.time()
        self.lock = threading.Lock()

    def line(self) -> str:
        counts = {s: sum(p.status == s for p in self.points) for s in ("done", "running", "failed")}
        finished = counts["done"] + counts["failed"]
        total = len(self.points)
        elapsed = time.time() - self.t0
        left = total - finished
        if finished and left:
            # runs finish `parallel` at a time: the rate seen so far already includes that
            eta = f"ETA {duration(elapsed / finished * left)}"
        else:
            eta = "ETA –" if left else "finished"
        width = 20
        bar = "#" * int(width * finished / total) + "." * (width - int(width * finished / total)) if total else ""
        failed = f", {counts['failed']} failed" if counts["failed"] else ""
        return (f"sweep {self.stage} [{bar}] {finished}/{total} runs finished{failed}, {counts['running']} running, "
                f"{duration(elapsed)} elapsed, {eta}")

    def table(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"sweep ({self.stage})")
        for col in ("run", "status", "seconds"):
            t.add_column(col)
        for p in self.points:
            colour = {"done": "green", "running": "yellow", "failed": "red"}.get(p.status, "white")
            t.add_row(p.name, f"[{colour}]{p.status}[/]", f"{p.seconds:.0f}" if p.seconds else "")
        return Group(t, Text(self.line()))  # Text: the [###...] bar is not rich markup

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self.table(), refresh_per_second=2)
            self.live.__enter__()
        return self

    def refresh(self):
        with self.lock:
            if self.live is not None:
                self.live.update(self.table())
            else:
                self.show(self.line())

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
