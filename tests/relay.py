"""RecordingRelay: an SMTP relay for tests, served by aiosmtpd on the test's own event loop.

    relay = RecordingRelay()
    port = await relay.start()
    relay.fail_next("451 4.3.0 Try again later", times=2, stage="RCPT")
    ...
    mail_from, rcpts, data = (await relay.wait_for(1))[0]
    await relay.close()

Optional: STARTTLS (`tls_context`, a server context), implicit TLS (`implicit_tls=True`), AUTH
(`logins={"user": "password"}`, required before MAIL when given; PLAIN and LOGIN, or fewer with
`auth_exclude`), per-recipient refusals (`refuse`), no 8BITMIME in its EHLO (`eight_bit_mime=False`).
Every message is recorded with whether its session was encrypted, who logged in and the client's EHLO
name (`tls`, `users`, `helo_names`, parallel to `messages`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Stage = Literal["MAIL", "RCPT", "DATA"]


@dataclass
class _Fault:
    reply: str
    times: int
    stage: Stage


class RecordingRelay:
    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        logins: Mapping[str, str] | None = None,
        auth_exclude: Sequence[str] = (),
        hostname: str = "relay.test",
        smtputf8: bool = True,
        eight_bit_mime: bool = True,
    ) -> None:
        if implicit_tls and tls_context is None:
            raise ValueError("implicit_tls needs a tls_context")
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.require_starttls = require_starttls
        self.logins = dict(logins or {})
        self.auth_exclude = list(auth_exclude)
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.eight_bit_mime = eight_bit_mime
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.tls: list[bool] = []  # per message: was the session encrypted
        self.users: list[str | None] = []  # per message: the AUTH user, if any
        self.mail_options: list[list[str]] = []  # per message: the MAIL FROM parameters
        self.helo_names: list[str | None] = []  # per message: the name the client gave in EHLO/HELO
        self.port = 0
        self._faults: deque[_Fault] = deque()
        self._refusals: dict[str, str] = {}
        self._arrived = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._protocols: list[SMTP] = []

    async def start(self) -> int:
        """Listen on 127.0.0.1:0 and return the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._make_protocol, "127.0.0.1", 0, ssl=self.tls_context if self.implicit_tls else None
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _make_protocol(self) -> SMTP:
        protocol = SMTP(
            self,
            hostname=self.hostname,
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.require_starttls,
            authenticator=self._authenticate if self.logins else None,
            # aiosmtpd does not know an SMTPS session is encrypted, so it would refuse AUTH there; and it
            # warns about auth_required without auth_require_tls. handle_MAIL enforces AUTH instead.
            auth_require_tls=not self.implicit_tls,
            auth_exclude_mechanism=self.auth_exclude,
            enable_SMTPUTF8=self.smtputf8,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.append(protocol)
        return protocol

    def fail_next(self, code_line: str, times: int = 1, stage: Stage = "RCPT") -> None:
        """Answer the next `times` commands of `stage` with `code_line`, e.g. "451 4.3.0 Try later"."""
        self._faults.append(_Fault(code_line, times, stage))

    def refuse(self, address: str, code_line: str) -> None:
        """Answer every RCPT TO:<address> with `code_line` (until `accept(address)`)."""
        self._refusals[address.lower()] = code_line

    def accept(self, address: str) -> None:
        self._refusals.pop(address.lower(), None)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[tuple[str, list[str], bytes]]:
        """Wait until at least `n` messages arrived; TimeoutError (with the count) after `timeout`."""
        try:
            async with asyncio.timeout(timeout), self._arrived:
                await self._arrived.wait_for(lambda: len(self.messages) >= n)
        except TimeoutError:
            raise TimeoutError(f"expected {n} message(s) at the relay, got {len(self.messages)}") from None
        return list(self.messages)

    async def close(self) -> None:
        """Stop listening, drop every open session and wait for their handlers to finish."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for protocol in self._protocols:
            if protocol.transport is not None and not protocol.transport.is_closing():
                protocol.transport.close()
        handlers = [p._handler_coroutine for p in self._protocols if p._handler_coroutine is not None]
        if handlers:  # asyncio.wait: a handler that ignores its cancellation cannot hold the close
            _, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()

    def _fault(self, stage: Stage) -> str | None:
        for fault in self._faults:
            if fault.stage == stage:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault.reply
        return None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.logins.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data.login.decode() if ok else None)

    # aiosmtpd handler hooks

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [r for r in responses if self.eight_bit_mime or r != "250-8BITMIME"]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.logins and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if (reply := self._fault("MAIL")) is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if (reply := self._fault("RCPT") or self._refusals.get(address.lower())) is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if (reply := self._fault("DATA")) is not None:
            return reply
        data = envelope.original_content or b""
        if isinstance(envelope.content, bytes):
            data = envelope.content
        async with self._arrived:
            self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos), data))
            self.tls.append(session.ssl is not None or self.implicit_tls)
            self.users.append(session.auth_data if isinstance(session.auth_data, str) else None)
            self.mail_options.append(list(envelope.mail_options))
            self.helo_names.append(session.host_name)
            self._arrived.notify_all()
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"
