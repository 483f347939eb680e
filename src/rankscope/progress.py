"""Progress for long loops: a tqdm bar on a terminal, plain lines everywhere else.

Redirected to a file (`make demo > log 2>&1`, SLURM, CI), a tqdm bar writes carriage-return updates
that turn a log into one long line. Off a terminal `Progress` prints instead one plain line at every
tenth of the work (and at the end): done/total, percent, elapsed time, ETA and the caller's postfix.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """`update(n, **postfix)` after each unit of work, `close()` at the end (or use `with`).
    `enabled=False` prints nothing; `tty=None` asks the stream whether it is a terminal."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step", enabled: bool = True,
                 stream: TextIO | None = None, tty: bool | None = None, lines: int = 10):
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, int(initial)
        self.stream = stream or sys.stdout
        self.enabled = enabled and self.total > 0
        self.tty = self.stream.isatty() if tty is None else tty
        self.start, self.start_done = time.perf_counter(), self.done
        # plain lines at every 1/lines of what is left, so a resumed run also logs at least every 10%
        self.every = max(1, math.ceil((self.total - self.done) / max(1, lines)))
        self.next_line = self.done + self.every
        self.postfix: dict[str, Any] = {}
        self.bar = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.postfix.update(postfix)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.done >= self.next_line or self.done >= self.total:
            self.next_line = self.done + self.every
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        eta_s = _clock(eta) if math.isfinite(eta) else "?"
        return f"[{self.desc}] {self.done:,}/{self.total:,} {self.unit}s ({pct:3.0f}%)  elapsed {_clock(elapsed)}  ETA {eta_s}{extra}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
