"""Bounces of our own replies, piece by piece: the return-path tokens (pure), the delivery-report reader
(pure, and against sisimai's 127 real bounces), and the store's bounce records and suppression list.

The end-to-end path (a DSN at the VERP address of a real reply) is in `tests/test_sender.py`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ulid import ULID

from mailgate import tokens
from mailgate.admission import threads
from mailgate.mail.dsn import read_report
from mailgate.models import InboundState, OutboxState
from mailgate.store import Admitted, NewBounce, NewMessage, NewReply, SqliteStore, Store
from mailgate.store.sqlite import BOUNCE_WINDOW
from tests.conftest import CORPUS, needs_corpus

SECRET = b"test-secret-0123456789abcdef"
ALICE = "alice@example.org"
BOB = "bob@example.org"

# --- return-path tokens --------------------------------------------------------------------------------


def test_addresses_made_for_a_reply_verify_at_admission() -> None:
    """The return path and the Reply-To a reply goes out with (`tokens.return_path`, `tokens.reply_to`, as
    `replies.compose` makes them) are the ones admission accepts (`tokens.token_of_tag`,
    `verify_bounce_token`, `task_id_of_token`, `verify_token`), byte for byte the addresses earlier
    versions made (so replies already out still verify), and with another secret or owner they do not."""
    outbox_id, task_id = "01JDZ7Q4W8K3M5N6P7R8S9T0VX", "tsk_01JDZ7Q4W8K3M5N6P7R8S9T0VX"
    path = tokens.return_path(SECRET, "research", "agents.example.com", outbox_id)
    assert path == "research+bounce-q4syhgbjd6rcamv5qfmut6osyt@agents.example.com"
    split = tokens.split_recipient(path, "agents.example.com")
    assert split is not None and split[0] == "research"
    token = tokens.token_of_tag(str(split[1]))
    assert token is not None and tokens.verify_bounce_token(SECRET, token, outbox_id)
    assert not tokens.verify_bounce_token(b"another-secret-0123456789", token, outbox_id)

    reply_to = tokens.reply_to(SECRET, "research", "agents.example.com", task_id, ALICE.upper())
    assert reply_to == "research+01jdz7q4w8k3m5n6p7r8s9t0vxx24mpheluapws@agents.example.com"
    split = tokens.split_recipient(reply_to, "agents.example.com")
    assert split is not None and split[1] is not None and tokens.looks_like_token(split[1])
    assert tokens.task_id_of_token(split[1]) == task_id
    assert tokens.verify_token(SECRET, split[1], task_id, ALICE)
    assert not tokens.verify_token(SECRET, split[1], task_id, BOB)
    assert not tokens.verify_token(b"another-secret-0123456789", split[1], task_id, ALICE)
    fresh = threads.new_task_id()
    assert tokens.task_id_of_token(tokens.reply_token(SECRET, fresh, ALICE)) == fresh
    with pytest.raises(ValueError, match="not a mailgate task id"):
        tokens.reply_token(SECRET, "not-a-task", ALICE)


def test_a_return_path_fits_a_local_part_and_verifies_only_for_its_reply() -> None:
    """`alias+bounce-<token>` fits 64 octets with a 24-character alias; the token verifies for its own
    outbox row only, case-folded or not, and never once altered."""
    outbox_id = str(ULID())
    alias = "a" * 24
    address = tokens.return_path(SECRET, alias, "agents.example.com", outbox_id)
    local = address.partition("@")[0]
    assert len(local.encode()) <= 64 and local == local.lower()
    split = tokens.split_recipient(address.upper(), "agents.example.com")
    assert split is not None and split[0] == alias
    token = tokens.token_of_tag(str(split[1]))
    assert token is not None and tokens.verify_bounce_token(SECRET, token, outbox_id)
    assert not tokens.verify_bounce_token(SECRET, token, str(ULID()))
    assert not tokens.verify_bounce_token(b"another-secret-0123456789", token, outbox_id)
    altered = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert not tokens.verify_bounce_token(SECRET, altered, outbox_id)
    assert not tokens.looks_like_token(str(split[1]))  # never read as a reply token


@pytest.mark.parametrize(
    "tag", ["bounce-", "bounce-abc", "bounce-" + "a" * 27, "bounce-" + "1" * 26, "high", "x" * 39]
)
def test_tags_that_are_not_return_path_tokens(tag: str) -> None:
    """Short, long, non-base32 tokens, budget words and reply tokens are not return-path tokens."""
    assert tokens.token_of_tag(tag) is None


# --- the delivery-report reader --------------------------------------------------------------------------


def report(*blocks: str, text: str = "Your message could not be delivered.") -> bytes:
    body = "\r\n\r\n".join(["Reporting-MTA: dns; mx.example.org", *blocks])
    return (
        "From: MAILER-DAEMON@mx.example.org\r\nTo: research+bounce-x@agents.example.com\r\n"
        "Subject: Undelivered\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        f"--b\r\nContent-Type: text/plain\r\n\r\n{text}\r\n"
        f"--b\r\nContent-Type: message/delivery-status\r\n\r\n{body}\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: research@agents.example.com\r\n"
        "Subject: Re: x\r\n--b--\r\n"
    ).encode()


def test_a_dsn_gives_each_recipient_its_action_status_and_diagnostic() -> None:
    """Per-recipient blocks tie to our recipients by Final- or Original-Recipient; a generic 5.0.0 gives
    way to the code the diagnostic quotes; a delayed recipient is no failure."""
    raw = report(
        f"Final-Recipient: rfc822; <{ALICE.upper()}>\r\nAction: failed\r\nStatus: 5.0.0\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 <alice@example.org>... User\r\n  unknown",
        "Final-Recipient: rfc822; bob@internal.example.org\r\nOriginal-Recipient: rfc822; bob@example.org\r\n"
        "Action: delayed\r\nStatus: 4.4.7",
    )
    found = read_report(raw, [ALICE, BOB])
    assert found.kind == "dsn"
    alice, bob = found.recipients
    assert (alice.addr, alice.action, alice.status) == (ALICE, "failed", "5.1.1")
    assert alice.diagnostic == "smtp; 550 5.1.1 <alice@example.org>... User unknown"
    assert alice.failed and alice.hard
    assert (bob.addr, bob.action, bob.status, bob.failed, bob.hard) == (BOB, "delayed", "4.4.7", False, False)
    assert found.failures == (alice,)


def test_a_recipient_we_cannot_tie_is_kept_without_an_address() -> None:
    """With several recipients of ours, a report about someone else names no address (so it suppresses
    nobody); with one recipient, the report is about it."""
    raw = report("Final-Recipient: rfc822; carol@elsewhere.example\r\nAction: failed\r\nStatus: 5.2.1")
    assert read_report(raw, [ALICE, BOB]).recipients[0].addr is None
    assert read_report(raw, [ALICE]).recipients[0].addr == ALICE


@pytest.mark.parametrize(
    ("text", "status", "failed"),
    [
        ("<alice@example.org>: host mx said: 550 5.2.2 Mailbox full (in reply to RCPT TO)", "5.2.2", True),
        ("Delivery to alice@example.org failed: 554 Transaction failed", "5.0.0", True),
        ("Status: 5.7.1 (delivery not authorized)", "5.7.1", True),
        ("This is only a warning: 451 4.4.1 will retry for 4 days", "4.4.1", False),
        ("250 2.6.0 Message received", "2.6.0", False),
        ("Your message could not be delivered. Sorry.", None, True),
        ("Postfix 3.5.1 here: 550 5.1.1 unknown", "5.1.1", True),
    ],
)
def test_a_plain_text_bounce_gives_the_status_it_quotes(text: str, status: str | None, failed: bool) -> None:
    """A bounce without a DSN part: the reply code and enhanced status it quotes (version numbers are not
    statuses); a warning or a success is no failure; no status at all still is one (not hard)."""
    raw = f"From: postmaster@mx.example.org\r\nSubject: Failure\r\n\r\nHello.\r\n{text}\r\n".encode()
    [found] = read_report(raw, [ALICE]).recipients
    assert (found.status, found.failed, found.addr) == (status, failed, ALICE)
    assert found.hard == (status is not None and status.startswith("5"))
    if status:
        assert found.diagnostic is not None and status.split(".")[0] in found.diagnostic


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\nno parts at all",
        b"Content-Type: message/delivery-status\r\n\r\nFinal-Recipient: ;;;\r\nStatus: x.y.z",
    ],
)
def test_malformed_reports_never_raise(raw: bytes) -> None:
    """Anything at all reads as a report: broken input is a bounce without a status, never an error."""
    found = read_report(raw, [ALICE])
    assert len(found.recipients) >= 1 and all(r.status is None for r in found.recipients)


@needs_corpus
def test_sisimai_bounces_are_read_as_failures_with_their_status() -> None:
    """Each of sisimai's 115 permanent failures (DSNs and plain text from ~60 MTAs) reads as a failure,
    never with a status of another class; of the 82 whose status sisimai read from the message, 80 get
    exactly that status (the other 33 carry sisimai's own 5.0.9xx codes, which no message quotes)."""
    folder = CORPUS / "sisimai+set-of-emails"
    expected = json.loads((folder / "_expected" / "sisimai_expected.json").read_text())["expected"]
    failed = quoted = exact = 0
    for name, rows in expected.items():
        wanted = {r["dsn"] for r in rows if r["reason"] not in ("vacation", "feedback") and r["dsn"]}
        if not wanted or any(code[0] in "24" for code in wanted):
            continue
        found = read_report((folder / name).read_bytes(), [])
        statuses = {r.status for r in found.failures}
        assert found.failures, name
        assert all(s is None or s[0] == "5" for s in statuses), (name, statuses)
        failed += 1
        if not all(len(w.split(".")[2]) == 3 and w.split(".")[2][0] == "9" for w in wanted):
            quoted += 1
            exact += bool(statuses & wanted)
    assert (failed, quoted, exact) == (115, 82, 80)


@needs_corpus
@pytest.mark.parametrize(
    "name",
    [
        "maildir__bsd__lhost-messagingserver-07.eml",  # Action: delayed, 4.4.7
        "maildir__bsd__rfc3464-09.eml",  # Action: delayed, 4.3.0
        "maildir__bsd__rfc3464-28.eml",  # Action: deliverable, 2.1.5
        "maildir__bsd__lhost-amazonses-12.eml",  # a delivery notification, 250 2.6.0
    ],
)
def test_sisimai_delays_and_deliveries_are_no_failures(name: str) -> None:
    """Reports of a delay or of a delivery mark nothing bounced."""
    found = read_report((CORPUS / "sisimai+set-of-emails" / name).read_bytes(), [])
    assert found.recipients and not found.failures


# --- the store: bounce records and the suppression list ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The test's store, on each backend (PostgreSQL: a fresh database on the session's server)."""
    s: Store
    if request.param == "sqlite":
        s = await SqliteStore.open(tmp_path / "store.db")
    else:
        from mailgate.store.postgres import PostgresStore

        s = await PostgresStore.open(str(request.getfixturevalue("postgres_db")))
    try:
        yield s
    finally:
        await s.close()


async def sent_reply(store: Store, to: str = ALICE) -> str:
    """An answer to `to`, queued and recorded as sent; its outbox id."""
    reply = NewReply(
        id=str(ULID()), inbound_id=None, task_id=None, kind="answer", notice=None,
        message_id=f"<{ULID()}.mailgate@agents.example.com>", mail_from=f"research+bounce-{ULID()}@x".lower(),
        recipients=[to], data=b"Subject: x\r\n\r\nx\r\n", created_at=time.time(),
    )  # fmt: skip
    raw = f"question {ULID()}".encode()
    asked = NewMessage(
        id=str(ULID()), raw_id=str(ULID()), received_at=time.time(), mail_from=to, rcpt="research@x",
        alias="research", sender=to, message_id=None, subject="x", dedupe_key=str(ULID()), state="received",
    )  # fmt: skip
    await store.admit(Admitted(asked.raw_id, hashlib.sha256(raw).hexdigest(), raw, [asked]))
    reply = NewReply(**{**reply.__dict__, "inbound_id": asked.id})
    await store.finish(asked.id, InboundState.ANSWERED, None, [reply])  # queued as the scheduler does
    await store.record_delivery(reply.id, OutboxState.SENT, attempts=1, error=None, sent_at=time.time())
    return reply.id


async def bounce(store: Store, outbox_id: str, *, status: str = "5.1.1", at: float | None = None) -> str:
    """A bounce report about `outbox_id`, admitted as admission commits it; its queue id."""
    now = time.time() if at is None else at
    raw = f"bounce {ULID()}".encode()
    message = NewMessage(
        id=str(ULID()), raw_id=str(ULID()), received_at=now, mail_from="", rcpt="research+bounce-x@x",
        alias="research", sender=None, message_id=None, subject="Undelivered", dedupe_key=str(ULID()),
        state="ignored", reason=f"bounce of our reply {outbox_id}",
    )  # fmt: skip
    found = NewBounce(outbox_id, ALICE, status, f"smtp; 550 {status} no", status.startswith("5"))
    await store.admit(
        Admitted(
            raw_id=message.raw_id,
            sha256=hashlib.sha256(raw).hexdigest(),
            data=raw,
            messages=[message],
            bounces=[(message.id, found)],
            received_at=now,
            bounce_limit=3,
        )
    )
    return message.id


@pytest.mark.anyio
async def test_a_bounce_marks_its_reply_and_is_found_from_both_sides(store: Store) -> None:
    """The reply is `bounced` with the status and diagnostic; the bounce is listed for the reply and
    for the report that told of it."""
    outbox_id = await sent_reply(store)
    report_id = await bounce(store, outbox_id, status="5.1.1")
    row = await store.outbox_row(outbox_id)
    assert row is not None and row.state == OutboxState.BOUNCED
    assert (row.bounce_status, row.bounce_diagnostic) == ("5.1.1", "smtp; 550 5.1.1 no")
    [by_reply] = await store.bounces_of([outbox_id])
    assert await store.bounce_reported_by(report_id) == [by_reply]
    assert (by_reply.addr, by_reply.hard, by_reply.inbound_id) == (ALICE, 1, report_id)
    assert await store.list_outbox("bounced") == [row]


@pytest.mark.anyio
async def test_a_reply_still_being_retried_keeps_its_state_when_a_bounce_comes(store: Store) -> None:
    """A bounce for a reply whose other recipients are still retried is noted without stopping them."""
    outbox_id = await sent_reply(store)
    await store.record_delivery(outbox_id, OutboxState.RETRY, attempts=2, error="deferred for bob")
    await bounce(store, outbox_id)
    row = await store.outbox_row(outbox_id)
    assert row is not None and row.state == OutboxState.RETRY and row.bounce_status == "5.1.1"


@pytest.mark.anyio
async def test_the_third_hard_bounce_in_the_window_suppresses_and_unsuppress_starts_afresh(
    store: Store,
) -> None:
    """Soft bounces and hard ones older than 30 days do not count; the third recent hard one suppresses;
    after `unsuppress` only later bounces count."""
    old = time.time() - BOUNCE_WINDOW - 60
    await bounce(store, await sent_reply(store), at=old)
    await bounce(store, await sent_reply(store), at=old)
    await bounce(store, await sent_reply(store), status="4.2.2")
    await bounce(store, await sent_reply(store))
    await bounce(store, await sent_reply(store))
    assert not await store.is_suppressed(ALICE)
    await bounce(store, await sent_reply(store))
    assert await store.is_suppressed(ALICE.upper())
    [row] = await store.suppressed()
    assert row.addr == ALICE and row.reason == "3 hard bounces in 30 days (the last: 5.1.1)"
    assert await store.unsuppress(ALICE) is True
    assert await store.unsuppress(ALICE) is False
    assert not await store.is_suppressed(ALICE) and await store.suppressed() == []
    await bounce(store, await sent_reply(store))
    await bounce(store, await sent_reply(store))
    assert not await store.is_suppressed(ALICE)
    await bounce(store, await sent_reply(store))
    assert await store.is_suppressed(ALICE)
    assert not await store.is_suppressed(BOB)
