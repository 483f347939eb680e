"""One writer per run folder and per sweep: an advisory `fcntl.flock` on a lock file in the folder.

The kernel releases a flock when its holder exits, however it exits (SIGKILL included), so a lock is
never stale: there is nothing to clean up after a crash. The lock file itself stays (it holds the last
holder's pid and host, for the refusal line). Readers (`eval`, `analyze`, `report`) never take it.
Within one process the lock is re-entrant (a test, or a sweep that trains in-process, may open the
same run twice); a second process is refused in one line naming the holder.

flock is advisory and local to a machine on some network file systems (NFS without lock support):
there it protects against a second writer on the same node only.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from rankscope.errors import BusyError

LOCK_NAME = ".rankscope.lock"

_HELD: dict[str, list] = {}  # resolved lock path -> [fd, count]


def acquire(folder: Path, what: str, fix: str) -> Path:
    """Take the lock of `folder` (created if missing) or raise BusyError naming the holder's pid and
    host. `what` names the folder ("run folder runs/x"), `fix` says what to do. Returns the lock path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held by another process
        holder = holder_of(fd)
        os.close(fd)
        raise BusyError(f"{what} is in use by another rankscope process ({holder}); {fix}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    return path


def holder_of(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "pid unknown"


def release(path: Path) -> None:
    """Give back one acquire of the lock at `path` (the lock file acquire returned); the last one unlocks."""
    key = str(Path(path).resolve())
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the only descriptor releases the flock
