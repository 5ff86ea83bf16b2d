"""Deliver one rendered message: to the SMTP relay (aiosmtplib) or into a local Maildir.

`make_delivery(settings)` picks one. `deliver()` either returns a `DeliveryReport` (the relay took the
message for at least one recipient) or raises:
- `DeliveryDeferred`: 4xx replies, connection errors, timeouts, TLS or AUTH failures (all worth retrying
  after an operator or the relay fixes something); the relay's reply is in the message.
- `DeliveryFailed`: 5xx to MAIL FROM or DATA, or to every recipient; `too_large` when the relay refused
  the message's size (552, or the enhanced status 5.3.4 or 5.2.3, at MAIL FROM with SIZE= or at DATA).
Recipients refused while others were accepted are reported per recipient in `DeliveryReport.refused`.
`eight_bit` says whether the path takes 8-bit data (the relay offered 8BITMIME when last asked; a
Maildir always), for replies still to be composed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import aiosmtplib

from mailgate import private
from mailgate.config import Relay, Settings, default_helo_name
from mailgate.errors import DeliveryDeferred, DeliveryFailed


@dataclass(frozen=True)
class DeliveryReport:
    """What the relay did with one message."""

    accepted: tuple[str, ...]  # recipients the relay took
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> the relay's reply, "550 5.1.1 ..."
    response: str = ""  # the relay's final reply, e.g. "250 2.0.0 Ok: queued as X"


class Delivery(Protocol):
    eight_bit: bool

    async def deliver(
        self, message: bytes, *, mail_from: str, recipients: Sequence[str]
    ) -> DeliveryReport: ...

    async def aclose(self) -> None: ...


class RelayDelivery:
    """SMTP deliveries to the configured relay: one connection per delivery, or with `keep_idle` > 0 a
    connection whose delivery succeeded is kept that many seconds for the next one (at most `max_idle`).

    A kept connection found closed is dropped; one that fails before the relay took MAIL FROM (it went
    stale in the meantime) is dropped and the delivery made over a new connection, which is safe since
    nothing of the message was sent. Any later failure is reported as usual. `aclose()` ends kept ones.

    `smtp://` never upgrades (opportunistic STARTTLS off), `smtp+starttls://` requires STARTTLS, `smtps://`
    is implicit TLS. AUTH (PLAIN/LOGIN/CRAM-MD5, whatever the relay offers) when the relay URL has
    credentials. `tls_context` overrides certificate handling (e.g. a private CA); `verify_tls=False`
    accepts any certificate.
    """

    def __init__(
        self,
        relay: Relay,
        *,
        verify_tls: bool = True,
        tls_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        local_hostname: str | None = None,
        keep_idle: float = 0.0,
        max_idle: int = 4,
    ) -> None:
        self.relay = relay
        self.verify_tls = verify_tls
        self.tls_context = tls_context
        self.timeout = timeout
        self.local_hostname = local_hostname
        self.keep_idle = keep_idle
        self.max_idle = max_idle
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # (connection, when it was last used)
        self.eight_bit = True  # until a relay says otherwise (nearly every relay offers 8BITMIME)

    def __repr__(self) -> str:
        return f"RelayDelivery({self.relay.scheme}://{self.relay.host}:{self.relay.port})"

    async def deliver(self, message: bytes, *, mail_from: str, recipients: Sequence[str]) -> DeliveryReport:
        if not recipients:
            raise ValueError("deliver() needs at least one recipient")
        relay = self.relay
        where = f"relay {relay.host}:{relay.port}"
        # a small message is prepared on the loop (a few scans of <= 64 KiB): the hop to a thread and back
        # costs more than that
        wire = _Wire.of(message) if len(message) <= _ON_LOOP else await asyncio.to_thread(_Wire.of, message)
        kept = self._kept()
        if kept is not None:
            stage = _Stage()
            try:
                report = await self._transaction(kept, wire, mail_from, recipients, where, stage)
            except (aiosmtplib.SMTPException, OSError, DeliveryDeferred) as exc:
                kept.close()
                if stage.mail_accepted:
                    raise _deferred(where, exc) from exc
                # stale before anything of the message was sent: a new connection below
            except BaseException:
                kept.close()
                raise
            else:
                self._keep(kept)
                return report
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            username=relay.username,
            password=relay.password,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            use_tls=relay.scheme == "smtps",
            start_tls=relay.scheme == "smtp+starttls",
            validate_certs=self.verify_tls,
            tls_context=self.tls_context,
        )
        kept_now = False
        try:
            await smtp.connect()
            report = await self._transaction(smtp, wire, mail_from, recipients, where, _Stage())
            kept_now = self._keep(smtp)
            if not kept_now:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await smtp.quit()  # the message is already accepted
            return report
        except (aiosmtplib.SMTPException, OSError) as exc:  # OSError: also ssl.SSLError, TimeoutError
            raise _deferred(where, exc) from exc
        finally:
            if not kept_now:
                smtp.close()

    async def _transaction(self, smtp: aiosmtplib.SMTP, *args: Any) -> DeliveryReport:
        try:
            return await _transaction(smtp, *args)
        finally:
            if smtp.esmtp_extensions:  # learnt at EHLO
                self.eight_bit = smtp.supports_extension("8bitmime")

    def _kept(self) -> aiosmtplib.SMTP | None:
        """A kept connection that is still open and was used recently enough, if any."""
        while self._idle:
            smtp, since = self._idle.pop()
            if smtp.is_connected and time.monotonic() - since <= self.keep_idle:
                return smtp
            smtp.close()
        return None

    def _keep(self, smtp: aiosmtplib.SMTP) -> bool:
        """Keep `smtp` for the next delivery, if kept connections are wanted and there is room."""
        if self.keep_idle <= 0 or len(self._idle) >= self.max_idle or not smtp.is_connected:
            return False
        self._idle.append((smtp, time.monotonic()))
        return True

    async def aclose(self) -> None:
        """QUIT and close the kept connections."""
        idle, self._idle = self._idle, []
        for smtp, _ in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
            smtp.close()


@dataclass
class _Stage:
    mail_accepted: bool = False  # after this, a failure may follow bytes of the message: never resend at once


def _deferred(where: str, exc: BaseException) -> DeliveryDeferred:
    if isinstance(exc, DeliveryDeferred):
        return exc
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        # Greeting, EHLO, STARTTLS or AUTH refused: about this gateway or the relay, not the message.
        return DeliveryDeferred(f"{where}: {exc.code} {exc.message}")
    return DeliveryDeferred(f"{where}: {type(exc).__name__}: {exc}")


async def _transaction(
    smtp: aiosmtplib.SMTP,
    wire: _Wire,
    mail_from: str,
    recipients: Sequence[str],
    where: str,
    stage: _Stage,
) -> DeliveryReport:
    """MAIL, RCPT per recipient, DATA. Replies to these name the message, so 5xx here is permanent."""
    if smtp.is_ehlo_or_helo_needed:  # learn the extensions before choosing MAIL FROM parameters
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()
    options = []
    if smtp.supports_extension("size"):  # the size on the wire, with every line ending as CRLF
        options.append(f"SIZE={wire.size}")
    if smtp.supports_extension("8bitmime") and not wire.ascii:
        options.append("BODY=8BITMIME")
    addresses = [mail_from, *recipients]
    utf8 = not all(a.isascii() for a in addresses)
    if utf8 and not smtp.supports_extension("smtputf8"):
        raise DeliveryFailed(f"{where}: an address is not ASCII and the relay does not offer SMTPUTF8")
    if utf8:
        options.append("SMTPUTF8")
    encoding = "utf-8" if utf8 else "ascii"
    try:
        await smtp.mail(mail_from, options=options, encoding=encoding)
    except aiosmtplib.SMTPSenderRefused as exc:
        _raise_for(exc.code, f"{where}: MAIL FROM refused: {exc.code} {exc.message}", exc.message)
    stage.mail_accepted = True
    accepted: list[str] = []
    refused: dict[str, str] = {}
    for rcpt in recipients:
        try:
            await smtp.rcpt(rcpt, encoding=encoding)
            accepted.append(rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            refused[rcpt] = f"{exc.code} {exc.message}"
    if not accepted:
        replies = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
        if all(reply.startswith("5") for reply in refused.values()):
            raise DeliveryFailed(f"{where}: every recipient refused: {replies}")
        raise DeliveryDeferred(f"{where}: no recipient accepted: {replies}")
    try:
        response = await _data(smtp, wire)
    except aiosmtplib.SMTPDataError as exc:
        _raise_for(exc.code, f"{where}: DATA refused: {exc.code} {exc.message}", exc.message)
    return DeliveryReport(tuple(accepted), refused, f"{response.code} {response.message}")


@dataclass(frozen=True)
class _Wire:
    """A message as DATA sends it, prepared once per delivery in a worker thread, a slice at a time.

    aiosmtplib's `data()` runs two regular expressions over the whole message on the event loop (line
    ends, dot-stuffing: 0.3-0.9 s for a 10 MB reply, the loop held all along), and the SIZE= and
    8-bit checks are whole-message scans too. Here each C call sees one slice (<= 1 MiB, cut after a
    line end), so the loop keeps its turns. A message whose line ends are not all CRLF (mailgate's
    replies always are) keeps `pieces` None and goes through `data()`.
    """

    message: bytes
    size: int  # every line end counted as CRLF (RFC 1870)
    ascii: bool
    pieces: list[bytes] | None  # dot-stuffed, without the final ".\r\n"

    @classmethod
    def of(cls, message: bytes) -> _Wire:
        pieces: list[bytes] = []
        size, ascii_only, crlf_only, start = len(message), True, True, 0
        while start < len(message):
            end = message.find(b"\n", start + _DATA_SLICE) + 1 or len(message)
            piece = message[start:end]
            lf, crlf = piece.count(b"\n"), piece.count(b"\r\n")
            size += lf - crlf
            crlf_only = crlf_only and lf == crlf == piece.count(b"\r")
            ascii_only = ascii_only and piece.isascii()
            stuffed = piece.replace(b"\r\n.", b"\r\n..")
            pieces.append(b"." + stuffed if piece.startswith(b".") else stuffed)  # a line's start
            start = end
        if not message.endswith(b"\n"):
            size += 2
            pieces.append(b"\r\n")
        return cls(message, size, ascii_only, pieces if crlf_only else None)


_DATA_SLICE = 1024 * 1024
_ON_LOOP = 64 * 1024  # messages up to this size are prepared on the event loop (~0.05-0.2 ms)


async def _data(smtp: aiosmtplib.SMTP, wire: _Wire) -> aiosmtplib.SMTPResponse:
    """DATA, the prepared message and its final dot; `data()` for a message `_Wire` could not prepare."""
    if wire.pieces is None:
        return await smtp.data(wire.message)
    response = await smtp.execute_command(b"DATA")
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    assert smtp.protocol is not None
    for piece in (*wire.pieces, b".\r\n"):
        smtp.protocol.write(piece)
    try:
        response = await smtp.protocol.read_response(timeout=smtp.timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()  # as `data()` does: a late reply must not be taken for the next command's
        raise
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _raise_for(code: int, text: str, message: str = "") -> NoReturn:
    # 530/538: the relay wants AUTH or TLS first, a configuration problem rather than the message's.
    if 500 <= code < 600 and code not in (530, 538):
        too_large = code == 552 or message.startswith(("5.3.4", "5.2.3"))
        raise DeliveryFailed(text, too_large=too_large)
    raise DeliveryDeferred(text)


class MaildirDelivery:
    """Writes each message into a Maildir's `new/` (tmp/ first, fsynced, then renamed), per the spec.

    The file is the message with LF line endings and `Return-Path` and `X-Envelope-To` headers in front,
    as a local delivery agent writes it. All file I/O runs in a worker thread.
    """

    _counter = itertools.count(1)
    eight_bit = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"MaildirDelivery({str(self.path)!r})"

    async def aclose(self) -> None:
        """Nothing is kept open between deliveries."""

    async def deliver(self, message: bytes, *, mail_from: str, recipients: Sequence[str]) -> DeliveryReport:
        if not recipients:
            raise ValueError("deliver() needs at least one recipient")
        try:
            name = await asyncio.to_thread(self._write, message, mail_from, recipients)
        except OSError as exc:
            raise DeliveryDeferred(f"maildir {self.path}: {exc.strerror or exc}") from exc
        return DeliveryReport(tuple(recipients), {}, f"250 2.0.0 Ok: written to {name}")

    def _write(self, message: bytes, mail_from: str, recipients: Sequence[str]) -> str:
        for sub in ("tmp", "new", "cur"):
            private.make_dir(self.path / sub)  # 0700, the Maildir itself too, whatever the umask
        envelope = f"Return-Path: <{mail_from}>\nX-Envelope-To: {', '.join(recipients)}\n".encode()
        name = self._unique_name()
        tmp = self.path / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, private.FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(fd, private.FILE_MODE)
                file.write(envelope)
                file.write(message.replace(b"\r\n", b"\n"))
                file.flush()
                os.fsync(file.fileno())
            os.rename(tmp, self.path / "new" / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path / "new")
        return name

    def _unique_name(self) -> str:
        """time.M<usec>P<pid>Q<n>.<host>: unique per the Maildir spec ("/" and ":" escaped in the host)."""
        now = time.time()
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        return f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}Q{next(self._counter)}.{host}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_delivery(settings: Settings) -> Delivery:
    """The relay from MAILGATE_SMTP_RELAY, or the Maildir at MAILGATE_OUTBOX_DIR when none is set."""
    if settings.smtp_relay is not None:
        # replies often come in bursts: the next one skips the connection set-up (connect, EHLO, TLS, AUTH)
        return RelayDelivery(
            settings.smtp_relay,
            verify_tls=settings.relay_verify_tls,
            local_hostname=settings.helo_name or default_helo_name(settings.domain),
            keep_idle=15.0,
        )
    return MaildirDelivery(settings.outbox_dir)
