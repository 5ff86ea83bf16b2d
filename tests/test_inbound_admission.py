"""Real-world mail in (issue 11), over real SMTP to a gateway on port 0: who a From names, what our MTA's
Authentication-Results say together, how much work a hostile header costs, which messages are the same,
what is kept of ignored mail and for how long, and what a sender's bytes can do to file names and logs.
"""

from __future__ import annotations

import asyncio
import email._header_value_parser as header_parser
import email.headerregistry
import hashlib
import io
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import anyio
import pytest

from mailgate import cli
from mailgate.errors import RawMissing
from mailgate.logs import LogfmtFormatter
from mailgate.mail.headers import MAX_ADDRESSES, MAX_TEXT, header_block
from mailgate.models import InboundState
from mailgate.service import Gateway
from mailgate.store import InboundRow
from mailgate.store.schema import MIGRATIONS
from tests.conftest import both_stores, env_for, settings_for
from tests.daemon import write_env
from tests.mail import Transcript, make_mail, smtp_send, until

pytestmark = pytest.mark.anyio

WORKER = "research@agents.example.com"
AUTHSERV = "mx.agents.example.com"
DMARC = {"MAILGATE_AUTH": "dmarc", "MAILGATE_AUTHSERV_ID": AUTHSERV}
RECEIVED = "from mail.example.org (mail.example.org [192.0.2.7]) by mx.agents.example.com (Postfix)"


def queue_id(seen: Transcript) -> str:
    assert seen.data is not None and seen.data[0] == 250, seen.data
    return seen.data[1].rsplit(" ", 1)[1]


async def row_of(gw: Gateway, seen: Transcript) -> InboundRow:
    row = await gw.store.inbound(queue_id(seen))
    assert row is not None
    return row


