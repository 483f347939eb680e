"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

import errno


class RankscopeError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(RankscopeError):
    """A config file, field or override is wrong."""


class DataError(RankscopeError):
    """Input data is missing, empty, unreadable or too short."""


class CheckpointError(RankscopeError):
    """A checkpoint is missing, truncated or does not match the run."""


class TrainingError(RankscopeError):
    """Training cannot go on (for example a non-finite loss)."""


class BusyError(RankscopeError):
    """Another process writes to the same run folder or sweep (rankscope.core.lock)."""


class MachineError(RankscopeError):
    """The machine failed under a correct input: disk full, a read-only file system. The CLI exits with
    code 3 (MACHINE_EXIT_CODE), so that a script can tell it from bad input (2) and a crash (1)."""


MACHINE_EXIT_CODE = 3
# errnos of the machine, not of the input: the disk is full, the file system went read-only, a quota is reached, I/O failed
MACHINE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO}
