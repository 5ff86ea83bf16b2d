"""What one listener allows its sessions, and the checks shared across them: connections, disk.

- `Limits`: the numbers from the settings, plus those fixed as Postfix fixes them (`smtpd_junk_command_limit`
  100, `smtpd_hard_error_limit` 20, `smtpd_min_data_rate` 500 bytes/s, `mime_nesting_limit` 100), and
  at most 1,000 MIME parts: Postfix builds no tree, but the turn stage parses one (Python's email package,
  ~1-2 KB and ~40 us a part), so a 40 MB message of tiny parts would cost gigabytes and a minute of CPU.
- `Connections`: sessions open on one listener, in all and per client address, so one address that
  floods the listener fills only its own share (a unix socket's peers have no address: the total only).
- `FreeSpace`: is there room under the store and the spool for another message? `statvfs` is one
  system call per folder, cheap enough to ask at every MAIL FROM.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mailgate.models import SmtpReply

__all__ = ["Connections", "FreeSpace", "Limits", "client_key"]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    data_size: int  # bytes of DATA (MAILGATE_MAX_MESSAGE_SIZE)
    timeout: float = 300.0  # idle seconds between commands; the longest DATA stall (MAILGATE_SMTP_TIMEOUT)
    session_timeout: float = 3600.0  # seconds a session may last in all (MAILGATE_SMTP_SESSION_TIMEOUT)
    max_connections: int = 200
    max_per_client: int = 20
    max_header: int = 1024 * 1024  # bytes of a header section the DATA scan keeps
    spool_threshold: int = MiB  # DATA past this many bytes goes to a spool file
    junk_commands: int = 100  # NOOP, RSET, VRFY, EXPN, HELP, HELO/EHLO/LHLO per session
    hard_errors: int = 20  # 5xx replies per session
    min_data_rate: float = 500.0  # bytes/s a DATA must keep up, once past the timeout
    mime_depth: int = 100
    mime_parts: int = 1000


class Connections:
    """Counts a listener's open sessions; `admit` says why one may not open, or counts it in."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self.open = 0
        self.by_client: dict[str, int] = {}

    def admit(self, client: str | None) -> SmtpReply | None:
        """None and the session is counted; else the 421 to greet it with."""
        if client is not None and self.by_client.get(client, 0) >= self.per_client:
            return SmtpReply(
                421, "4.7.0 Too many connections from your address, try again later", why="client_connections"
            )
        if self.open >= self.limit:
            return SmtpReply(421, "4.7.0 Too many connections, try again later", why="too_many_connections")
        self.open += 1
        if client is not None:
            self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str | None) -> None:
        self.open -= 1
        if client is not None:
            left = self.by_client.get(client, 1) - 1
            if left > 0:
                self.by_client[client] = left
            else:
                self.by_client.pop(client, None)


class FreeSpace:
    """`low()`: is the free space under any of `paths` below `minimum` bytes (0: never)?"""

    def __init__(self, paths: Sequence[Path], minimum: int, *, every: float = 0.5) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.minimum = minimum
        self.every = every
        self._checked = -1e9

    def low(self) -> bool:
        """Asked at every MAIL. With more than twice the floor free the answer is kept `every` seconds (a
        statvfs per folder each time cost ~3% of the listener's loop at 300 mails/s); nearer the floor,
        or under it, every MAIL looks again (space that comes back is seen at once)."""
        if self.minimum <= 0:
            return False
        now = time.monotonic()
        if now - self._checked < self.every:
            return False
        free = self.free()
        if any(f < self.minimum for f in free):
            return True
        if all(f >= 2 * self.minimum for f in free):
            self._checked = now
        return False

    def free(self) -> list[int]:
        """Bytes an unprivileged process may still write under each path (its nearest existing folder)."""
        out = []
        for path in self.paths:
            folder = next((p for p in (path, *path.parents) if p.exists()), None)
            if folder is None:
                continue
            stat = os.statvfs(folder)
            out.append(stat.f_bavail * stat.f_frsize)
        return out


def client_key(peer: object) -> str | None:
    """The address that `Connections` counts a TCP peer under; None for a unix socket's peer."""
    if isinstance(peer, tuple | list) and len(peer) >= 2:
        return str(peer[0])
    return None
