"""The SMTP listener as real clients and hostile senders meet it, over real sockets (issue 11).

Bare LF line ends (smtplib's `sendmail(msg.as_bytes())`), SMTP smuggling, deep MIME nesting, a bare CR
in the header block, DATA spooled to disk past 1 MiB, the disk floor, the junk-command and hard-error
limits, the per-client connection cap, slow senders, aiosmtpd's own log lines, and every message of
the shared corpus sent as its file holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest

from mailgate.mail.scan import MimeScan
from mailgate.sandbox import RunningSandbox
from mailgate.smtp.data import DotReader, Normalizer
from tests.conftest import CORPUS, DOMAIN, env_for, needs_corpus
from tests.daemon import Serve, write_env
from tests.mail import make_mail, until

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
WORKER = f"research@{DOMAIN}"
HEAD = b"From: alice@example.org\r\nTo: research@agents.example.com\r\nSubject: hi\r\n"


class Raw:
    """A bare SMTP client on asyncio streams: send bytes as they are, read replies as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, *, source: str | None = None) -> Raw:
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        return cls(reader, writer)

    async def reply(self) -> str:
        """One reply (all its lines), as text; "" when the server closed the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            if not line:
                return "".join(lines)
            lines.append(line.decode())
            if line[3:4] != b"-":
                return "".join(lines)

    async def say(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def to_data(self, rcpt: str = WORKER, eol: bytes = b"\r\n") -> None:
        """Greeting, EHLO, MAIL, RCPT, DATA (each line ended by `eol`); fails unless DATA got 354."""
        assert (await self.reply()).startswith("220")
        assert (await self.say(b"EHLO client.example.org" + eol)).startswith("250")
        assert (await self.say(b"MAIL FROM:<alice@example.org>" + eol)).startswith("250")
        assert (await self.say(f"RCPT TO:<{rcpt}>".encode() + eol)).startswith("250")
        assert (await self.say(b"DATA" + eol)).startswith("354")

    async def rest(self) -> str:
        """Everything the server says until it closes the connection."""
        return (await asyncio.wait_for(self.reader.read(), 30)).decode()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def stored(gw: Any, reply: str) -> bytes:
    """The raw message the store keeps for the queue id a 250 names."""
    queue_id = re.search(r"queued as (\S+)", reply)
    assert queue_id is not None, reply
    row = await gw.store.inbound(queue_id.group(1))
    assert row is not None
    data: bytes = await gw.store.raw(row.raw_id)
    return data


def nested(depth: int) -> bytes:
    """A message whose MIME parts nest `depth` multiparts deep."""
    out = [HEAD + b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n']
    for n in range(1, depth):
        out.append(f"--b{n - 1}\r\nContent-Type: multipart/mixed; boundary=b{n}\r\n\r\n".encode())
    out.append(f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ndeep\r\n".encode())
    out += [f"--b{n}--\r\n".encode() for n in reversed(range(depth))]
    return b"".join(out)


def rss() -> int:
    """This process's resident set size in bytes (the gateway runs in it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS (not Linux?)")


# --- 1. bare LF, and only <CR><LF>.<CR><LF> ends DATA ---------------------------------------------------


async def test_a_bare_lf_client_sends_a_1_mb_message_with_attachments(
    make_gateway: Any, sandbox: RunningSandbox
) -> None:
    """smtplib's sendmail(msg.as_bytes()) (LF line ends) gets 250 for 1 MB; the files reach the API."""
    files = [(f"part{n}.bin", os.urandom(330_000)) for n in range(3)]
    msg = make_mail(attachments=[(name, "application/octet-stream", data) for name, data in files])
    raw = msg.as_bytes()
    assert b"\r\n" not in raw and len(raw) > MiB
    async with make_gateway() as gw:

        def send() -> dict[str, Any]:
            with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=30) as client:
                return client.sendmail("alice@example.org", [WORKER], raw)

        assert await asyncio.to_thread(send) == {}
        await until(lambda: bool(sandbox.state.requests), timeout=30, what="the turn at the API")
    [request] = sandbox.state.requests
    assert [(f.filename, f.sha256) for f in request.files] == [
        (name, hashlib.sha256(data).hexdigest()) for name, data in files
    ]


