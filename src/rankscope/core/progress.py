"""Progress for long loops: a tqdm bar on a terminal, plain lines everywhere else.

Redirected to a file (`make demo > log 2>&1`, SLURM, CI), a tqdm bar writes carriage-return updates
that turn a log into one long line. Off a terminal `Progress` prints instead one plain line at every
tenth of the work (and at the end): done/total, percent, elapsed time, ETA and the caller's postfix.
A terminal whose size is unknown (`script` run from a non-terminal: 0 columns) gets the plain lines
too: a bar there may never draw.

The ETA is the work left at the rate measured since the first unit finished: the first unit carries
the start-up (allocation, compile, the first batches read), which would otherwise inflate the
estimate of every unit after it (tests/unit/test_progress_eta.py checks it on a synthetic clock).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, TextIO


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def has_size(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that knows its width (a bar needs one)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    """`update(n, **postfix)` after each unit of work, `close()` at the end (or use `with`).
    `enabled=False` prints nothing; `tty=None` asks the stream whether it is a terminal."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "step", enabled: bool = True,
                 stream: TextIO | None = None, tty: bool | None = None, lines: int = 10,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, int(initial)
        self.stream = stream or sys.stdout
        self.enabled = enabled and self.total > 0
        self.tty = (self.stream.isatty() and has_size(self.stream)) if tty is None else tty
        self.clock = clock
        self.start, self.start_done = clock(), self.done
        self.rate_from: tuple[float, int] | None = None  # (time, done) when the first unit finished
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
        if self.rate_from is None:
            self.rate_from = (self.clock(), self.done)
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

    def eta(self) -> float:
        """Seconds left: the units left at the rate since the first unit (nan until two are done)."""
        if self.rate_from is None:
            return float("nan")
        t0, d0 = self.rate_from
        spent, done = self.clock() - t0, self.done - d0
        return (self.total - self.done) * spent / done if done > 0 and spent > 0 else float("nan")

    def line(self) -> str:
        elapsed = self.clock() - self.start
        eta = self.eta()
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