def raw_mail(headers: list[tuple[str, str]], body: str = "Hello there.") -> bytes:
    """A message as written, header by header (no email package in between: it would fix them)."""
    lines = [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def plain_headers(**extra: str) -> list[tuple[str, str]]:
    found = {
        "From": "Alice <alice@example.org>",
        "To": WORKER,
        "Subject": "Quarterly numbers",
        "Message-ID": f"<{time.time_ns()}@example.org>",
    }
    found.update({k.replace("_", "-"): v for k, v in extra.items()})
    return list(found.items())


# --- 2. a From is judged by its address -----------------------------------------------------------------


@pytest.mark.parametrize("auth", ["none", "dmarc"])
async def test_an_encoded_word_inside_quotes_in_the_from_name_is_accepted(
    make_gateway: Any, sandbox: Any, auth: str
) -> None:
    """`"=?ISO-8859-1?Q?Fran=E7ois_Boulogne?=" <boulogne.f@gmail.com>` (a display-name defect to the
    email package) is a usable From: accepted, the address authenticated, the name decoded."""
    env = {"MAILGATE_ALLOWED_SENDERS": "@gmail.com"} | (DMARC if auth == "dmarc" else {})
    headers = [("Authentication-Results", f"{AUTHSERV}; dmarc=pass header.from=gmail.com")] * (
        auth == "dmarc"
    )
    headers += plain_headers(From='"=?ISO-8859-1?Q?Fran=E7ois_Boulogne?=" <boulogne.f@gmail.com>')
    async with make_gateway(**env) as gw:
        seen = await smtp_send(
            gw.smtp_port, raw_mail(headers), mail_from="boulogne.f@gmail.com", rcpts=[WORKER]
        )
        row = await row_of(gw, seen)
        await until(lambda: len(sandbox.state.requests) == 1, timeout=15, what="the turn")
    assert (row.sender, row.sender_name) == ("boulogne.f@gmail.com", "François Boulogne")
    assert '\nFrom: "François Boulogne" <boulogne.f@gmail.com>\n' in sandbox.state.requests[0].input


async def send_utf8(port: int, data: bytes, mail_from: str, rcpt: str) -> tuple[set[str], tuple[int, str]]:
    """One SMTPUTF8 transaction: the EHLO keywords and the reply to DATA."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30, start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        keywords = set(client.esmtp_extensions)
        await client.mail(mail_from, options=["SMTPUTF8", "BODY=8BITMIME"], encoding="utf-8")
        await client.rcpt(rcpt, encoding="utf-8")
        try:
            reply = await client.data(data)
            return keywords, (reply.code, reply.message)
        except aiosmtplib.SMTPResponseException as exc:
            return keywords, (exc.code, exc.message)
    finally:
        await client.quit()


async def test_an_rfc6532_utf8_address_is_accepted_and_answered(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """`jdöe@mächine.example` in MAIL FROM and From (SMTPUTF8 advertised): accepted, allowed by
    `@mächine.example`, and the answer goes back to that address."""
    raw = raw_mail(plain_headers(From="Jöhn Döe <jdöe@mächine.example>", Subject="Grüße"))
    async with make_gateway(MAILGATE_ALLOWED_SENDERS="@mächine.example") as gw:
        keywords, reply = await send_utf8(gw.smtp_port, raw, "jdöe@mächine.example", WORKER)
        assert "smtputf8" in keywords
        assert reply[0] == 250, reply
        row = await gw.store.inbound(reply[1].rsplit(" ", 1)[1])
        [(_, rcpts, _)] = await relay.wait_for(1, timeout=15)
    assert row is not None and (row.sender, row.sender_name, row.subject) == (
        "jdöe@mächine.example",
        "Jöhn Döe",
        "Grüße",
    )
    assert rcpts == ["jdöe@mächine.example"]


@pytest.mark.parametrize(
    ("from_", "reason"),
    [
        ("Ann <ann@>", "no usable From address"),
        ("a@evil.example <alice@example.org>", "no usable From address"),
        ("Alice <alice@example.org>, Bob <bob@example.org>", "several From addresses"),
    ],
)
async def test_a_from_without_one_clear_address_is_refused_with_the_reason(
    make_gateway: Any, from_: str, reason: str
) -> None:
    """No domain, an address in the name beside the real one, or two addresses: 550 5.7.1 naming why."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, raw_mail(plain_headers(From=from_)), rcpts=[WORKER])
    assert seen.data == (550, f"5.7.1 Sender not authenticated: {reason}")


# --- 8. our MTA's Authentication-Results, all of them --------------------------------------------------


@pytest.mark.parametrize(
    ("above", "below", "accepted"),
    [
        pytest.param(
            [
                f"{AUTHSERV}; dmarc=none (p=none dis=none) header.from=example.org",
                f"{AUTHSERV}; dkim=pass (2048-bit key) header.d=example.org header.s=s1",
            ],
            [],
            True,
            id="opendmarc-none-above-opendkim-pass",
        ),
        pytest.param(
            [
                f"{AUTHSERV}; dmarc=none header.from=example.org",
                f"{AUTHSERV}; spf=pass smtp.mailfrom=example.org",
            ],
            [],
            True,
            id="opendmarc-none-above-spf-pass",
        ),
        pytest.param(
            [f"{AUTHSERV}; dmarc=none header.from=example.org"],
            [f"{AUTHSERV}; dkim=pass header.d=example.org"],
            False,
            id="a-pass-below-our-received-came-from-elsewhere",
        ),
        pytest.param(
            [f"{AUTHSERV}; dmarc=pass header.from=other.example"],
            [],
            False,
            id="dmarc-pass-for-another-domain",
        ),
        pytest.param([f"{AUTHSERV}; dmarc=pass"], [], False, id="dmarc-pass-naming-no-domain"),
        pytest.param(
            [
                f"{AUTHSERV}; dkim=pass header.d=example.org",
                f"{AUTHSERV}; dmarc=fail header.from=example.org",
            ],
            [],
            False,
            id="a-failing-dmarc-verdict-wins",
        ),
    ],
)
async def test_every_result_of_our_mta_counts_and_nothing_else(
    make_gateway: Any, above: list[str], below: list[str], accepted: bool
) -> None:
    """OpenDMARC's and OpenDKIM's headers above our Received are read together (the known refusal of
    `dmarc=none` over `dkim=pass` is gone); below it they count for nothing; a `dmarc=pass` counts only
    when its `header.from` is the From's domain."""
    headers = [("Authentication-Results", v) for v in above] + [("Received", f"{RECEIVED}; now")]
    headers += [("Authentication-Results", v) for v in below] + plain_headers()
    async with make_gateway(**DMARC) as gw:
        seen = await smtp_send(gw.smtp_port, raw_mail(headers), rcpts=[WORKER])
    assert seen.data is not None
    if accepted:
        assert seen.data[0] == 250
    else:
        assert seen.data == (550, "5.7.1 Sender not authenticated: DMARC did not pass for example.org")


# --- 3. hostile headers: bounded work, off the loop ---------------------------------------------------


@dataclass
class ParserLog:
    """What the email package's header parsers were handed while admission read a message (an edge we
    do not own: recorded, not faked; later stages, which compose replies with it, are left out)."""

    loop_thread: int
    lengths: list[int] = field(default_factory=list)
    on_loop: int = 0

    def wrap(self, parse: Callable[[str], Any]) -> Callable[[str], Any]:
        def recorded(value: str) -> Any:
            if _called_from("mailgate.admission.admit"):
                self.lengths.append(len(value))
                self.on_loop += threading.get_ident() == self.loop_thread
            return parse(value)

        return recorded


def _called_from(module: str) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == module:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@pytest.fixture
def parser_log(monkeypatch: pytest.MonkeyPatch) -> ParserLog:
    log = ParserLog(threading.get_ident())
    monkeypatch.setattr(header_parser, "get_address_list", log.wrap(header_parser.get_address_list))
    unstructured = email.headerregistry.UnstructuredHeader
    monkeypatch.setattr(unstructured, "value_parser", staticmethod(log.wrap(header_parser.get_unstructured)))
    return log


def folded(items: list[str], sep: str = "") -> str:
    return f"{sep}\r\n ".join(items)


def hostile_subject() -> str:
    """A 240 KB Subject of tiny encoded words (the email package decodes them in quadratic time)."""
    return folded(["=?UTF-8?Q?a?= =?UTF-8?B?w6k=?="] * 8000)


def hostile_from() -> str:
    """A 240 KB From of quoted names."""
    return folded([f'"Name, number {i} (x)" <user{i}@example.org>' for i in range(5300)], ",")


def many_addresses() -> str:
    """3,000 mailboxes whose names are encoded words (each one for the email package to read)."""
    return folded([f"=?UTF-8?Q?P=C3=A9rson_{i}?= <p{i}@example.org>" for i in range(3000)], ",")


@pytest.mark.parametrize(
    ("what", "headers", "reply"),
    [
        ("subject", {"Subject": hostile_subject()}, 250),
        ("from", {"From": hostile_from()}, 550),
        ("to-cc", {"To": many_addresses(), "Cc": many_addresses()}, 250),
    ],
)
async def test_a_hostile_header_costs_a_bounded_amount_of_work_off_the_loop(
    make_gateway: Any, parser_log: ParserLog, what: str, headers: dict[str, str], reply: int
) -> None:
    """A 240 KB Subject of encoded words, a 240 KB From of quoted names, 6,000 To/Cc addresses: each
    gets a clear answer, the email package never sees more than one mailbox or MAX_TEXT characters at a
    time (and at most MAX_ADDRESSES mailboxes per field), and none of it runs on the event loop."""
    raw = raw_mail(plain_headers(**headers))
    assert len(header_block(raw)) > 200_000
    async with make_gateway(MAILGATE_MAX_HEADER_SIZE="600000") as gw:
        seen = await smtp_send(gw.smtp_port, raw, rcpts=[WORKER])
        assert seen.data is not None and seen.data[0] == reply, seen.data
        if reply == 250:
            row = await row_of(gw, seen)
            assert len(row.subject) <= 500 and len(row.to_cc_addrs) <= 100
        else:
            assert seen.data[1] == "5.7.1 Sender not authenticated: no usable From address"
    assert max(parser_log.lengths, default=0) <= MAX_TEXT
    assert what == "from" or parser_log.lengths  # the email package had work: read it bounded
    assert len(parser_log.lengths) <= 3 * MAX_ADDRESSES + 10
    assert sum(parser_log.lengths) <= 3 * 16384 + 4 * MAX_TEXT
    assert parser_log.on_loop == 0


async def test_the_default_header_limit_is_postfixs(make_gateway: Any) -> None:
    """A header block over 102400 bytes (Postfix's header_size_limit) is refused: 552 5.3.4."""
    async with make_gateway() as gw:
        seen = await smtp_send(
            gw.smtp_port, raw_mail(plain_headers(Subject=hostile_subject())), rcpts=[WORKER]
        )
        fits = await smtp_send(
            gw.smtp_port, raw_mail(plain_headers(Subject=folded(["word"] * 12000))), rcpts=[WORKER]
        )
    assert seen.data == (552, "5.3.4 Message header too large")
    assert fits.accepted


# --- 9. duplicates: recipient, sender and Message-ID --------------------------------------------------


@both_stores
async def test_a_different_sender_reusing_a_message_id_is_a_new_message(make_gateway: Any) -> None:
    """Bob's mail with Alice's Message-ID is queued as a new message; Alice's retry is a duplicate."""
    async with make_gateway() as gw:
        first = await smtp_send(gw.smtp_port, make_mail(message_id="<same@example.org>"))
        other = await smtp_send(
            gw.smtp_port,
            make_mail(sender="bob@example.org", message_id="<same@example.org>"),
            mail_from="bob@example.org",
        )
        again = await smtp_send(gw.smtp_port, make_mail(message_id="<same@example.org>"))
        rows = await gw.store.list_inbound()
    assert queue_id(other) != queue_id(first)
    assert other.data is not None and "already" not in other.data[1]
    assert again.data == (250, f"2.0.0 Ok: already queued as {queue_id(first)}")
    assert sorted(r.sender or "" for r in rows) == ["alice@example.org", "bob@example.org"]


def store_at_version_5(path: Path, message: EmailMessage) -> str:
    """An SQLite store as mailgate left it before senders counted: schema version 5, one answered
    message from alice under the old duplicate key (recipient and Message-ID)."""
    with sqlite3.connect(path) as db:
        for step in MIGRATIONS[:5]:
            db.executescript(step)
        db.execute("PRAGMA user_version=5")
        data = message.as_bytes()
        db.execute(
            "INSERT INTO raw_message VALUES ('raw-old', ?, ?, ?)",
            (hashlib.sha256(data).hexdigest(), len(data), data),
        )
        key = hashlib.sha256(f"{WORKER}\n{message['Message-ID']}".encode()).hexdigest()
        db.execute(
            "INSERT INTO inbound (id, raw_id, received_at, updated_at, mail_from, rcpt, alias, sender, "
            "message_id, subject, dedupe_key, state) VALUES ('01OLDMESSAGE', 'raw-old', ?, ?, ?, ?, "
            "'research', ?, ?, 'Old', ?, 'answered')",
            (
                time.time(),
                time.time(),
                "alice@example.org",
                WORKER,
                "alice@example.org",
                message["Message-ID"],
                key,
            ),
        )
    db.close()
    return "01OLDMESSAGE"


async def test_a_retry_of_a_message_recorded_before_the_migration_is_still_a_duplicate(
    make_gateway: Any, tmp_path: Path
) -> None:
    """On a store migrated from version 5, Alice's retry of her old message is `already queued` as the
    old row; Bob with the same Message-ID is a new message."""
    mail = make_mail(message_id="<before@example.org>")
    old = store_at_version_5(tmp_path / "old.db", mail)
    async with make_gateway(MAILGATE_DATABASE=str(tmp_path / "old.db")) as gw:
        again = await smtp_send(gw.smtp_port, mail)
        bob = await smtp_send(
            gw.smtp_port,
            make_mail(sender="bob@example.org", message_id="<before@example.org>"),
            mail_from="bob@example.org",
        )
    assert again.data == (250, f"2.0.0 Ok: already queued as {old}")
    assert bob.accepted and "already" not in (bob.data or (0, ""))[1]


# --- 6. what is kept of ignored mail, and for how long ------------------------------------------------


async def run_cli(env: Path, *argv: str, capsys: Any) -> tuple[int, str, str]:
    """`mailgate ARGV --env-file ENV`, in a worker thread (it runs its own event loop)."""
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, [*argv, "--env-file", str(env)])
    out, err = capsys.readouterr()
    return code, out, err


