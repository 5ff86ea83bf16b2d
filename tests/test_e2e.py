"""End to end over real sockets: the gateway, the sandbox API and a recording relay, all on port 0."""

from __future__ import annotations

import email
import mailbox
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def body_text(msg: Any) -> str:
    part = msg.get_body(preferencelist=("plain",))
    return str(part.get_content())


async def test_mail_starts_a_task_and_the_answer_comes_back(make_gateway: Any, sandbox: Any, relay: Any) -> None:
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
    assert mail_from == "research@agents.example.com"
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
async def test_recipients_that_are_not_workers_are_refused(make_gateway: Any, rcpt: str, code: int, status: str) -> None:
    """Unknown local parts get 550 5.1.1; other domains are a relay attempt, 550 5.7.1."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(to=rcpt), rcpts=[rcpt])
    assert seen.rcpt[0][0] == code
    assert seen.rcpt[0][1].startswith(status)


async def test_disallowed_sender_is_refused_with_a_reason(make_gateway: Any, sandbox: Any) -> None:
    """A From address outside MAILGATE_ALLOWED_SENDERS gets 550 5.7.1 at DATA and no task."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(sender="mallory@evil.example"), mail_from="mallory@evil.example")
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


async def test_replies_go_to_the_maildir_without_a_relay(make_gateway: Any, tmp_path: Path, sandbox: Any) -> None:
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


async def test_lmtp_answers_per_recipient(make_gateway: Any, tmp_path: Path, sandbox: Any, relay: Any) -> None:
    """LMTP gives one reply per recipient after DATA, and both workers get their own task."""
    import aiosmtplib

    sock = tmp_path / "lmtp.sock"
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{sock}") as gw:
        assert gw.lmtp_address is not None
        client = aiosmtplib.SMTP(hostname=None, port=None, socket_path=str(sock), timeout=10)
        await client.connect()
        reply = await client.execute_command(b"LHLO", b"test.example")
        assert reply.code == 250
        await client.mail("alice@example.org")
        await client.rcpt("research@agents.example.com")
        await client.rcpt("writer@agents.example.com")
        mail = make_mail(to=["research@agents.example.com", "writer@agents.example.com"])
        await client.execute_command(b"DATA")
        client.transport.write(mail.as_bytes().replace(b"\n", b"\r\n") + b"\r\n.\r\n")  # type: ignore[union-attr]
        first = await client.protocol.read_response(timeout=10)  # type: ignore[union-attr]
        second = await client.protocol.read_response(timeout=10)  # type: ignore[union-attr]
        assert first.code == 250 and second.code == 250
        client.close()
        await relay.wait_for(2, timeout=15)
    assert sorted(r.worker_id for r in sandbox.state.requests) == ["wrk_research", "wrk_writer"]
