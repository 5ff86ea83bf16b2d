"""The monitoring endpoint (MAILGATE_METRICS_LISTEN): `/metrics`, `/healthz` and `/readyz` over HTTP/1.1.

A small server of its own on the gateway's event loop (`asyncio.start_server`), not uvicorn: uvicorn's
`Server.serve()` installs SIGINT/SIGTERM handlers that would fight `mailgate serve`'s, and three GETs
need no framework. Each connection carries one request: the request line and headers are read within
`read_timeout` seconds (default 5) and at most `MAX_REQUEST` bytes (over: 431, too slow: closed), only
GET and HEAD are served (405 otherwise), and every answer says `Connection: close`.

- `/healthz`: 200 `ok` while the process serves (the event loop answers).
- `/readyz`: 200 `ready` when `Probe.not_ready()` finds nothing wrong, else 503 with one reason a line.
- `/metrics`: `Probe.refresh()` reads what the store knows, then the text format of every metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from mailgate.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("mailgate.monitor")

READ_TIMEOUT = 5.0
MAX_REQUEST = 8192
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Probe(Protocol):
    async def refresh(self) -> None:
        """Bring the gauges read from the store up to date."""

    async def not_ready(self) -> list[str]:
        """Why the gateway should not be sent mail now (empty: ready)."""


class Monitor:
    """Serves the endpoints of one gateway. `await start(host, port)`; `await close()`."""

    def __init__(self, metrics: Metrics, probe: Probe, *, read_timeout: float = READ_TIMEOUT) -> None:
        self.metrics = metrics
        self.probe = probe
        self.read_timeout = read_timeout
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        """Listen on `host:port` (`OSError` when it cannot be bound)."""
        self._server = await asyncio.start_server(
            self._serve, host, port, reuse_address=True, limit=MAX_REQUEST
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            status, body, ctype, head_only = await self._answer(reader)
            headers = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(headers.encode("ascii") + (b"" if head_only else body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or was too slow: nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, str, bool]:
        """(status, body, content type, HEAD?) for the one request on this connection."""
        text = "text/plain; charset=utf-8"
        try:
            async with asyncio.timeout(self.read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return 431, b"request too large\n", text, False
        except asyncio.IncompleteReadError as exc:
            if len(exc.partial) >= MAX_REQUEST:
                return 431, b"request too large\n", text, False
            raise
        if len(head) > MAX_REQUEST:
            return 431, b"request too large\n", text, False
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request\n", text, False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/metrics", "/healthz", "/readyz"):
            return 404, b"not found: try /metrics, /healthz or /readyz\n", text, False
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", text, False
        head_only = method == "HEAD"
        if target == "/healthz":
            return 200, b"ok\n", text, head_only
        try:
            if target == "/readyz":
                reasons = await self.probe.not_ready()
                self.metrics.ready.set(0 if reasons else 1)
                if reasons:
                    return 503, "".join(f"{r}\n" for r in reasons).encode(), text, head_only
                return 200, b"ready\n", text, head_only
            await self.probe.refresh()
            return 200, self.metrics.exposition(), CONTENT_TYPE_LATEST, head_only
        except Exception:
            log.exception("monitor_failed", extra={"path": target})
            return 500, b"internal error (see the gateway's log)\n", text, head_only