async def test_commands_and_data_with_bare_lf_are_stored_with_crlf(make_gateway: Any) -> None:
    """A session in bare LF throughout (commands too) is accepted; the stored message has only CRLF."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data(eol=b"\n")
        body = HEAD.replace(b"\r\n", b"\n") + b"\nline one\n..dotted\nlast\r\n.\r\n"
        reply = await client.say(body)
        assert reply.startswith("250"), reply
        assert (await client.say(b"QUIT\n")).startswith("221")
        await client.close()
        raw = await stored(gw, reply)
    assert raw.endswith(b"\r\n\r\nline one\r\n.dotted\r\nlast\r\n")
    assert raw.count(b"\n") == raw.count(b"\r\n")


async def test_the_size_limit_counts_bare_lf_as_the_crlf_it_is_stored_as(make_gateway: Any) -> None:
    """600 KB of bare LF under a 1 MB MAILGATE_MAX_MESSAGE_SIZE is 1.2 MB stored: 552; 400 KB goes through."""
    async with make_gateway(MAILGATE_MAX_MESSAGE_SIZE=str(10**6)) as gw:
        replies = []
        for lines in (600_000, 400_000):
            client = await Raw.open(gw.smtp_port)
            await client.to_data()
            replies.append(await client.say(HEAD + b"\n" * lines + b"\r\n.\r\n"))
            await client.close()
    assert replies[0].startswith("552 5.3.4"), replies[0]
    assert replies[1].startswith("250"), replies[1]


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"], ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf"]
)
async def test_a_fake_end_of_data_does_not_end_data(make_gateway: Any, fake_end: bytes) -> None:
    """SMTP smuggling: a fake end of DATA followed by a second transaction is content of the first."""
    smuggled = (
        b"MAIL FROM:<eve@example.org>\r\nRCPT TO:<research@agents.example.com>\r\nDATA\r\n"
        b"From: eve@example.org\r\nSubject: smuggled\r\n\r\nI am not alice\r\n"
    )
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        reply = await client.say(HEAD + b"\r\nhello" + fake_end + smuggled + b".\r\n")
        assert reply.startswith("250"), reply
        assert (await client.say(b"QUIT\r\n")).startswith("221")  # the next reply: no smuggled replies
        await client.close()
        raw = await stored(gw, reply)
    assert b"MAIL FROM:<eve@example.org>\r\n" in raw and raw.endswith(b"I am not alice\r\n")


async def test_a_message_ending_at_once_and_pipelined_commands_after_the_end() -> None:
    """An empty DATA ends at its first line; bytes after the end stay for the next command."""
    reader = asyncio.StreamReader(limit=64)
    reader.feed_data(b".\r\nQUIT\r\n")
    dots = DotReader(reader)
    assert await dots.block() is None
    assert await reader.readline() == b"QUIT\r\n"

    reader = asyncio.StreamReader(limit=64)  # blocks smaller than the message: the end straddles them
    body = b"x" * 200 + b"\n.\r\n" + b"y" * 150 + b"\r\n.\r\nNOOP\r\n"
    reader.feed_data(body)
    dots, normalizer, out = DotReader(reader), Normalizer(), b""
    while (block := await dots.block()) is not None:
        out += normalizer.feed(block)
    assert out == b"x" * 200 + b"\r\n\r\n" + b"y" * 150 + b"\r\n"
    assert await reader.readline() == b"NOOP\r\n"


def reference(stream: bytes) -> tuple[bytes, bytes]:
    """What DATA holds and what follows it, read line by line as Postfix's normalize mode reads it."""
    lines = stream.split(b"\n")
    out, after_crlf = [], True
    for n, line in enumerate(lines[:-1]):
        crlf = line.endswith(b"\r")
        text = line[:-1] if crlf else line
        if text == b"." and crlf and after_crlf:
            return b"".join(out), b"\n".join(lines[n + 1 :])
        out.append((text[1:] if text.startswith(b".") else text) + b"\r\n")
        after_crlf = crlf
    raise AssertionError("no end of DATA")


