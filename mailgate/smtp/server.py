"""The SMTP and LMTP protocol objects: aiosmtpd on the main event loop, with a gateway's limits.

- DATA is read into one growing buffer, not a list of lines: aiosmtpd keeps every line of a message as its
  own bytearray and then joins them, so a 40 MB message would cost about 4x its size before the handler
  sees it. aiosmtpd's replies and limits are kept (503/501 before 354; 500 for a line over
  `line_length_limit`; 552 past `data_size_limit`, after the data is drained; dot-unstuffing per RFC 5321
  4.5.2). `decode_data` is not supported: mailgate always takes bytes.
- Sessions over MAILGATE_MAX_CONNECTIONS get `421 4.7.0`; a session quiet for MAILGATE_SMTP_TIMEOUT
  (aiosmtpd restarts the clock at each command, so DATA as a whole must finish within it) gets `421 4.4.2`
  and is closed.
- Each refusal made here (552, 500 at DATA; 421 at connect or idle) is logged and counted through the
  handler's `reject()`, like the ones admission decides.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP

from mailgate.models import SmtpReply
from mailgate.smtp.handler import Handler


class StreamingData(SMTP):
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        size, limit = 0, self.data_size_limit
        problem: str | None = None
        partial = False  # inside a line that was too long
        while self.transport is not None:  # eof_received cancels this coroutine
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                problem = problem or "500 Line too long (see RFC5321 4.5.3.1.6)"
                del data[:]
                await self._reader.readexactly(exc.consumed)  # drain the long line's start
                partial = True
                continue
            if partial:  # the end of the long line
                partial = False
                continue
            if line == b".\r\n":
                break
            size += len(line)
            if problem is None and limit and size > limit:
                problem = "552 Error: Too much mail data"
                del data[:]
            if problem is None:
                data += memoryview(line)[1:] if line.startswith(b".") else line
        if problem is not None:
            why = "too_large" if problem.startswith("552") else "line_too_long"
            code, _, text = problem.partition(" ")
            self.event_handler.reject(
                self, "data", SmtpReply(int(code), text, why=why), rcpts=self.envelope.rcpt_tos
            )
            await self.push(problem)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = bytes(data)
        del data
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)


class _Limited:
    """Counts open sessions across a listener and turns away the ones over the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class GatewaySMTP(StreamingData):
    """SMTP with a connection limit: a session over it is greeted with 421 and closed.

    Only admitted sessions count against the limit. A turned-away session never reaches aiosmtpd
    (its `connection_lost` asserts a session that `connection_made` would have created).
    """

    limiter: _Limited
    _admitted = False
    # RFC 5321 allows 1000 octets a line, but real mail (HTML from some clients, long headers) often
    # has longer ones, and a strict 500 would bounce it. Accept lines up to 64 KiB, as MTAs do.
    line_length_limit = 64 * 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.limiter.open >= self.limiter.limit:
            reply = SmtpReply(421, "4.7.0 Too many connections, try again later", why="too_many_connections")
            self.transport = transport  # for the log line's client address; aiosmtpd never sees it
            self.event_handler.reject(self, "connect", reply)
            self.transport = None
            transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self.limiter.open += 1
        self._admitted = True
        super().connection_made(transport)

    def _timeout_cb(self) -> None:
        """Idle past MAILGATE_SMTP_TIMEOUT (between commands, or in all of DATA): say 421, then close."""
        if self.transport is not None and not self.transport.is_closing():
            reply = SmtpReply(421, "4.4.2 Timeout, closing connection", why="timeout")
            rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
            self.event_handler.reject(self, "session", reply, rcpts=rcpts)
            self.transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.limiter.open -= 1
        super().connection_lost(error)


class GatewayLMTP(LMTP, GatewaySMTP):
    pass


def protocol_factory(
    handler: Handler,
    *,
    hostname: str,
    data_size_limit: int,
    timeout: float,
    max_connections: int,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    lmtp: bool = False,
) -> Any:
    """A factory for `loop.create_server`, sharing one connection limit."""
    limiter = _Limited(max_connections)
    cls = GatewayLMTP if lmtp else GatewaySMTP

    def make() -> SMTP:
        proto = cls(
            handler,
            data_size_limit=data_size_limit,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="mailgate ESMTP",
            tls_context=tls_context,
            require_starttls=require_starttls and tls_context is not None,
            timeout=timeout,
        )
        proto.limiter = limiter
        return proto

    return make
