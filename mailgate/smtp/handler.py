"""The aiosmtpd hooks: each RCPT and each DATA handed to admission, its decision turned into SMTP replies.

One reply per recipient for LMTP, one combined reply for SMTP. Any unexpected failure answers `451 4.3.0`
so the sending MTA keeps the message and retries; no exception text ever reaches the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailgate.admission.admit import Admission
from mailgate.errors import StoreBusy
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
    ) -> None:
        self.admission = admission
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
            return "452 4.5.3 Too many recipients"
        reply = await self.admission.check_recipient(address)
        if reply.ok:
            envelope.rcpt_tos.append(address)
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):  # pragma: no cover (we never set decode_data)
            raw = raw.encode("utf-8", "surrogateescape")
        rcpts = list(envelope.rcpt_tos)
        try:
            replies = await self.admission.accept(envelope.mail_from or "", rcpts, raw)
        except StoreBusy:
            log.exception("store_commit_failed", extra={"rcpts": len(rcpts)})
            replies = [SmtpReply(451, "4.3.0 Temporary storage failure, please try again later")] * len(rcpts)
        except Exception:
            log.exception("data_failed")
            replies = [SmtpReply(451, "4.3.0 Temporary failure, please try again later")] * len(rcpts)
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


def combine(replies: Sequence[SmtpReply]) -> SmtpReply:
    """One SMTP reply for several recipients: a temporary failure wins, then a permanent one."""
    for reply in replies:
        if 400 <= reply.code < 500:
            return reply
    for reply in replies:
        if reply.code >= 500:
            return reply
    return replies[0]
