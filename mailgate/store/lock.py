"""One gateway per store: `serve` holds an exclusive `flock` on `<database>.lock` for its whole life.

The lock file holds the pid of the process that has the lock, for the message a second `serve` prints
(`already running (pid N)`). The kernel drops the lock when the process ends, however it ends (kill -9
included), so a stale file never blocks a start; the file itself is never removed (removing a locked
file lets two processes lock two different files). The operator verbs (`messages`, `replay`, ...) take
no lock: they may run beside `serve`. `holder` finds a running gateway without creating anything.
The runner process (`mailgate.runner`) inherits the open lock file, so the lock lasts until both of a
gateway's processes have ended.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path

from mailgate import private
from mailgate.errors import StartupError

ORPHAN_WAIT = 5.0  # seconds a start waits for the runner process of a gateway that died


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


class InstanceLock:
    """The lock a running gateway holds; `release()` (or the process's end) lets the next one start."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, database: Path) -> InstanceLock:
        """Lock the store at `database` (creating its directory 0700 and the lock file 0600 if missing).

        `StartupError` when another process holds it (`already running (pid N)`) or it cannot be made.
        """
        path = lock_path(database)
        try:
            private.make_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, private.FILE_MODE)
        except OSError as exc:
            raise StartupError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + ORPHAN_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                pid = _read_pid(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    # the gateway named in the file is gone, but its runner process (which shares the
                    # lock) is still on its way out: it dies with its listener, so wait a moment
                    if pid and not _alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    os.close(fd)
                    raise StartupError(f"already running (pid {pid or '?'})") from None
                os.close(fd)
                raise StartupError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        mine = f"{os.getpid()}\n".encode()
        os.pwrite(fd, mine, 0)  # then truncate: a reader never sees the file empty
        os.ftruncate(fd, len(mine))
        return cls(path, fd)

    @property
    def fd(self) -> int | None:
        """The lock file's descriptor: a child process that inherits it holds the lock too (the runner
        process), until both have closed it."""
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the only descriptor drops the flock


def holder(database: Path) -> int | None:
    """The pid of the gateway that holds the store's lock (0 if it cannot be read), or None when none
    runs. Creates nothing."""
    try:
        fd = os.open(lock_path(database), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as someone else
        return True
    return True


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