async def test_ignored_mail_keeps_its_header_and_the_start_of_its_body(
    make_gateway: Any, tmp_path: Path, sandbox: Any, capsys: Any
) -> None:
    """A 2 MB auto-reply is accepted and ignored; only its header block and 64 KiB of its body are
    stored, `show` still prints its header, and `replay` says why it cannot run it."""
    mail = make_mail(
        headers={"Auto-Submitted": "auto-replied"},
        attachments=[("big.bin", "application/octet-stream", b"\x01" * 1_500_000)],
    )
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, mail)
        row = await row_of(gw, seen)
        head = await gw.store.raw_head(row.raw_id, 4 * 1024 * 1024)
        with pytest.raises(RawMissing):
            await gw.store.raw(row.raw_id)
    assert row.state == InboundState.IGNORED and (row.reason or "").startswith("auto-reply: ")
    sent = mail.as_bytes().replace(b"\n", b"\r\n")
    assert len(sent) > 2_000_000
    assert len(head) == len(header_block(head)) + 64 * 1024
    assert sent.startswith(head)
    env = write_env(tmp_path / "op.env", env_for(tmp_path, sandbox.url, None, MAILGATE_LOG_LEVEL="ERROR"))
    code, out, _ = await run_cli(env, "show", row.id, capsys=capsys)
    assert code == 0 and "Auto-Submitted: auto-replied" in out
    code, _, err = await run_cli(env, "replay", row.id, capsys=capsys)
    assert code == 1 and "not all there" in err


