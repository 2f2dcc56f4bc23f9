"""One writer per store worker: a `flock` on STORE/.{worker}.lock holding the writer's pid.

Two `distill generate` processes on one store without `--shard` would both be worker w000of001, write the
same rows twice and race on shard sequence numbers; the second is refused with the first one's pid. The
kernel drops the lock when its process dies (kill -9 included), so a stale lock file is simply taken over.
Where the filesystem has no flock (some network mounts), the pid in the file decides: a live pid holds it.

Run as: `lock = StoreLock(store, "w000of001"); lock.acquire(); ...; lock.release()`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from distill.store.integrity import StoreError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the pid in the file still decides
    fcntl = None  # type: ignore[assignment]


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class StoreLock:
    """Exclusive lock of one worker id on one store, held from open to close of its `Store`."""

    def __init__(self, store: Path, worker: str):
        self.store, self.worker = Path(store), worker
        self.path = self.store / f".{worker}.lock"
        self._fd: int | None = None

    def _holder(self, fd: int) -> int:
        try:
            return int(os.pread(fd, 32, 0).decode().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _refuse(self, pid: int) -> StoreError:
        who = f"process {pid}" if pid else "another process"
        return StoreError(
            f"{self.store}: {who} is writing this store as worker {self.worker} (lock {self.path}); wait for it "
            "to finish, or split the prompts between processes with --shard i/n (each writes its own shards)"
        )

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise self._refuse(self._holder(fd)) from None
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
                    if _alive(self._holder(fd)):  # no flock here: a live pid in the file holds the store
                        raise self._refuse(self._holder(fd)) from None
            elif _alive(self._holder(fd)):
                raise self._refuse(self._holder(fd))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __del__(self) -> None:  # a writer dropped without close(): its lock goes with it
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no pid left behind for the fallback path to trust
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
