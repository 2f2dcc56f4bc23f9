"""Errors the user can fix, kept apart from bugs.

A `UserError` (a bad setting, a missing or malformed file, a full disk) is printed by the CLI as one line
naming the setting or file, with exit code 2. Anything else is a bug in distill and keeps its traceback.
`distill --debug ...` (or DISTILL_DEBUG=1) shows the traceback of user errors too.

Backends and the store define their own error classes (TeacherError, StoreError); they are registered here
with `UserError.register`, so `is_user_error` answers for them without this module importing theirs.
"""

from __future__ import annotations

import abc
import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

# errno values that mean "the disk (or its permissions) stopped the write", not a bug
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


class UserError(Exception, metaclass=abc.ABCMeta):
    """A mistake in the input or environment; the message says what, where, and what to do."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class DataError(UserError, ValueError):
    """Bad input data; the message names file, line and field."""


class DiskError(UserError, OSError):
    """A write failed for lack of space or permission; finished work is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_user_error(exc: BaseException) -> bool:
    """True for errors the user can fix (registered classes included) and for disk-full / read-only writes."""
    return isinstance(exc, UserError) or disk_error_message(exc) is not None


def disk_error_message(exc: BaseException, where: str | Path | None = None, kept: str = "") -> str | None:
    """One line for a full / read-only / forbidden write, naming the path; None for other errors."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_ERRNOS or isinstance(exc, DiskError):
        return None
    path = exc.filename or where or "the run directory"
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}.get(exc.errno, "permission denied")
    tail = kept or "finished work is kept"
    return f"cannot write {path}: {reason} [Errno {exc.errno}]; {tail}: free space (or fix permissions) and rerun"


@contextlib.contextmanager
def disk_errors(where: str | Path, kept: str = "") -> Iterator[None]:
    """Turn a disk-full / read-only OSError inside the block into a DiskError naming the path."""
    try:
        yield
    except OSError as exc:
        msg = disk_error_message(exc, where, kept)
        if msg is None:
            raise
        raise DiskError(exc.errno, msg) from exc


def register(*classes: type[BaseException]) -> None:
    """Count these error classes (defined elsewhere) as user errors."""
    for cls in classes:
        UserError.register(cls)