async def test_prune_verb_cuts_finished_messages_to_their_header_and_says_so(
    make_gateway: Any, tmp_path: Path, sandbox: Any, capsys: Any
) -> None:
    """`mailgate prune` cuts an answered message's raw bytes to its header block once it is older than
    the retention (here `--days`), prints what it did (`--json` too), and a second run finds nothing."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="x" * 100_000))
        row = await row_of(gw, seen)

        async def answered() -> bool:
            found = await gw.store.inbound(row.id)
            return found is not None and found.state == InboundState.ANSWERED

        await until(answered, timeout=15, what="the answer")
    done = (await gw_row_updated(tmp_path, row.id)) + 0.5
    await until(lambda: time.time() > done, timeout=5, what="the message to age")
    env = write_env(tmp_path / "op.env", env_for(tmp_path, sandbox.url, None, MAILGATE_LOG_LEVEL="ERROR"))
    code, out, _ = await run_cli(env, "prune", "--days", "0.000001", capsys=capsys)
    assert code == 0 and out.startswith("pruned 1 raw message(s), ") and "KiB freed" in out
    code, out, _ = await run_cli(env, "prune", "--days", "0.000001", "--json", capsys=capsys)
    assert code == 0 and json.loads(out) | {"before": None} == {
        "messages": 0,
        "bytes": 0,
        "retention_days": 0.000001,
        "before": None,
    }
    code, out, _ = await run_cli(env, "show", row.id, capsys=capsys)
    assert code == 0 and "Subject: Quarterly numbers" in out
    off = write_env(tmp_path / "off.env", env_for(tmp_path, sandbox.url, None, MAILGATE_RETENTION_DAYS="0"))
    code, out, _ = await run_cli(off, "prune", capsys=capsys)
    assert code == 0 and out.startswith("retention is off")
    code, _, err = await run_cli(env, "prune", "--days", "-1", capsys=capsys)
    assert code == 2 and "positive number of days" in err


async def gw_row_updated(tmp_path: Path, inbound_id: str) -> float:
    with sqlite3.connect(tmp_path / "mailgate.db") as db:
        (updated,) = db.execute("SELECT updated_at FROM inbound WHERE id=?", (inbound_id,)).fetchone()
    db.close()
    return float(updated)


@both_stores
async def test_serve_prunes_what_finished_longer_ago_than_the_retention(
    tmp_path: Path, sandbox: Any, relay: Any, database: str
) -> None:
    """A running gateway prunes by itself: an answered message's raw bytes go once it is older than
    MAILGATE_RETENTION_DAYS (two seconds here), its header block stays."""
    settings = settings_for(
        tmp_path, sandbox.url, relay.port, MAILGATE_RETENTION_DAYS="0.00002", MAILGATE_DATABASE=database
    )
    gateway = Gateway(
        settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2, prune_after=0, prune_every=0.1
    )
    async with gateway as gw:
        seen = await smtp_send(gw.smtp_port, make_mail())
        row = await row_of(gw, seen)

        async def pruned() -> bool:
            try:
                await gw.store.raw(row.raw_id)
            except RawMissing:
                return True
            return False

        await until(pruned, timeout=20, what="the raw message pruned")
        head = await gw.store.raw_head(row.raw_id)
        final = await gw.store.inbound(row.id)
    assert final is not None and final.state == InboundState.ANSWERED
    assert head == header_block(head) and b"Subject: Quarterly numbers" in head


# --- 10. file names and log fields -------------------------------------------------------------------


async def raw_session(port: int, *commands: str) -> list[str]:
    """Commands written as they are (UTF-8, control characters and all), the last line of each reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies: list[str] = []
    try:
        for command in ("", *commands):
            if command:
                writer.write(command.encode() + b"\r\n")
            while (line := (await reader.readline()).decode()) and line[3:4] == "-":
                pass
            replies.append(line.rstrip("\r\n"))
    finally:
        writer.close()
    return replies[1:]


