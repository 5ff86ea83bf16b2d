"""The sender always knows where things stand (issue 15), end to end over real sockets: the gateway, the
sandbox API and the recording relay, all on port 0.

An acknowledgement of a slow turn before its answer; the capped budget said; bounces of our replies at
their VERP return paths (a DSN marks the reply, the third hard bounce stops notices, a forged return path
is refused at RCPT); DKIM-signed replies that verify against the record `dkim-keygen` prints; the task
page the replies link to.
"""

from __future__ import annotations

import email
import json
import re
from email.message import EmailMessage
from email.policy import default
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import anyio
import dkim
import httpx
import pytest

from mailgate import cli
from mailgate.models import InboundState, OutboxState
from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from tests.conftest import DOMAIN, env_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

ALICE = "alice@example.org"


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def text_of(data: bytes) -> str:
    """The plain-text part, with LF line endings (what the relay got has CRLF)."""
    return str(parse(data).get_body(preferencelist=("plain",)).get_content()).replace("\r\n", "\n")


def html_of(data: bytes) -> str:
    return str(parse(data).get_body(preferencelist=("html",)).get_content())


def queue_id(seen: Any) -> str:
    assert seen.data is not None and seen.data[0] == 250, seen
    return str(seen.data[1].rsplit(" ", 1)[1])


async def answered(gw: Gateway, inbound_id: str, *states: str) -> Any:
    """The row of `inbound_id` once it is in one of `states` (default: answered) and its replies are out."""
    want = states or (InboundState.ANSWERED,)

    async def done() -> bool:
        row = await gw.store.inbound(inbound_id)
        out = await gw.store.outbox_for(inbound_id)
        return row is not None and row.state in want and all(o.state == OutboxState.SENT for o in out)

    await until(done, timeout=20, what=f"{inbound_id} in {want} with its replies sent")
    return await gw.store.inbound(inbound_id)


async def run_cli(capsys: Any, env: Path, *argv: str) -> tuple[int, str, str]:
    """`mailgate ARGV --env-file ENV` in a worker thread (it runs its own event loop)."""
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, [*argv, "--env-file", str(env)])
    out, err = capsys.readouterr()
    return code, out, err


def write_env(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, **env: str) -> Path:
    path = tmp_path / "mailgate.env"
    values = env_for(tmp_path, sandbox.url, relay.port, MAILGATE_LOG_LEVEL="ERROR", **env)
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


# --- 1. the acknowledgement of a long turn -----------------------------------------------------------


