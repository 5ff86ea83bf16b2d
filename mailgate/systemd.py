"""systemd's notify protocol (`Type=notify`): READY=1, STOPPING=1, STATUS=... and WATCHDOG=1.

Each state is one datagram to the AF_UNIX socket named by `$NOTIFY_SOCKET`: a path, or an abstract name
written `@name`. Without that variable (not under systemd, or `Type=simple`) everything here is a no-op,
and a failing send is logged, never raised: the service manager's view must not stop the mail.

The watchdog is on when `$WATCHDOG_USEC` is a positive number and `$WATCHDOG_PID`, if set, is this
process; `Notifier.watchdog()` then sends WATCHDOG=1 every half of that interval from the event loop,
so a loop that stops turning (the thing the watchdog exists to catch) stops the pings.

The environment is passed in (the CLI hands over `os.environ`), like `load_settings`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("mailgate.systemd")


class Notifier:
    """Where to send states (`address`, None: nowhere) and how often to ping the watchdog."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; anything malformed turns that part off."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("notify_socket_unsupported", extra={"address": address})
            address = None
        me = os.getpid() if pid is None else pid
        try:
            usec = int(environ.get("WATCHDOG_USEC") or 0)
        except ValueError:
            usec = 0
        owner = environ.get("WATCHDOG_PID")
        on = usec > 0 and address is not None and (owner is None or owner.strip() == str(me))
        interval = usec / 2 / 1_000_000 if on else None
        return cls(address, interval)

    def notify(self, state: str) -> bool:
        """Send `state` (newline-separated `KEY=value` lines); True when it was sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(state.encode(), target)
        except OSError as exc:
            if not self._warned:  # once: a watchdog that cannot reach systemd would log twice a minute
                log.warning("notify_failed", extra={"address": self.address, "error": str(exc)})
                self._warned = True
            return False
        return True

    async def watchdog(self) -> None:
        """Ping the watchdog every half interval until cancelled; returns at once when it is off."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
