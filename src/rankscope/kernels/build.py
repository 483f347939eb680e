"""Building the C++ kernels: torch.utils.cpp_extension with ninja and the system's C++ compiler, on first
use, once per process, cached under torch's extensions folder per CPU feature set and source. Where a build fails the
caller keeps torch's own op, and the reason is said once."""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

_built: dict[str, object] = {}

# -march=native: named per CPU feature set (below), so a cache shared by different machines never hands one
# of them code for instructions it lacks; and per source and flags, so checkouts of different versions (a
# benchmark against an older commit) keep their own builds instead of rebuilding each other's.
FLAGS = ["-O3", "-march=native"]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def extension(source: Path, what: str, fallback: str, extra_flags: tuple[str, ...] = ()):
    """The compiled module of `source` (a .cpp beside its .py), or None where it cannot be built; `what`
    names it in the one line printed while it builds, `fallback` says in the warning what runs instead."""
    key = str(source)
    if key not in _built:
        _built[key] = None
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            tag = "\n".join([_cpu_flags(), *FLAGS, *extra_flags, source.read_text()])
            name = f"rankscope_{source.stem}_{hashlib.sha1(tag.encode()).hexdigest()[:10]}"
            if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
                print(f"rankscope: building {what} (once per machine, about 30 s)", file=sys.stderr, flush=True)
            _built[key] = load(name=name, sources=[str(source)], verbose=False, extra_cflags=[*FLAGS, *extra_flags])
        except Exception as e:  # no compiler or ninja: torch's own op, said once
            warnings.warn(f"rankscope: {what} could not be built ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); using {fallback}", stacklevel=3)
    return _built[key]
