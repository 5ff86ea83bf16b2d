"""End to end over real sockets: the gateway, the sandbox API and a recording relay, all on port 0."""

from __future__ import annotations

import email
import mailbox
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import both_stores
from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def body_text(msg: Any) -> str:
    part = msg.get_body(preferencelist=("plain",))
    return str(part.get_content())


@both_stores
async def test_mail_starts_a_task_and_the_answer_comes_back(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A plain email creates one task (triggeredBy=email, the alias's worker) and one threaded reply."""
    async with make_gateway() as gw:
        mail = make_mail(subject="Quarterly numbers", body="What were the numbers in Q3?")
        seen = await smtp_send(gw.smtp_port, mail)
        assert seen.rcpt == [(250, "2.1.5 Ok")]
        assert seen.data is not None and seen.data[0] == 250 and "queued as" in seen.data[1]
        await relay.wait_for(1, timeout=15)

    [request] = sandbox.state.requests
    assert request.worker_id == "wrk_research"
    assert request.triggered_by == "email"
    assert request.task_id.startswith("tsk_") and len(request.task_id) == 30
    assert request.budget == "standard"
    assert request.stream is True
    assert "What were the numbers in Q3?" in request.input

    [(mail_from, rcpts, data)] = relay.messages
    reply = parse(data)
    assert rcpts == ["alice@example.org"]
    assert mail_from.startswith("research+bounce-") and mail_from.endswith("@agents.example.com")  # VERP
    assert reply["Subject"] == "Re: Quarterly numbers"
    assert reply["In-Reply-To"] == mail["Message-ID"]
    assert mail["Message-ID"] in reply["References"]
    assert reply["Message-ID"].endswith("@agents.example.com>")
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["X-Auto-Response-Suppress"] == "All"
    assert reply["Reply-To"].startswith("research+")
    turn = sandbox.state.turns_of(request.task_id)[0]
    assert turn.output_text.splitlines()[0] in body_text(reply)
    assert "What were the numbers in Q3?" in body_text(reply)
    html = reply.get_body(preferencelist=("html",))
    assert html is not None and "<script" not in html.get_content()


@pytest.mark.parametrize(
    ("rcpt", "code", "status"),
    [
        ("nobody@agents.example.com", 550, "5.1.1"),
        ("someone@elsewhere.example", 550, "5.7.1"),
        ("research@agents.example.com.evil.example", 550, "5.7.1"),
    ],
)
async def test_recipients_that_are_not_workers_are_refused(
    make_gateway: Any, rcpt: str, code: int, status: str
) -> None:
    """Unknown local parts get 550 5.1.1; other domains are a relay attempt, 550 5.7.1."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(to=rcpt), rcpts=[rcpt])
    assert seen.rcpt[0][0] == code
    assert seen.rcpt[0][1].startswith(status)


@both_stores
async def test_disallowed_sender_is_refused_with_a_reason(make_gateway: Any, sandbox: Any) -> None:
    """A From address outside MAILGATE_ALLOWED_SENDERS gets 550 5.7.1 at DATA and no task."""
    async with make_gateway() as gw:
        seen = await smtp_send(
            gw.smtp_port, make_mail(sender="mallory@evil.example"), mail_from="mallory@evil.example"
        )
    assert seen.data is not None
    assert seen.data[0] == 550
    assert seen.data[1].startswith("5.7.1") and "mallory@evil.example" in seen.data[1]
    assert sandbox.state.requests == []


async def test_oversize_message_is_refused(make_gateway: Any, sandbox: Any) -> None:
    """SIZE is advertised from MAILGATE_MAX_MESSAGE_SIZE and a bigger message gets 552."""
    async with make_gateway(MAILGATE_MAX_MESSAGE_SIZE="20000") as gw:
        big = make_mail(attachments=[("big.bin", "application/octet-stream", b"x" * 30000)])
        seen = await smtp_send(gw.smtp_port, big)
    assert seen.data is not None and seen.data[0] == 552
    assert sandbox.state.requests == []


async def test_replies_go_to_the_maildir_without_a_relay(
    make_gateway: Any, tmp_path: Path, sandbox: Any
) -> None:
    """With no MAILGATE_SMTP_RELAY the reply is written to the MAILGATE_OUTBOX_DIR Maildir."""
    async with make_gateway(with_relay=False) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(subject="Maildir please"))
        assert seen.accepted
        box = mailbox.Maildir(tmp_path / "outbox", create=True)
        await until(lambda: len(box.keys()) == 1, timeout=15, what="a reply in the Maildir")
    [key] = box.keys()
    reply = parse(box.get_bytes(key))
    assert reply["Subject"] == "Re: Maildir please"
    assert reply["To"] == "alice@example.org"


@both_stores
async def test_lmtp_answers_per_recipient(
    make_gateway: Any, tmp_path: Path, sandbox: Any, relay: Any
) -> None:
    """LMTP gives one reply per recipient after DATA, and both workers get their own task."""
    import asyncio

    sock = tmp_path / "lmtp.sock"
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{sock}") as gw:
        assert gw.lmtp_address is not None
        reader, writer = await asyncio.open_unix_connection(str(sock))

        async def reply() -> bytes:
            lines = []
            while True:
                line = await asyncio.wait_for(reader.readline(), 10)
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        assert (await reply()).startswith(b"220")
        mail = make_mail(to=["research@agents.example.com", "writer@agents.example.com"])
        for command in (
            b"LHLO test.example",
            b"MAIL FROM:<alice@example.org>",
            b"RCPT TO:<research@agents.example.com>",
            b"RCPT TO:<writer@agents.example.com>",
            b"DATA",
        ):
            writer.write(command + b"\r\n")
            assert (await reply())[:1] in (b"2", b"3")
        writer.write(mail.as_bytes().replace(b"\n", b"\r\n") + b".\r\n")
        first, second = await reply(), await reply()
        assert first.startswith(b"250 2.0.0") and second.startswith(b"250 2.0.0")
        assert first != second  # each recipient has its own queue id
        writer.write(b"QUIT\r\n")
        await reply()
        writer.close()
        await writer.wait_closed()
        await relay.wait_for(2, timeout=15)
    assert sorted(r.worker_id for r in sandbox.state.requests) == ["wrk_research", "wrk_writer"]