async def test_a_slow_turn_gets_one_acknowledgement_before_its_answer(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A turn running past MAILGATE_ACK_AFTER: one notice in the thread (link, files sent and skipped),
    then the answer; the task page it links to loads."""
    files = [(f"part{i}.txt", "text/plain", f"file {i}".encode()) for i in range(6)]  # the sixth is skipped
    mail = make_mail(subject="Long job", body="Take your time [sandbox:slow=2.5]", attachments=files)
    async with make_gateway(MAILGATE_ACK_AFTER="0.4") as gw:
        inbound_id = queue_id(await smtp_send(gw.smtp_port, mail))
        [(ack_from, ack_to, ack_data)] = await relay.wait_for(1, timeout=15)
        row = await gw.store.inbound(inbound_id)
        assert row is not None and row.state == InboundState.RUNNING  # the turn still runs
        await relay.wait_for(2, timeout=20)
        row = await answered(gw, inbound_id)
        outbox = await gw.store.outbox_for(inbound_id)
    assert len(relay.messages) == 2
    ack, answer = parse(ack_data), parse(relay.messages[1][2])
    assert [o.notice for o in outbox] == ["working", None]
    assert row.acked_at is not None and row.started_at is not None
    assert ack_to == [ALICE] and ack_from == outbox[0].mail_from
    assert ack["Auto-Submitted"] == "auto-replied"
    for reply in (ack, answer):  # the same thread
        assert reply["Subject"] == "Re: Long job"
        assert reply["In-Reply-To"] == mail["Message-ID"]
        assert mail["Message-ID"] in reply["References"]
    text = text_of(ack_data)
    assert "is being worked on" in text
    for i in range(5):
        assert f"- part{i}.txt (6 bytes)" in text
    assert "- part5.txt: over the limit of 5 files per message" in text
    task_url = re.search(r"Open this task in Handinger: (\S+)", text)
    assert task_url is not None and row.task_id in task_url.group(1)
    assert f'href="{task_url.group(1)}"' in html_of(ack_data)
    assert "Echo from the sandbox" in text_of(relay.messages[1][2])
    # 5. the dashboard link works: the task page answers with the task and its turn
    async with httpx.AsyncClient() as client:
        page = await client.get(task_url.group(1))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert row.task_id in page.text and "Take your time" in page.text


@pytest.mark.parametrize(
    ("ack_after", "body"),
    [("0", "Slow but not acknowledged [sandbox:slow=1]"), ("30", "Quick, so no acknowledgement")],
)
async def test_no_acknowledgement_when_off_or_when_the_answer_comes_first(
    make_gateway: Any, relay: RecordingRelay, ack_after: str, body: str
) -> None:
    """MAILGATE_ACK_AFTER=0 turns acknowledgements off; a turn shorter than it gets only its answer."""
    async with make_gateway(MAILGATE_ACK_AFTER=ack_after) as gw:
        inbound_id = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="Short", body=body)))
        row = await answered(gw, inbound_id)
        outbox = await gw.store.outbox_for(inbound_id)
    assert [o.kind for o in outbox] == ["answer"]
    assert len(relay.messages) == 1 and row.acked_at is None


async def test_an_acknowledged_turn_is_not_acknowledged_again_after_a_restart(
    make_gateway: Any, relay: RecordingRelay
) -> None:
    """The acknowledgement is remembered on the row: a restart mid-turn polls the turn to its answer
    without a second notice."""
    mail = make_mail(subject="Across a restart", body="Slow one [sandbox:slow=4]")
    async with make_gateway(MAILGATE_ACK_AFTER="0.3") as gw:
        inbound_id = queue_id(await smtp_send(gw.smtp_port, mail))
        await relay.wait_for(1, timeout=15)
    async with make_gateway(MAILGATE_ACK_AFTER="0.3") as gw:  # the turn runs on at the sandbox meanwhile
        await answered(gw, inbound_id)
        outbox = await gw.store.outbox_for(inbound_id)
    assert [o.notice for o in outbox] == ["working", None]
    assert len(relay.messages) == 2
    assert "is being worked on" in text_of(relay.messages[0][2])


async def test_a_polled_turn_is_acknowledged_when_due(make_gateway: Any, relay: RecordingRelay) -> None:
    """A turn picked up after a restart, before its acknowledgement was due, is looked at again in time
    for it: one notice, then the answer."""
    mail = make_mail(subject="Polled", body="Slow one [sandbox:slow=5]")
    async with make_gateway(MAILGATE_ACK_AFTER="60") as gw:
        inbound_id = queue_id(await smtp_send(gw.smtp_port, mail))

        async def running() -> bool:
            row = await gw.store.inbound(inbound_id)
            return row is not None and row.state == InboundState.RUNNING

        await until(running, what="the turn at the API")
    assert relay.messages == []
    async with make_gateway(MAILGATE_ACK_AFTER="2.5") as gw:
        await answered(gw, inbound_id)
        outbox = await gw.store.outbox_for(inbound_id)
    assert [o.notice for o in outbox] == ["working", None]


async def test_the_acknowledgement_obeys_the_daily_notice_limit(
    make_gateway: Any, relay: RecordingRelay
) -> None:
    """A sender at MAILGATE_MAX_NOTICES_PER_DAY gets the answer of a slow turn, but no acknowledgement."""
    async with make_gateway(MAILGATE_ACK_AFTER="0.2", MAILGATE_MAX_NOTICES_PER_DAY="1") as gw:
        first = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="One", body="x [sandbox:slow=1]")))
        await answered(gw, first)
        second = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="Two", body="y [sandbox:slow=1]")))
        row = await answered(gw, second)
        outbox = await gw.store.outbox_for(second)
    assert [o.kind for o in outbox] == ["answer"]
    assert row.acked_at is not None  # decided once: not asked again
    assert [parse(m[2])["Subject"] for m in relay.messages] == ["Re: One", "Re: One", "Re: Two"]


# --- 2. honest budgets --------------------------------------------------------------------------------


async def test_a_capped_budget_is_stated_and_every_answer_names_its_budget(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """`alias+unlimited@` over MAILGATE_MAX_BUDGET runs with the cap, and the answer says so and why;
    a budget within the cap is granted without a note; the footer names the turn's budget."""
    async with make_gateway(MAILGATE_MAX_BUDGET="high") as gw:
        capped = make_mail(to=f"research+unlimited@{DOMAIN}", subject="Big", body="Go all out")
        first = queue_id(await smtp_send(gw.smtp_port, capped))
        await answered(gw, first)
        granted = make_mail(to=f"writer+high@{DOMAIN}", subject="Granted", body="Worth it")
        second = queue_id(await smtp_send(gw.smtp_port, granted))
        await answered(gw, second)
        plain = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="Plain", body="Default")))
        await answered(gw, plain)
        task = await gw.store.task_row(str((await gw.store.inbound(first)).task_id))  # type: ignore[union-attr]
    assert [r.budget for r in sandbox.state.requests] == ["high", "high", "standard"]
    assert task is not None and (task.budget, task.budget_asked) == ("high", "unlimited")
    capped_text, granted_text, plain_text = (text_of(m[2]) for m in relay.messages)
    note = "you asked for “unlimited”, but this gateway allows at most “high”, so the task runs with “high”"
    assert note in capped_text and note in html_of(relay.messages[0][2])
    assert "Budget: high" in capped_text.split("\n-- \n")[1]
    assert "you asked for" not in granted_text and "Budget: high" in granted_text.split("\n-- \n")[1]
    assert "you asked for" not in plain_text and "Budget: standard" in plain_text.split("\n-- \n")[1]


