"""Test helpers: build real messages and speak SMTP to a port, reporting each reply as the peer saw it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib


def make_mail(
    *,
    sender: str = "alice@example.org",
    to: str | Sequence[str] = "research@agents.example.com",
    cc: Sequence[str] = (),
    subject: str = "Quarterly numbers",
    body: str = "Please summarise the attached numbers.",
    message_id: str | None = None,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    headers: dict[str, str] | None = None,
    attachments: Sequence[tuple[str, str, bytes]] = (),
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join([to] if isinstance(to, str) else to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id or make_msgid(domain="example.org")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    for filename, ctype, data in attachments:
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


@dataclass
class Transcript:
    """What an SMTP client saw: the reply to each RCPT and to the end of DATA."""

    rcpt: list[tuple[int, str]] = field(default_factory=list)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> bool:
        return self.data is not None and self.data[0] == 250


async def smtp_send(
    port: int,
    data: bytes | EmailMessage,
    *,
    mail_from: str = "alice@example.org",
    rcpts: Sequence[str] | None = None,
) -> Transcript:
    """One SMTP transaction against 127.0.0.1:`port`; never raises for a refusal, reports it."""
    if isinstance(data, EmailMessage):
        if rcpts is None:
            rcpts = [a.strip() for a in str(data["To"]).split(",")]
        data = data.as_bytes()
    assert rcpts is not None
    out = Transcript()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(mail_from)
        for rcpt in rcpts:
            try:
                reply = await client.rcpt(rcpt)
                out.rcpt.append((reply.code, reply.message))
            except aiosmtplib.SMTPRecipientRefused as exc:
                out.rcpt.append((exc.code, exc.message))
        if any(code < 300 for code, _ in out.rcpt):
            try:
                reply = await client.data(data)
                out.data = (reply.code, reply.message)
            except aiosmtplib.SMTPResponseException as exc:
                out.data = (exc.code, exc.message)
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()
    return out


async def until(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll `predicate` until true (a deadline, not a sleep-and-hope); fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)
