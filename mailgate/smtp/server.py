"""The SMTP and LMTP protocol objects: aiosmtpd on the main event loop, with an MTA's limits.

- DATA is read block by block (`smtp.data`): bare LF is a line end and becomes CRLF, only
  `<CR><LF>.<CR><LF>` ends DATA, and past `Limits.spool_threshold` the message goes to a spool file as it
  arrives, so unfinished sessions cost little memory; at most `BIG_AT_ONCE` spooled messages are read
  back into memory for admission at a time. While it arrives, `mail.scan` watches its shape: a
  bare CR in the header block or MIME nested deeper than 100 levels is refused `554 5.6.0` once the
  rest is read. aiosmtpd's other replies are kept (503/501 before 354; 552 past `data_size_limit`,
  after the data is drained). `decode_data` is not supported: mailgate always takes bytes.
- Time: a session quiet for MAILGATE_SMTP_TIMEOUT between commands gets `421 4.4.2` and is closed. In
  DATA the deadline starts at that timeout and each block moves it on by its size at
  `Limits.min_data_rate` (Postfix's `smtpd_min_data_rate`), never further than the timeout from now:
  a big message on a slow link goes through, a sender trickling bytes does not keep DATA open. No
  session lasts longer than MAILGATE_SMTP_SESSION_TIMEOUT.
- Abuse: more than `Limits.junk_commands` NOOP/RSET/VRFY/EXPN/HELP/HELO/EHLO/LHLO, or
  `Limits.hard_errors` 5xx replies, without a message accepted in between, end the session with
  `421 4.7.0`. Sessions over MAILGATE_MAX_CONNECTIONS, or over MAILGATE_MAX_CONNECTIONS_PER_CLIENT from
  one address, are greeted with `421 4.7.0` and closed. MAIL FROM gets `452 4.3.1` while the free space
  under the store or the spool is below MAILGATE_MIN_FREE_SPACE, as does a DATA whose spool file cannot
  be written.
- Each refusal made here is logged and counted through the handler's `reject()`, like the ones
  admission decides.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP, syntax

from mailgate.mail.scan import MimeScan
from mailgate.models import SmtpReply
from mailgate.smtp.data import DotReader, Incoming, Normalizer, incoming_dir
from mailgate.smtp.handler import Handler
from mailgate.smtp.limits import Connections, FreeSpace, Limits, client_key

JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP", "HELO", "EHLO", "LHLO"})
BIG_AT_ONCE = 2  # spooled messages read back and decided at once, per listener (each costs its size)
RUN_FOR = 0.002  # seconds of DATA work in a row before letting the other sessions run
SCAN_SLICE = 16 * 1024  # bytes given to the MIME scan at a time (its cost grows with tiny parts)
BARE_CR = SmtpReply(554, "5.6.0 Message header contains a bare CR (CR without LF)", why="bare_cr")
TOO_DEEP = SmtpReply(554, "5.6.0 MIME nesting too deep", why="mime_too_deep")
TOO_MANY_PARTS = SmtpReply(554, "5.6.0 Too many MIME parts", why="mime_too_many_parts")
TOO_LARGE = SmtpReply(552, "5.3.4 Message too big for system", why="too_large")
NO_SPACE = SmtpReply(452, "4.3.1 Insufficient system storage", why="disk_full")


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with the gateway's DATA reader and limits (see the module docstring).

    Only admitted sessions count against the connection limits. A turned-away session never reaches
    aiosmtpd (its `connection_lost` asserts a session that `connection_made` would have created).
    """

    # RFC 5321 allows 1000 octets a command line; aiosmtpd's limit per command still applies. DATA
    # lines have no limit but the message size (Postfix accepts long lines too).
    line_length_limit = 64 * 1024

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits,
        connections: Connections,
        incoming: Path,
        free_space: FreeSpace,
        big_messages: asyncio.Semaphore,
        **options: Any,
    ) -> None:
        super().__init__(
            handler, data_size_limit=limits.data_size, timeout=limits.timeout, enable_SMTPUTF8=True, **options
        )
        self.limits = limits
        self.connections = connections
        self.incoming = incoming
        self.free_space = free_space
        self.big_messages = big_messages
        self._admitted = False
        self._client: str | None = None
        self._junk = 0
        self._errors = 0
        self._session_timer: asyncio.TimerHandle | None = None
        for name in JUNK & self._smtp_methods.keys():
            self._smtp_methods[name] = self._counted(self._smtp_methods[name])

    # --- connections ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admitted:  # the TLS transport after STARTTLS: the same session
            super().connection_made(transport)
            return
        client = client_key(transport.get_extra_info("peername"))
        refused = self.connections.admit(client)
        if refused is not None:
            self.transport = transport  # for the log line's client address; aiosmtpd never sees it
            self.event_handler.reject(self, "connect", refused)
            self.transport = None
            transport.write(f"{refused}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            return
        self._admitted, self._client = True, client
        self._session_timer = self.loop.call_later(self.limits.session_timeout, self._session_expired)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.connections.release(self._client)
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        """Idle past MAILGATE_SMTP_TIMEOUT (between commands, or DATA behind its deadline): 421, close."""
        self._say_goodbye(SmtpReply(421, "4.4.2 Timeout, closing connection", why="timeout"))
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _session_expired(self) -> None:
        self._say_goodbye(SmtpReply(421, "4.4.2 Session too long, closing connection", why="session_timeout"))
        if self.transport is not None:
            self.transport.close()

    def _say_goodbye(self, reply: SmtpReply) -> None:
        """Log, count and write `reply` (the caller closes the transport)."""
        if self.transport is None or self.transport.is_closing():
            return
        rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
        self.event_handler.reject(self, "session", reply, rcpts=rcpts)
        self.transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]

    # --- junk commands and errors --------------------------------------------------------------------

    def _counted(self, method: Any) -> Any:
        """`method` (an smtp_ verb), refused with 421 past the junk-command limit."""

        @functools.wraps(method)
        async def counted(arg: str) -> None:
            self._junk += 1
            if self._junk > self.limits.junk_commands:
                self._close(SmtpReply(421, "4.7.0 Too many junk commands, closing connection", why="junk"))
                return
            await method(arg)

        return counted

    def _close(self, reply: SmtpReply) -> None:
        self._say_goodbye(reply)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: str) -> None:  # type: ignore[override]
        """Send a reply; nothing once the session is closing. Count 5xx replies against the error limit."""
        if self.transport is None or self.transport.is_closing():
            return
        await super().push(status)
        if status[:1] == "5":
            self._errors += 1
            if self._errors >= self.limits.hard_errors:
                self._close(SmtpReply(421, "4.7.0 Too many errors, closing connection", why="errors"))

    # --- MAIL and DATA -------------------------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.session is not None and self.session.host_name and self.free_space.low():
            self.event_handler.reject(self, "mail", NO_SPACE)
            await self.push(str(NO_SPACE))
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
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
        incoming = Incoming(self.incoming, self.limits.spool_threshold)
        try:  # however DATA ends (a reply, a lost connection, a timeout), the spool file goes
            try:
                problem = await self._receive(incoming)
            except asyncio.IncompleteReadError:  # the client went away inside DATA
                if self.transport is not None:
                    self.transport.close()
                return
            self._reset_timeout()  # the decision on the message gets a full timeout of its own
            status = None
            if problem is None and incoming.path is not None:  # spooled: BIG_AT_ONCE decided at a time
                async with self.big_messages:
                    status = await self._decide(incoming)
            elif problem is None:
                status = await self._decide(incoming)
        finally:
            incoming.discard()
        if status is None:
            problem = problem or NO_SPACE
            self.event_handler.reject(self, "data", problem, rcpts=self.envelope.rcpt_tos)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(problem))
            return
        if status.startswith("2"):  # a message went through: the session has earned its counters back
            self._junk = self._errors = 0
        await self.push(status)

    async def _decide(self, incoming: Incoming) -> str | None:
        """The handler's reply to the message in `incoming` (read back whole for it); None if the
        spool file could not be read back."""
        assert self.envelope is not None
        try:
            content = await incoming.content()
        except OSError:
            return None
        self.envelope.content = self.envelope.original_content = content
        del content
        status = await self._call_handler_hook("DATA") if "DATA" in self._handle_hooks else MISSING
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        return "250 OK" if status is MISSING else str(status)

    async def _receive(self, incoming: Incoming) -> SmtpReply | None:
        """Read one DATA to its end into `incoming`; the refusal to give once it is read, or None."""
        limits = self.limits
        reader, normalizer = DotReader(self._reader), Normalizer()
        scan = MimeScan(
            max_depth=limits.mime_depth, max_parts=limits.mime_parts, max_header=limits.max_header
        )
        problem = None
        now = self.loop.time()
        deadline = scheduled = now + limits.timeout
        step = min(1.0, limits.timeout / 10)
        ran_since = time.perf_counter()  # when this session last let the others run
        while (block := await reader.block()) is not None:
            now = self.loop.time()
            deadline = min(now + limits.timeout, deadline + len(block) / limits.min_data_rate)
            if deadline - scheduled >= step:
                self._reset_timeout(max(deadline - now, 0.001))
                scheduled = deadline
            if problem is None:
                normalized = normalizer.feed(block)
                # the size as stored (each bare LF made CRLF), not as sent: "\n" * limit is twice the limit
                if self.data_size_limit and incoming.size + len(normalized) > self.data_size_limit:
                    problem = TOO_LARGE
                else:
                    for start in range(0, len(normalized), SCAN_SLICE):  # the scan's cost grows with parts
                        scan.feed(normalized[start : start + SCAN_SLICE])
                        if time.perf_counter() - ran_since > RUN_FOR:
                            await asyncio.sleep(0)
                            ran_since = time.perf_counter()
                    problem = (
                        BARE_CR
                        if scan.bare_cr
                        else TOO_DEEP
                        if scan.too_deep
                        else TOO_MANY_PARTS
                        if scan.too_many_parts
                        else None
                    )
                    try:
                        if problem is None:
                            await incoming.write(normalized)
                    except OSError:
                        problem = NO_SPACE
                if problem is not None:
                    incoming.discard()  # and drain to the end, keeping nothing
            if time.perf_counter() - ran_since > RUN_FOR:  # blocks already buffered come without a wait
                await asyncio.sleep(0)
                ran_since = time.perf_counter()
        if problem is None:
            scan.close()
            problem = BARE_CR if scan.bare_cr else None
        return problem


class GatewayLMTP(LMTP, GatewaySMTP):
    pass


def protocol_factory(
    handler: Handler,
    *,
    hostname: str,
    limits: Limits,
    spool_dir: Path,
    free_space: FreeSpace | None = None,
    tls_context: ssl.SSLContext | None = None,
    require_starttls: bool = False,
    lmtp: bool = False,
) -> Any:
    """A factory for `loop.create_server`; its sessions share one count of connections."""
    connections = Connections(limits.max_connections, limits.max_per_client)
    space = free_space if free_space is not None else FreeSpace([], 0)
    big_messages = asyncio.Semaphore(BIG_AT_ONCE)
    cls = GatewayLMTP if lmtp else GatewaySMTP

    def make() -> SMTP:
        return cls(
            handler,
            limits=limits,
            connections=connections,
            incoming=incoming_dir(spool_dir),
            free_space=space,
            big_messages=big_messages,
            hostname=hostname,
            ident="mailgate ESMTP",
            tls_context=tls_context,
            require_starttls=require_starttls and tls_context is not None,
        )

    return make