# --- 3. bounces of our own replies (VERP) --------------------------------------------------------------


def dsn(to: str, *, status: str = "5.1.1", action: str = "failed", recipient: str = ALICE) -> bytes:
    """A delivery status notification (RFC 3464) from a remote MTA about our reply."""
    return (
        f"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\nTo: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: {make_msgid(domain='mx.example.org')}\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b0"\r\n\r\n'
        "--b0\r\nContent-Type: text/plain\r\n\r\n"
        f"Your message could not be delivered to {recipient}.\r\n"
        "--b0\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} <{recipient}>: Recipient address rejected: User unknown\r\n"
        "--b0--\r\n"
    ).encode()


async def send_bounce(port: int, to: str, msg: bytes | EmailMessage) -> Any:
    """A bounce as MTAs send it: a null envelope sender."""
    return await smtp_send(port, msg, mail_from="", rcpts=[to])


async def test_a_dsn_to_the_return_path_marks_the_reply_bounced_and_is_never_answered(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay, tmp_path: Path, capsys: Any
) -> None:
    """Each reply has its own return path; a DSN to it marks that outbox row `bounced` with the status
    and diagnostic, is recorded `ignored` ("bounce of our reply <id>"), and both show it in `show`."""
    async with make_gateway() as gw:
        first = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="A", body="first")))
        second = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="B", body="second")))
        await answered(gw, first)
        await answered(gw, second)
        [reply] = await gw.store.outbox_for(first)
        [other] = await gw.store.outbox_for(second)
        assert reply.mail_from != other.mail_from  # one return path per reply
        assert {m[0] for m in relay.messages} == {reply.mail_from, other.mail_from}
        seen = await send_bounce(gw.smtp_port, reply.mail_from, dsn(reply.mail_from))
        assert seen.rcpt == [(250, "2.1.5 Ok")]
        bounce_id = queue_id(seen)
        bounced = await gw.store.outbox_row(reply.id)
        untouched = await gw.store.outbox_row(other.id)
        report = await gw.store.inbound(bounce_id)
    assert bounced is not None and bounced.state == OutboxState.BOUNCED
    assert bounced.bounce_status == "5.1.1"
    assert bounced.bounce_diagnostic == (
        "smtp; 550 5.1.1 <alice@example.org>: Recipient address rejected: User unknown"
    )
    assert untouched is not None and untouched.state == OutboxState.SENT
    assert report is not None and report.state == InboundState.IGNORED
    assert report.reason == f"bounce of our reply {reply.id}"
    assert len(sandbox.state.requests) == 2 and len(relay.messages) == 2  # no turn, no reply
    env = write_env(tmp_path, sandbox, relay)
    code, out, _ = await run_cli(capsys, env, "show", reply.id, "--json")
    shown = json.loads(out)
    assert code == 0 and shown["outbox"]["state"] == "bounced"
    assert [(b["addr"], b["status"], b["hard"]) for b in shown["bounces"]] == [(ALICE, "5.1.1", True)]
    code, out, _ = await run_cli(capsys, env, "show", first)
    assert code == 0 and "== bounces" in out and "5.1.1" in out and "bounced" in out
    code, out, _ = await run_cli(capsys, env, "show", bounce_id)
    assert code == 0 and f"bounce of our reply {reply.id}" in out and "== bounces" in out
    code, out, _ = await run_cli(capsys, env, "outbox", "--state", "bounced")
    assert code == 0 and reply.id in out and other.id not in out


