"""Ctrl-C while `rankscope`'s CLI imports its modules (torch alone takes seconds) ends in one line and exit
code 130, not a KeyboardInterrupt traceback from deep inside an import. rankscope.cli imports this module
before the others and calls `imported()` after them, which puts back the handler that raises KeyboardInterrupt
(the CLI turns that into its own one line while a verb runs)."""

from __future__ import annotations

import os
import signal
import threading


def _interrupted_while_starting(signum, frame) -> None:
    os.write(2, b"interrupted while starting; nothing was run\n")
    os._exit(130)


_guarding = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
_previous = signal.signal(signal.SIGINT, _interrupted_while_starting) if _guarding else None


def imported() -> None:
    """The imports are done: SIGINT's previous handler again (None: one not set from Python; Python's own then)."""
    global _guarding
    if _guarding:
        signal.signal(signal.SIGINT, _previous if _previous is not None else signal.default_int_handler)
        _guarding = False
