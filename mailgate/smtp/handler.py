"""The aiosmtpd hooks: each RCPT and each DATA handed to admission, its decision turned into SMTP replies.

One reply per recipient for LMTP, one combined reply for SMTP. Any unexpected failure answers `451 4.3.0`
so the sending MTA keeps the message and retries; no exception text ever reaches the peer.

Every decision on mail is one INFO line, as Postfix's `NOQUEUE: reject:` and `queued as` lines are:
`smtp_reject` (stage `connect`, `mail`, `rcpt`, `data` or `session`; the client's `ip:port` or the LMTP
socket, the HELO name, MAIL FROM, the recipient, the reply and its `reason`), `smtp_accept` (with the
queue id) and `message_ignored` (accepted but never answered, with why). `reject()` is also what
`smtp.server` calls for the refusals it makes itself (size, bare CR, nesting, disk, connections, junk
commands, errors, timeouts). Each is counted in `mailgate_smtp_replies` by stage, code class and reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate.admission.admit import Admission
from mailgate.errors import StoreBusy
from mailgate.logs import client
from mailgate.metrics import Metrics
from mailgate.models import SmtpReply

log = logging.getLogger("mailgate.smtp")

TRY_LATER = "451 4.3.0 Temporary failure, please try again later"


class Handler:
    """aiosmtpd handler hooks. `is_lmtp` selects one DATA reply per recipient."""

    def __init__(
        self,
        admission: Admission,
        *,
        max_recipients: int,
        is_lmtp: bool = False,
        on_accepted: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.admission = admission
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_accepted = on_accepted
        self.max_recipients = max_recipients
        self.is_lmtp = is_lmtp

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """EHLO and LHLO: aiosmtpd's lines plus ENHANCEDSTATUSCODES (RFC 2034), since every reply
        mailgate writes carries one; the last line (`250 HELP`) stays last."""
        session.host_name = hostname
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", *responses[-1:]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            reply = SmtpReply(452, "4.5.3 Too many recipients", why="too_many_recipients")
        else:
            reply = await self.admission.check_recipient(address)
        if reply.ok:
            envelope.rcpt_tos.append(address)
            self.metrics.smtp_replies.labels("rcpt", "2xx", reply.why or "accepted").inc()
        else:
            self.reject(server, "rcpt", reply, rcpts=[address])
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.monotonic()
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover (we never set decode_data)
            raw = raw.encode("utf-8", "surrogateescape")
        rcpts = list(envelope.rcpt_tos)
        try:
            replies = await self.admission.accept(envelope.mail_from or "", rcpts, raw)
        except StoreBusy:
            log.exception("store_commit_failed", extra={"rcpts": len(rcpts), "client": _client(server)})
            reply = SmtpReply(451, "4.3.0 Temporary storage failure, please try again later", why="storage")
            replies = [reply] * len(rcpts)
        except Exception:
            log.exception("data_failed", extra={"client": _client(server)})
            replies = [SmtpReply(451, "4.3.0 Temporary failure, please try again later", why="error")] * len(
                rcpts
            )
        if any(r.ok for r in replies):
            self.on_accepted()
        for rcpt, reply in zip(rcpts, replies, strict=True):
            if reply.ok:
                self._accepted(server, rcpt, reply, size=len(raw))
            else:
                self.reject(server, "data", reply, rcpts=[rcpt])
        self.metrics.data_seconds.observe(time.monotonic() - started)
        if self.is_lmtp:
            return "\r\n".join(str(r) for r in replies)
        return str(combine(replies))

    def _accepted(self, server: SMTP, rcpt: str, reply: SmtpReply, *, size: int) -> None:
        why = reply.why or "accepted"
        self.metrics.smtp_replies.labels("data", "2xx", why).inc()
        fields = _session_fields(server) | {"rcpt": rcpt, "queue_id": _queue_id(reply), "size": size}
        if why == "ignored":
            self.metrics.messages.labels("ignored").inc()
            log.info("message_ignored", extra=fields | {"reason": reply.note})
        else:
            log.info("smtp_accept", extra=fields | {"reason": why, "reply": str(reply)})

    def reject(self, server: Any, stage: str, reply: SmtpReply, *, rcpts: Sequence[str] = ()) -> None:
        """Log and count one refusal (`stage`: connect, mail, rcpt, data, session), one line per recipient."""
        why = reply.why or "refused"
        self.metrics.smtp_replies.labels(stage, f"{reply.code // 100}xx", why).inc(max(1, len(rcpts)))
        fields = _session_fields(server) | {"stage": stage, "reply": str(reply), "reason": why}
        for rcpt in rcpts or [""]:
            log.info("smtp_reject", extra=fields | {"rcpt": rcpt})

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp_session_error", exc_info=error)
        return TRY_LATER


def combine(replies: Sequence[SmtpReply]) -> SmtpReply:
    """One SMTP reply for several recipients: a temporary failure wins, then a permanent one."""
    for reply in replies:
        if 400 <= reply.code < 500:
            return reply
    for reply in replies:
        if reply.code >= 500:
            return reply
    return replies[0]


def _client(server: Any) -> str:
    """The peer of `server`'s connection: `ip:port`, or the LMTP socket's path."""
    transport = getattr(server, "transport", None)
    if transport is None:
        return ""
    return client(transport.get_extra_info("peername"), transport.get_extra_info("sockname"))


def _session_fields(server: Any) -> dict[str, Any]:
    session = getattr(server, "session", None)
    envelope = getattr(server, "envelope", None)
    return {
        "client": _client(server),
        "helo": getattr(session, "host_name", None),
        "mail_from": "<>"
        if getattr(envelope, "mail_from", None) == ""
        else getattr(envelope, "mail_from", None),
    }


def _queue_id(reply: SmtpReply) -> str:
    """The queue id a 250 names (`... queued as 01H...`), or empty."""
    return reply.text.rsplit(" ", 1)[1] if " queued as " in reply.text else ""