async def test_bidi_controls_never_reach_the_api_in_a_file_name(make_gateway: Any, sandbox: Any) -> None:
    """`invoice\\u202efdp.exe` (shown as "invoiceexe.pdf") reaches the API as `invoicefdp.exe`."""
    mail = make_mail(
        attachments=[
            ("invoice\u202efdp.exe", "application/octet-stream", b"MZ"),
            ("\u2066a\u2069.txt", "text/plain", b"a"),
        ]
    )
    async with make_gateway() as gw:
        assert (await smtp_send(gw.smtp_port, mail)).accepted
        await until(lambda: len(sandbox.state.requests) == 1, timeout=15, what="the turn")
    names = sorted(f.filename for f in sandbox.state.requests[0].files)
    assert names == ["a.txt", "invoicefdp.exe"]


async def test_log_fields_escape_controls_and_bidi_from_the_peer(make_gateway: Any) -> None:
    """What a peer writes into a logged field (a recipient with U+202E, a From with an escape byte)
    stays on one line, every invisible character escaped."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("mailgate")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        async with make_gateway() as gw:
            replies = await raw_session(
                gw.smtp_port,
                "EHLO he\x1bllo\u202e.example",
                "MAIL FROM:<alice@example.org> SMTPUTF8",
                "RCPT TO:<x\u2066y@elsewhere.example>",
                "QUIT",
            )
            assert replies[-2].startswith("550 5.7.1 Relaying denied")
    finally:
        logger.removeHandler(handler)
        logger.level = level
    lines = [line for line in stream.getvalue().splitlines() if "smtp_reject" in line]
    assert lines, stream.getvalue()
    assert all(
        "\u202e" not in line and "\u2066" not in line and "\x1b" not in line
        for line in stream.getvalue().splitlines()
    )
    assert any("\\u2066" in line and "\\x1b" in line and "\\u202e" in line for line in lines)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("a\r\nb", '"a\\r\\nb"'),
        ("nul\x00esc\x1b[31m", '"nul\\x00esc\\x1b[31m"'),
        ("del\x7fc1\x85", '"del\\x7fc1\\x85"'),
        ("invoice\u202efdp.exe", '"invoice\\u202efdp.exe"'),
        (
            "\u2066iso\u2069 \u200emark\u200f zw\u200b bom\ufeff",
            '"\\u2066iso\\u2069 \\u200emark\\u200f zw\\u200b bom\\ufeff"',
        ),
        ("plain-ünïcode", "plain-ünïcode"),
    ],
)
def test_every_control_and_invisible_character_is_escaped_in_a_log_field(value: str, written: str) -> None:
    """CR, LF, C0 and C1 controls, bidi controls and zero-width characters are written escaped; other
    text as it is."""
    record = logging.LogRecord("mailgate.smtp", logging.INFO, __file__, 1, "smtp_reject", (), None)
    record.rcpt = value
    assert LogfmtFormatter().format(record).endswith(f" rcpt={written}")