@pytest.mark.parametrize("limit", [4, 5, 8, 13, 64])
async def test_the_block_reader_reads_as_a_line_reader_would(limit: int) -> None:
    """DotReader + Normalizer, with blocks cut anywhere (a small StreamReader limit), give what a
    line-by-line reader gives: bare LF to CRLF, dots unstuffed, only CRLF.CRLF ending DATA."""
    streams = [
        b".\r\nQUIT\r\n",
        b"a\r\n.\r\n",
        b"\r\n\r\n.\r\nNOOP\r\n",
        b"x\n.\r\n.\r\n",
        b"..a\n..\n.\n\r\n.b\r\r\n\r.\r\n.\r\nRSET\r\n",
        b"line\n.\nMAIL FROM:<e@x>\r\n\r\n.\n" + b"y" * 40 + b"\r\n..\r\n.\r\n",
        b"\n.\r\n\r\n.\r\n",
        b"a\r" + b"\n." * 20 + b"\r\n.\r\n",
    ]
    for stream in streams:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(stream)
        reader.feed_eof()
        dots, normalizer, out = DotReader(reader), Normalizer(), b""
        while (block := await dots.block()) is not None:
            out += normalizer.feed(block)
        assert (out, await reader.read()) == reference(stream), stream


# --- 4 and 8. MIME nesting and bare CR, refused at DATA -----------------------------------------------


async def test_mime_nested_1000_deep_is_refused_554(make_gateway: Any, sandbox: RunningSandbox) -> None:
    """1,000 nested multiparts get 554 5.6.0 at DATA (nothing stored); 50 levels are accepted."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        reply = await client.say(nested(1000) + b".\r\n")
        assert reply.startswith("554 5.6.0") and "nesting" in reply, reply
        assert (await client.say(b"RSET\r\n")).startswith("250")  # the session goes on
        await client.close()
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        assert (await client.say(nested(50) + b".\r\n")).startswith("250")
        await client.close()


def test_the_nesting_scan_counts_levels_as_the_parser_sees_them() -> None:
    """MimeScan's depth: 100 levels pass, 101 do not, fed a few bytes at a time."""
    for depth, too_deep in ((100, False), (101, True)):
        scan, raw = MimeScan(), nested(depth)
        for start in range(0, len(raw), 7):
            scan.feed(raw[start : start + 7])
        scan.close()
        assert (scan.depth, scan.too_deep) == (depth, too_deep)


def many_parts(n: int) -> bytes:
    """A message whose multipart/mixed holds `n` one-line text parts (n + 1 header sections in all)."""
    head = HEAD + b"Message-ID: <parts-%d@example.org>\r\nMIME-Version: 1.0\r\n" % n
    head += b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(n))
    return head + body + b"--b--\r\n"


async def test_more_than_1000_mime_parts_are_refused_554(make_gateway: Any, sandbox: RunningSandbox) -> None:
    """1,001 MIME parts (each an object in the turn stage's parse tree) get 554 5.6.0 at DATA with
    nothing stored; 999 are accepted."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        reply = await client.say(many_parts(1000) + b".\r\n")  # 1,000 parts + the message: 1,001
        assert reply.startswith("554 5.6.0") and "MIME parts" in reply, reply
        await client.close()
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        assert (await client.say(many_parts(999) + b".\r\n")).startswith("250")
        await client.close()
        assert len(await gw.store.list_inbound(limit=10)) == 1


def test_the_scan_counts_every_header_section_as_a_part() -> None:
    """MimeScan's parts: the message's own header and each part's, fed a few bytes at a time."""
    for n, too_many in ((999, False), (1000, True)):
        scan, raw = MimeScan(), many_parts(n)
        for start in range(0, len(raw), 7):
            scan.feed(raw[start : start + 7])
        scan.close()
        assert (scan.parts, scan.too_many_parts) == (n + 1, too_many)


@needs_corpus
def test_the_scan_gives_the_same_answer_whatever_the_blocks() -> None:
    """MimeScan's depth and bare-CR verdict over each corpus message are the same fed whole or in
    blocks of 3, 7, 64 or 1000 bytes (boundaries and header ends cut anywhere)."""

    def scan(raw: bytes, size: int) -> tuple[int, bool]:
        scanner = MimeScan()
        for start in range(0, len(raw), size):
            scanner.feed(raw[start : start + size])
        scanner.close()
        return scanner.depth, scanner.bare_cr

    checked = 0
    for path in _corpus_messages():
        raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if len(raw) > 60_000:
            continue
        whole = scan(raw, len(raw) + 1)
        assert [scan(raw, size) for size in (3, 7, 64, 1000)] == [whole] * 4, path.name
        checked += 1
    assert checked > 250