async def test_a_plain_text_bounce_and_a_delay_report(make_gateway: Any, relay: RecordingRelay) -> None:
    """A plain-text bounce gives its status from the text; a DSN that only reports a delay marks nothing."""
    async with make_gateway() as gw:
        first = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="A", body="first")))
        second = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="B", body="second")))
        await answered(gw, first)
        await answered(gw, second)
        [one] = await gw.store.outbox_for(first)
        [two] = await gw.store.outbox_for(second)
        text = make_mail(
            sender="postmaster@mx.example.org",
            to=one.mail_from,
            subject="Delivery failure",
            body=f"Your message to {ALICE} was not delivered.\n\n"
            "  host mx.example.org said: 550 5.2.2 Mailbox full (in reply to RCPT TO)\n",
        )
        plain_id = queue_id(await send_bounce(gw.smtp_port, one.mail_from, text))
        delay = dsn(two.mail_from, status="4.4.7", action="delayed")
        delay_id = queue_id(await send_bounce(gw.smtp_port, two.mail_from, delay))
        one_after, two_after = await gw.store.outbox_row(one.id), await gw.store.outbox_row(two.id)
        plain_row, delay_row = await gw.store.inbound(plain_id), await gw.store.inbound(delay_id)
    assert one_after is not None and one_after.state == OutboxState.BOUNCED
    assert one_after.bounce_status == "5.2.2" and "Mailbox full" in str(one_after.bounce_diagnostic)
    assert two_after is not None and two_after.state == OutboxState.SENT and two_after.bounced_at is None
    assert plain_row is not None and plain_row.reason == f"bounce of our reply {one.id}"
    assert delay_row is not None and delay_row.state == InboundState.IGNORED
    assert delay_row.reason == f"delivery report (delayed) of our reply {two.id}"


