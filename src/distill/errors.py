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
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# How writers that are not Python's own file objects report a full disk: torch.save's C++ stream writer
# ("basic_ios::clear: iostream error", "unexpected pos 704 vs 598", "file write failed") and safetensors'
# Rust writer ("IoError(Os { code: 28, kind: StorageFull ...})"). None of them is an OSError.
_FULL_DISK_TEXTS = {
    "RuntimeError": ("iostream error", "file write failed", "unexpected pos", "no space left on device"),
    "SafetensorError": ("storagefull", "code: 28", "no space left on device"),
}


def _disk_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's own, or ENOSPC for the non-OSError full-disk messages above."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_ERRNOS else None
    text = str(exc).lower()
    if any(t in text for t in _FULL_DISK_TEXTS.get(type(exc).__name__, ())):
        return errno.ENOSPC
    return None


def free_space(where: str | Path) -> str:
    """'1.2 MB free on the disk of DIR' for the nearest existing folder of `where` ('' when unknown)."""
    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{free / 1e6:,.1f} MB free on the disk of {folder}"


def disk_error_message(exc: BaseException, where: str | Path | None = None, kept: str = "") -> str | None:
    """One line for a full / read-only / forbidden write, naming the path (and the free space left when the
    disk is full); None for other errors."""
    code = _disk_errno(exc)
    if code is None or isinstance(exc, DiskError):
        return None
    path = getattr(exc, "filename", None) or where or "the run directory"
    reason = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}.get(code, "permission denied")
    if not isinstance(exc, OSError):  # torch / safetensors say only that the write failed: say what it likely was
        reason = f"the write failed ({' '.join(str(exc).split())[:120]}), most likely {reason}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        space = free_space(path)
        reason += f" ({space})" if space else ""
    tail = kept or "finished work is kept"
    return f"cannot write {path}: {reason} [Errno {code}]; {tail}: free space (or fix permissions) and rerun"


@contextlib.contextmanager
def disk_errors(where: str | Path, kept: str = "") -> Iterator[None]:
    """Turn a disk-full / read-only write error inside the block (an OSError, or torch's and safetensors' own
    full-disk errors) into a DiskError naming the path."""
    try:
        yield
    except Exception as exc:
        msg = disk_error_message(exc, where, kept)
        if msg is None:
            raise
        raise DiskError(_disk_errno(exc), msg) from exc


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and os.replace: a full disk or a kill mid-write leaves
    the previous file (or none), never a truncated one that breaks the next reader."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def not_found(path: str | Path, what: str = "file") -> str:
    """Why `path` cannot be opened: 'symlink loop' (a link that points back at itself), 'broken symlink', or
    '<what> not found', so the message does not send the user looking for a file that is there."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop as RuntimeError
            return f"{path}: symlink loop (the link points back at itself); point it at a real {what}"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path}: symlink loop (the link points back at itself); point it at a real {what}"
            return f"{path}: broken symlink (points at {os.readlink(path)}, which does not exist)"
    return f"{path}: {what} not found"


# ---------------------------------------------------------------- bounded messages
MAX_REPR = 200  # characters of a value shown in an error
MAX_LINE = 1000  # characters of one error line
MAX_LINES = 20  # lines of one error


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """repr(value) cut to about `limit` characters: a long list or dict shows its first items and
    '... (N more)', a long string its start and '... (N more characters)'."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 3:
        items = list(value.items() if isinstance(value, dict) else value)
        shown: list[str] = []
        for item in items:
            text = f"{short_repr(item[0], 40)}: {short_repr(item[1], 60)}" if isinstance(value, dict) \
                else short_repr(item, 60)
            if sum(len(s) + 2 for s in shown) + len(text) > limit:
                break
            shown.append(text)
        if len(shown) < len(items):
            shown.append(f"... ({len(items) - len(shown)} more)")
            brackets = "{}" if isinstance(value, (dict, set)) else "()" if isinstance(value, tuple) else "[]"
            return f"{brackets[0]}{', '.join(shown)}{brackets[1]}"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def bounded(message: str, width: int = MAX_LINE, lines: int = MAX_LINES) -> str:
    """An error message cut to `lines` lines of at most `width` characters each, saying what was left out."""
    rows = message.splitlines() or [""]
    out = [r if len(r) <= width else f"{r[:width]}... ({len(r) - width} more characters)" for r in rows[:lines]]
    if len(rows) > lines:
        out.append(f"  ... ({len(rows) - lines} more lines)")
    return "\n".join(out)


def register(*classes: type[BaseException]) -> None:
    """Count these error classes (defined elsewhere) as user errors."""
    for cls in classes:
        UserError.register(cls)
