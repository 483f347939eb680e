"""Output paths checked before any compute: a folder or file the user named must be writable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rankscope.core.errors import ConfigError


def check_output_dir(path: str | Path, what: str) -> Path:
    """Create `path` (a folder, parents too) and prove a file can be written in it; else one
    ConfigError naming `what` (e.g. "-o") and the reason."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rankscope-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written ({e.strerror or e}); pass a folder you can write to") from None
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """Prove `path` can be written (its folder is created); a file that was not there before is
    removed again, so a later failure leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; pass a file path")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written ({e.strerror or e}); pass a file path you can write to") from None
    if not existed:
        path.unlink()
    return path
