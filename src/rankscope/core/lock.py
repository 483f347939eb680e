"""One writer per run folder and per sweep: an advisory `fcntl.flock` on a lock file in the folder.

The kernel releases a flock when its holder exits, however it exits (SIGKILL included), so a lock is
never stale: there is nothing to clean up after a crash. The lock file itself stays (it holds the last
holder's pid and host, for the refusal line). Readers (`eval`, `analyze`, `report`) never take it.
A lock is held while its `Held` handle lives (or until `release()`); within one process it is shared
(a test, or a notebook, may open the same run twice), and a second process is refused in one line
naming the holder. On a network file system without lock support it protects one machine only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import weakref
from pathlib import Path

from rankscope.core.errors import BusyError

LOCK_NAME = ".rankscope.lock"

_HELD: weakref.WeakValueDictionary[str, Held] = weakref.WeakValueDictionary()  # lock path -> this process's handle


class Held:
    """This process's hold on one lock: an open descriptor with the flock; closing it releases the lock."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # the only descriptor of this open file: the flock goes with it

    def __del__(self) -> None:
        try:
            self.release()
        except (OSError, TypeError):  # at interpreter exit the kernel releases it anyway
            pass


def acquire(folder: Path, what: str, fix: str) -> Held:
    """Take the lock of `folder` (created if missing), or raise BusyError naming the holder's pid and
    host. `what` names the folder ("run folder runs/x"), `fix` says what to do."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    held = _HELD.get(key)
    if held is not None and held.fd is not None:
        return held
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: another process holds it
        holder = holder_of(fd)
        os.close(fd)
        raise BusyError(f"{what} is in use by another rankscope process ({holder}); {fix}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    held = _HELD[key] = Held(path, fd)
    return held


def holder_of(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"