async def test_a_bare_cr_in_the_header_block_is_refused(make_gateway: Any) -> None:
    """`X-A: b\\rFrom: ...` gets 554 5.6.0; a bare CR in the body is content and accepted."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        trick = b"X-A: b\rFrom: mallory@example.org\r\n" + HEAD + b"\r\nhello\r\n.\r\n"
        reply = await client.say(trick)
        assert reply.startswith("554 5.6.0") and "bare CR" in reply, reply
        await client.close()
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        reply = await client.say(HEAD + b"\r\nbody with a\rbare CR\r\n.\r\n")
        assert reply.startswith("250"), reply
        await client.close()
        assert (await stored(gw, reply)).endswith(b"body with a\rbare CR\r\n")


# --- 5. DATA spooled to disk --------------------------------------------------------------------------


async def test_eight_unfinished_big_sessions_cost_little_memory(make_gateway: Any, tmp_path: Path) -> None:
    """8 sessions each 12 MB into DATA: spooled under spool/incoming, RSS grows by far less than the
    96 MB they sent; when they hang up, their spool files are gone."""
    size = 12 * MiB
    chunk = (b"QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB\r\n") * 800
    incoming = tmp_path / "spool" / "incoming"

    def spooled() -> int:
        return sum(p.stat().st_size for p in incoming.iterdir()) if incoming.is_dir() else 0

    async with make_gateway() as gw:
        clients = [await Raw.open(gw.smtp_port) for _ in range(8)]
        for client in clients:
            await client.to_data()
        before = rss()

        async def stream(client: Raw) -> None:
            client.writer.write(HEAD + b"\r\n")
            for _ in range(size // len(chunk)):
                client.writer.write(chunk)
                await client.writer.drain()

        await asyncio.gather(*(stream(c) for c in clients))
        await until(lambda: spooled() >= 8 * (size - 2 * MiB), timeout=60, what="the data in the spool")
        growth = rss() - before
        assert len(list(incoming.iterdir())) == 8
        assert growth < 8 * size // 3, f"RSS grew {growth / MiB:.0f} MiB for {8 * size / MiB:.0f} MiB sent"
        for client in clients:
            await client.close()
        await until(lambda: not any(incoming.iterdir()), timeout=30, what="the spool files removed")


async def test_a_spool_file_left_by_a_killed_run_is_removed_at_start(
    make_gateway: Any, tmp_path: Path
) -> None:
    """A `data-*` file in spool/incoming (a kill -9 inside DATA) is gone once the gateway started."""
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "data-abandoned.eml").write_bytes(b"half a message")
    async with make_gateway():
        assert list(incoming.iterdir()) == []


async def test_a_spool_write_failing_mid_data_gets_452_and_frees_everything(
    make_gateway: Any, tmp_path: Path
) -> None:
    """The spool file cannot be made (disk full): 452 4.3.1 after the drain and the session goes on; a
    client hanging up mid-DATA leaves no spool file and frees its slot (1 per client here)."""
    incoming = tmp_path / "spool" / "incoming"
    big = HEAD + b"\r\n" + (b"a" * 998 + b"\r\n") * 3000  # 3 MB: past the 1 MiB spool threshold
    async with make_gateway(MAILGATE_MAX_CONNECTIONS_PER_CLIENT="1") as gw:
        incoming.parent.mkdir(parents=True, exist_ok=True)
        incoming.write_bytes(b"a file where the folder should be")
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        client.writer.write(big)
        assert (await client.say(b".\r\n")).startswith("452 4.3.1")
        assert (await client.say(b"MAIL FROM:<alice@example.org>\r\n")).startswith("250")
        await client.close()
        incoming.unlink()
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        client.writer.write(big)
        await client.writer.drain()
        await until(lambda: incoming.is_dir() and any(incoming.iterdir()), timeout=30, what="a spool file")
        await client.close()
        await until(lambda: not any(incoming.iterdir()), timeout=30, what="the spool file removed")
        again = await Raw.open(gw.smtp_port)
        assert (await again.reply()).startswith("220")
        await again.close()


# --- 6. the disk floor --------------------------------------------------------------------------------


async def test_mail_is_refused_452_below_the_free_space_floor(make_gateway: Any) -> None:
    """MAIL FROM gets 452 4.3.1 while free space is under MAILGATE_MIN_FREE_SPACE; 0 turns it off."""
    for floor, expected in ((str(2**62), "452 4.3.1 Insufficient system storage"), ("0", "250")):
        async with make_gateway(MAILGATE_MIN_FREE_SPACE=floor) as gw:
            client = await Raw.open(gw.smtp_port)
            assert (await client.reply()).startswith("220")
            assert (await client.say(b"EHLO client.example.org\r\n")).startswith("250")
            assert (await client.say(b"MAIL FROM:<alice@example.org>\r\n")).startswith(expected)
            await client.close()


# --- 7. abuse limits ----------------------------------------------------------------------------------


async def test_the_101st_junk_command_gets_421_and_the_session_ends(make_gateway: Any) -> None:
    """100 NOOP/RSET/VRFY/HELP are answered; the next gets 421 4.7.0 and the connection closes."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        assert (await client.reply()).startswith("220")
        junk = [b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY <alice@example.org>\r\n"] * 25
        client.writer.write(b"".join(junk) + b"NOOP\r\nNOOP\r\n")
        rest = await client.rest()
        await client.close()
    replies = [line for line in rest.splitlines() if line[3:4] == " "]
    assert len(replies) == 101, replies[-3:]
    assert replies[-1] == "421 4.7.0 Too many junk commands, closing connection"


async def test_the_20th_hard_error_gets_421_and_the_session_ends(make_gateway: Any) -> None:
    """20 refused recipients (550 relay denied) end the session with 421 4.7.0."""
    async with make_gateway() as gw:
        client = await Raw.open(gw.smtp_port)
        assert (await client.reply()).startswith("220")
        assert (await client.say(b"EHLO client.example.org\r\n")).startswith("250")
        assert (await client.say(b"MAIL FROM:<alice@example.org>\r\n")).startswith("250")
        client.writer.write(b"".join(f"RCPT TO:<u{n}@elsewhere.example>\r\n".encode() for n in range(25)))
        rest = await client.rest()
        await client.close()
    lines = rest.splitlines()
    assert [line[:3] for line in lines] == ["550"] * 20 + ["421"]
    assert lines[-1] == "421 4.7.0 Too many errors, closing connection"


async def test_one_address_flooding_the_listener_does_not_lock_out_others(make_gateway: Any) -> None:
    """Past MAILGATE_MAX_CONNECTIONS_PER_CLIENT sessions from 127.0.0.2 get 421; 127.0.0.1 still mails."""
    env = {"MAILGATE_MAX_CONNECTIONS_PER_CLIENT": "3", "MAILGATE_MAX_CONNECTIONS": "6"}
    async with make_gateway(**env) as gw:
        flood = [await Raw.open(gw.smtp_port, source="127.0.0.2") for _ in range(5)]
        greetings = [await c.reply() for c in flood]
        assert [g[:3] for g in greetings] == ["220"] * 3 + ["421"] * 2
        assert "from your address" in greetings[-1]
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        assert (await client.say(HEAD + b"\r\nhello\r\n.\r\n")).startswith("250")
        for c in [*flood, client]:
            await c.close()


async def test_a_session_ends_at_its_deadline_whatever_it_sends(make_gateway: Any) -> None:
    """NOOPs now and then keep no session past MAILGATE_SMTP_SESSION_TIMEOUT: 421 4.4.2."""
    async with make_gateway(MAILGATE_SMTP_SESSION_TIMEOUT="1") as gw:
        client = await Raw.open(gw.smtp_port)
        assert (await client.reply()).startswith("220")
        last = ""
        for _ in range(90):  # fewer than the junk limit; 9 s at most
            last = await client.say(b"NOOP\r\n")
            if not last.startswith("250"):
                break
            await asyncio.sleep(0.1)
        await client.close()
    assert last.startswith("421 4.4.2 Session too long"), last


async def test_a_sender_trickling_bytes_into_data_is_cut_off(make_gateway: Any) -> None:
    """A byte every 50 ms (far under 500 bytes/s) keeps DATA open no longer than about the timeout."""
    async with make_gateway(MAILGATE_SMTP_TIMEOUT="1") as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        closed = asyncio.ensure_future(client.rest())
        for byte in (HEAD + b"\r\n" + b"x" * 400)[:400]:
            if closed.done():
                break
            client.writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        rest = await closed
        await client.close()
    assert "421 4.4.2 Timeout" in rest


async def test_a_big_message_at_a_fair_rate_outlasts_the_timeout(make_gateway: Any) -> None:
    """3 MB sent over ~3 s with MAILGATE_SMTP_TIMEOUT=1.5: each block moves the DATA deadline on."""
    async with make_gateway(MAILGATE_SMTP_TIMEOUT="1.5") as gw:
        client = await Raw.open(gw.smtp_port)
        await client.to_data()
        client.writer.write(HEAD + b"\r\n")
        for _ in range(30):
            client.writer.write(b"y" * 998 + b"\r\n" * 1 + (b"z" * 998 + b"\r\n") * 99)
            await client.writer.drain()
            await asyncio.sleep(0.1)
        reply = await client.say(b".\r\n")
        await client.close()
    assert reply.startswith("250"), reply


# --- 10. aiosmtpd's own log lines ---------------------------------------------------------------------


async def test_aiosmtpd_warnings_are_escaped_in_our_log(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """A command with NUL and CR is logged by aiosmtpd through our formatter: escaped, no raw bytes."""
    env = write_env(tmp_path / "mailgate.env", env_for(tmp_path, sandbox.url, None))
    daemon = await Serve(env, tmp_path / "serve.log").start()
    try:
        port = await daemon.started()
        client = await Raw.open(port)
        assert (await client.reply()).startswith("220")
        assert (await client.say(b"\x00EVIL\rX\r\n")).startswith("500")
        assert (await client.say(b"QUIT\r\n")).startswith("221")
        await client.close()
        await until(lambda: "unrecognised" in daemon.text(), timeout=10, what="aiosmtpd's warning")
        assert await daemon.stop() == 0
    finally:
        await daemon.close()
    log = (tmp_path / "serve.log").read_bytes()
    assert b"\x00" not in log and b"\r" not in log
    [line] = [line for line in log.decode().splitlines() if "unrecognised" in line]
    assert "logger=mail.log" in line and "\\x00EVIL\\rX" in line


# --- the corpus, as each file holds it ----------------------------------------------------------------


def _corpus_messages() -> list[Path]:
    return sorted(
        p
        for p in CORPUS.rglob("*")
        if p.is_file()
        and not p.name.startswith("LICENSE")
        and "reply-bodies" not in p.parts
        and "_expected" not in p.parts
        and p.suffix != ".md"
        if p.suffix in (".eml", ".txt", ".msg", "") or p.suffix[1:].isdigit()
    )


@needs_corpus
async def test_every_corpus_message_sent_raw_gets_250_or_a_reasoned_refusal(make_gateway: Any) -> None:
    """Each corpus file, sent by smtplib as its bytes are (LF, CRLF or CR), gets 250 or a 4xx/5xx with
    an enhanced status and a reason; none gets a 500."""
    files = _corpus_messages()
    assert len(files) > 300
    env = {"MAILGATE_MAX_NEW_TASKS_PER_HOUR": "100000", "MAILGATE_MAX_TURNS_PER_THREAD_PER_HOUR": "100000"}
    async with make_gateway(**env) as gw:

        def send_all() -> dict[str, tuple[int, str]]:
            seen = {}
            for path in files:
                with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=60) as client:
                    client.ehlo("client.example.org")
                    client.mail("alice@example.org")
                    client.rcpt(WORKER)
                    code, text = client.data(path.read_bytes())
                    seen[str(path.relative_to(CORPUS))] = (code, text.decode("utf-8", "replace"))
            return seen

        seen = await asyncio.to_thread(send_all)
    bad = {
        name: reply
        for name, reply in seen.items()
        if reply[0] != 250 and (reply[0] == 500 or not re.match(r"[45]\.\d{1,3}\.\d{1,3} \S", reply[1]))
    }
    assert bad == {}
    # most of the rest are From addresses outside MAILGATE_ALLOWED_SENDERS (550 5.7.1); the floor is the
    # figure reached when this test was written (178 of 328)
    assert sum(code == 250 for code, _ in seen.values()) >= len(files) // 2