async def test_the_third_hard_bounce_stops_notices_but_not_answers(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay, tmp_path: Path, capsys: Any
) -> None:
    """After MAILGATE_BOUNCE_LIMIT hard bounces the address gets no notices (`suppressed` lists it);
    answers still go; `unsuppress` lets notices through again (exit 0, then 2 for an unknown address)."""
    async with make_gateway(MAILGATE_BOUNCE_LIMIT="3") as gw:
        for n in range(3):
            inbound_id = queue_id(await smtp_send(gw.smtp_port, make_mail(subject=f"Q{n}", body=f"q {n}")))
            await answered(gw, inbound_id)
            [reply] = await gw.store.outbox_for(inbound_id)
            assert not await gw.store.is_suppressed(ALICE)
            queue_id(await send_bounce(gw.smtp_port, reply.mail_from, dsn(reply.mail_from)))
        assert await gw.store.is_suppressed(ALICE)
        failing = make_mail(subject="Will fail", body="Fail please [sandbox:error]")
        failed = queue_id(await smtp_send(gw.smtp_port, failing))
        await answered(gw, failed, InboundState.FAILED)
        assert await gw.store.outbox_for(failed) == []  # no notice
        fine = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="Still answered", body="ok")))
        await answered(gw, fine)
        assert len(await gw.store.outbox_for(fine)) == 1
        env = write_env(tmp_path, sandbox, relay, MAILGATE_BOUNCE_LIMIT="3")
        code, out, _ = await run_cli(capsys, env, "suppressed")
        assert code == 0 and ALICE in out and "3 hard bounces in 30 days" in out
        code, out, _ = await run_cli(capsys, env, "suppressed", "--json")
        assert code == 0 and json.loads(out)["addr"] == ALICE
        assert (await run_cli(capsys, env, "unsuppress", ALICE))[0] == 0
        assert (await run_cli(capsys, env, "unsuppress", ALICE))[0] == 2
        code, out, _ = await run_cli(capsys, env, "suppressed")
        assert code == 0 and ALICE not in out
        again = queue_id(
            await smtp_send(gw.smtp_port, make_mail(subject="Fail again", body="[sandbox:error]"))
        )
        await answered(gw, again, InboundState.FAILED)
        assert [o.notice for o in await gw.store.outbox_for(again)] == ["task_failed"]
    subjects = [parse(m[2])["Subject"] for m in relay.messages]
    assert (
        "Re: Will fail" not in subjects and "Re: Still answered" in subjects and "Re: Fail again" in subjects
    )


async def test_a_forged_return_path_is_refused_at_rcpt(make_gateway: Any, relay: RecordingRelay) -> None:
    """A return path nobody was sent from, or a real one altered, gets 550 5.1.1 at RCPT."""
    async with make_gateway() as gw:
        inbound_id = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="A", body="a")))
        await answered(gw, inbound_id)
        [reply] = await gw.store.outbox_for(inbound_id)
        local, _, domain = reply.mail_from.partition("@")
        altered = f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}"
        made_up = f"research+bounce-{'a' * 26}@{DOMAIN}"
        other_alias = reply.mail_from.replace("research+", "writer+")
        for forged in (altered, made_up, other_alias, f"research+bounce-short@{DOMAIN}"):
            seen = await send_bounce(gw.smtp_port, forged, dsn(forged))
            assert seen.rcpt[0][0] == 550 and seen.rcpt[0][1].startswith("5.1.1"), (forged, seen)
            assert seen.data is None
        row = await gw.store.outbox_row(reply.id)
    assert row is not None and row.state == OutboxState.SENT


# --- 4. DKIM-signed replies ------------------------------------------------------------------------------


def dns_of(record: str) -> Any:
    """A dnsfunc for dkimpy that answers the TXT record `dkim-keygen` printed (its strings joined)."""
    name, _, rest = record.partition(" IN TXT ")
    value = "".join(re.findall(r'"([^"]*)"', rest)).encode()

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        return value if qname.decode().lower() == name.lower() else None

    return lookup


