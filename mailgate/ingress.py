"""The SMTP and LMTP listeners: aiosmtpd protocol objects on the main event loop.

The handler translates between SMTP and `Intake`: RCPT checks, DATA decisions, one reply per recipient
for LMTP. Any unexpected failure answers `451 4.3.0` so the sending MTA keeps the message and retries;
no exception text ever reaches the peer. Sessions over MAILGATE_MAX_CONNECTIONS get `421 4.7.0`; a
session quiet for MAILGATE_SMTP_TIMEOUT (aiosmtpd restarts the clock at each command, so DATA as a whole
must finish within it) gets `421 4.4.2` and is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate.errors import StoreBusy
from mailgate.intake import Intake, Reply, combine
from mailgate.smtpdata import StreamingData

log = logging.getLogger("mailgate.ingress")

TRY_LATER = "451 4.3.0 Temporary failure, please try again later"


class Handler:
    """aiosmtpd handler hooks. `is_lmtp` selects one DATA reply per recipient."""

    def __init__(
        self,
        intake: Intake,
        *,
        max_recipients: int,
        is_lmtp: bool = False,
        on_accepted: Callable[[], None] = lambda: None,
    ) -> None:
        self.intake = intake
        self.on_accepted = on_accepted
        self.max_recipients = max_recipients
        self.is_lmtp = is_lmtp

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        reply = await self.intake.check_recipient(address)
        if reply.ok:
            envelope.rcpt_tos.append(address)
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover (we never set decode_data)
            raw = raw.encode("utf-8", "surrogateescape")
        rcpts = list(envelope.rcpt_tos)
        try:
            replies = await self.intake.accept(envelope.mail_from or "", rcpts, raw)
        except StoreBusy:
            log.exception("store_commit_failed", extra={"rcpts": len(rcpts)})
            replies = [Reply(451, "4.3.0 Temporary storage failure, please try again later")] * len(rcpts)
        except Exception:
            log.exception("data_failed")
            replies = [Reply(451, "4.3.0 Temporary failure, please try again later")] * len(rcpts)
        if any(r.ok for r in replies):
            self.on_accepted()
        for rcpt, reply in zip(rcpts, replies, strict=True):
            log.info(
                "data",
                extra={
                    "peer": session.peer,
                    "mail_from": envelope.mail_from,
                    "rcpt": rcpt,
                    "reply": str(reply),
                },
            )
        if self.is_lmtp:
            return "\r\n".join(str(r) for r in replies)
        return str(combine(replies))

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp_session_error", exc_info=error)
        return TRY_LATER


class _Limited:
    """Counts open sessions across a listener and turns away the ones over the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class GatewaySMTP(StreamingData):  # DATA read into one buffer, not a list of lines (see smtpdata)
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
            log.warning(
                "connection_refused", extra={"why": "too many connections", "limit": self.limiter.limit}
            )
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.limiter.open += 1
        self._admitted = True
        super().connection_made(transport)

    def _timeout_cb(self) -> None:
        """Idle past MAILGATE_SMTP_TIMEOUT (between commands, or in all of DATA): say 421, then close."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"421 4.4.2 Timeout, closing connection\r\n")  # type: ignore[attr-defined]
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
