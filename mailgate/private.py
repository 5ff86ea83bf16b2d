"""Owner-only files: the database holds every mail and the reply-token secret, the spool and the outbox
Maildir hold mail too, so mailgate creates them 0600 (files) and 0700 (directories) whatever the umask.

The mode is given at creation and set again with chmod right after, because the umask only ever removes
bits and a umask of 0 (or a mode given by a caller) must not widen them either. Paths that already exist
are never changed: `exposed` lists those that group or others may read or write, for a warning at start.
SQLite creates the database's `-wal` and `-shm` with the database file's own mode, so creating the
database file 0600 before SQLite opens it is enough for all three.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_dir(path: Path) -> None:
    """Create `path` and any missing parents 0700; directories that exist are left as they are."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile (another thread or process): leave its mode alone
            continue
        os.chmod(folder, DIR_MODE)


def create_file(path: Path) -> None:
    """Create `path` empty and 0600 if it does not exist (an existing file is left untouched)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or chunks of them) to `path` (created or truncated) as a 0600 file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb", closefd=False) as file:
            for chunk in [data] if isinstance(data, bytes) else data:
                file.write(chunk)
    finally:
        os.close(fd)


def exposed(paths: Iterable[Path]) -> list[tuple[Path, int]]:
    """The paths among `paths` that exist and that group or others may read, write or enter, with their
    permission bits (a symlink is judged by what it points to)."""
    found = []
    for path in paths:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077:
            found.append((path, mode))
    return found
