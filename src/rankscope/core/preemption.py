"""Preemption-safe stops: SIGTERM / SIGINT ask the loop to stop after the current optimiser step.

The contract (used by `rankscope train` and by anything that runs it, e.g. a SLURM script):
  - the first SIGTERM or SIGINT only sets a flag; the loop finishes the optimiser step it is in,
    writes a checkpoint (atomically, like every checkpoint), prints one line
    `stopped at step N; checkpoint saved; re-run the same command to resume`
    and the process exits with 128 + the signal number: 143 for SIGTERM, 130 for SIGINT;
  - a second signal exits at once with the same code (no checkpoint), even while the main thread is
    inside a long C call (a watcher thread acts on it; see StopOnSignal.__enter__). A duplicate that arrives
    within DUPLICATE_WINDOW_S of the first is ignored: Ctrl-C reaches every process of the
    terminal's group, and torchrun (or SLURM) forwards the signal to its workers, which would
    otherwise see one keystroke as two;
  - under torchrun every rank agrees on the stop step: the flag travels in the loss all-reduce
    each step already does (rankscope.train.loop), so it costs no extra collective.

    with StopOnSignal() as stop:
        while ...:
            step()
            if stop.requested: save(); raise Preempted(step, stop.signum)
"""

from __future__ import annotations

import os
import signal
import threading
import time

from rankscope.core.errors import RankscopeError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 2.0


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + int(signum)


def stop_message(step: int) -> str:
    return f"stopped at step {step}; checkpoint saved; re-run the same command to resume"


class Preempted(RankscopeError):
    """Raised by the loop after it saved the checkpoint of `step`; the CLI exits with `exit_code`."""

    def __init__(self, step: int, signum: int):
        super().__init__(stop_message(step))
        self.step, self.signum, self.exit_code = step, int(signum), exit_code(signum)


class StopOnSignal:
    """A context manager that turns the first SIGTERM/SIGINT into a flag (`requested`, `signum`)
    and a later one into an immediate exit. Outside the main thread it installs nothing (Python
    only delivers signals there) and `requested` stays False."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.first_at = 0.0
        self.previous: dict[int, object] = {}
        self.lock = threading.Lock()
        self.seen = 0  # signals counted (by `handle`)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum: int, frame) -> None:
        """One signal, counted once (the watcher thread calls it for each byte of the wakeup fd): the first sets the
        flag (unless the main thread's handler did already), a later one outside the duplicate window exits."""
        now = time.monotonic()
        with self.lock:
            self.seen += 1
            if self.seen == 1:
                if self.signum is None:
                    self.signum, self.first_at = signum, now
                return
        if now - self.first_at < DUPLICATE_WINDOW_S:
            return
        os.write(2, b"second signal: exiting now, without a checkpoint\n")
        os._exit(exit_code(signum))

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            # Python runs a signal handler in the main thread between two bytecodes, so while that thread
            # sits in a long C call (a matmul, a collective) a second signal would wait for it. The C-level
            # handler also writes each signal's number to the wakeup fd at once: a watcher thread reading it
            # acts promptly; the Python-level handler only sets the first signal's flag (without waiting for that thread).
            self.pipe = os.pipe()
            os.set_blocking(self.pipe[1], False)
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._first)
            self.previous_fd = signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
            self.watcher = threading.Thread(target=self._watch, args=(self.pipe[0],), daemon=True, name="rankscope-signals")
            self.watcher.start()
        return self

    def _first(self, signum: int, frame) -> None:
        """The Python-level handler: runs in the main thread before the loop's next check, so the flag is set by the
        time the step that the signal interrupted ends (the watcher thread, which may read the pipe later, counts it
        there). A second signal is the watcher's to act on."""
        with self.lock:
            if self.signum is None:
                self.signum, self.first_at = signum, time.monotonic()

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # __exit__ closed the write end
                return
            for signum in data:
                if signum in self.signals:
                    self.handle(signum, None)

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        if self.previous:
            signal.set_wakeup_fd(self.previous_fd)
            os.close(self.pipe[1])
            self.watcher.join(timeout=5)
            os.close(self.pipe[0])
        self.previous.clear()