async def test_replies_and_notices_are_dkim_signed_and_verify_against_the_printed_record(
    make_gateway: Any, relay: RecordingRelay, tmp_path: Path, capsys: Any
) -> None:
    """`dkim-keygen` writes a 0600 key and prints its record; with it configured, an answer, a notice and
    a links-only reply sent after a relay's 552 carry a relaxed/relaxed signature over the headers a
    receiver judges, which dkimpy verifies (and which fails once a signed header is changed)."""
    key = tmp_path / "mail2025.pem"
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(
        cli.main, ["dkim-keygen", "mail2025", "--out", str(key), "--domain", DOMAIN]
    )
    record = capsys.readouterr().out.strip()
    assert code == 0 and key.stat().st_mode & 0o777 == 0o600
    assert record.startswith(f'mail2025._domainkey.{DOMAIN}. IN TXT "v=DKIM1; k=rsa; p=')
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', record))
    assert len(re.findall(r'"([^"]*)"', record)) == 2  # a 2048-bit key needs two strings
    async with make_gateway(MAILGATE_DKIM_SELECTOR="mail2025", MAILGATE_DKIM_KEY=str(key)) as gw:
        answer_id = queue_id(await smtp_send(gw.smtp_port, make_mail(subject="Signed", body="Sign me")))
        await answered(gw, answer_id)
        failing = make_mail(subject="Fails", body="[sandbox:error]")
        await answered(gw, queue_id(await smtp_send(gw.smtp_port, failing)), InboundState.FAILED)
        relay.fail_next("552 5.3.4 Message size exceeds fixed limit", stage="DATA")
        big = make_mail(subject="Too big", body="Files [sandbox:file-bytes=200000 name=data.bin]")
        await answered(gw, queue_id(await smtp_send(gw.smtp_port, big)))  # its links-only version goes
    lookup = dns_of(record)
    for _, _, data in relay.messages:
        signature = parse(data)["DKIM-Signature"]
        tags = dict(t.strip().split("=", 1) for t in re.sub(r"\s+", "", str(signature)).split(";") if t)
        assert (tags["d"], tags["s"], tags["c"], tags["a"]) == (
            DOMAIN,
            "mail2025",
            "relaxed/relaxed",
            "rsa-sha256",
        )
        signed = set(tags["h"].lower().split(":"))
        assert signed >= {
            "from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references", "reply-to",
            "mime-version", "content-type", "auto-submitted",
        }  # fmt: skip
        assert dkim.verify(data, dnsfunc=lookup)
        assert not dkim.verify(data.replace(b"Subject: Re: ", b"Subject: Re: X", 1), dnsfunc=lookup)
    assert [parse(m[2])["Subject"] for m in relay.messages] == ["Re: Signed", "Re: Fails", "Re: Too big"]
    assert "not attached: the mail server refused an email this large" in text_of(relay.messages[2][2])


async def test_dkim_keygen_refuses_to_overwrite_and_needs_a_domain(tmp_path: Path, capsys: Any) -> None:
    """An existing key file is never overwritten (exit 2); without --domain the settings name it (or 78)."""
    existing = tmp_path / "old.pem"
    existing.write_text("keep me")
    code = await anyio.to_thread.run_sync(
        cli.main, ["dkim-keygen", "s1", "--out", str(existing), "--domain", DOMAIN]
    )
    assert code == 2 and existing.read_text() == "keep me"
    code = await anyio.to_thread.run_sync(cli.main, ["dkim-keygen", "bad selector!", "--domain", DOMAIN])
    assert code == 2
    empty = tmp_path / "empty.env"
    empty.write_text("")
    code = await anyio.to_thread.run_sync(
        cli.main, ["dkim-keygen", "s1", "--out", str(tmp_path / "new.pem"), "--env-file", str(empty)]
    )
    assert code == 78 and not (tmp_path / "new.pem").exists()
