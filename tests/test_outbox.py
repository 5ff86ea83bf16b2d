"""The outbox on its own: `Outbox` with a real store, the real transports, and the recording relay.

Time is the outbox's own clock, moved by hand, so a retry's back-off is read off the row exactly and a
retry happens when the test says, not after a sleep. Each test asserts on the rows an operator would
read (`state`, `attempts`, `last_error`, `refused`) and on what reached the relay or the Maildir.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import time
from collections.abc import AsyncIterator, Sequence
from email.policy import SMTP, default
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from ulid import ULID

from mailgate.config import Relay
from mailgate.delivery.outbox import Outbox
from mailgate.delivery.transports import Delivery, MaildirDelivery, RelayDelivery
from mailgate.models import InboundState, OutboxState
from mailgate.store import Admitted, NewMessage, NewReply, OutboxRow, SqliteStore, Store
from tests.mail import make_mail, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

FROM = "research@agents.example.com"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
BASE = 10.0  # the first back-off, in the outbox's (hand-moved) seconds
HORIZON = 3600.0


class Clock:
    """The outbox's clock: starts at the wall clock's now and moves only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class SessionRelay(RecordingRelay):
    """The recording relay, also counting its SMTP sessions and the QUITs it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: set[int] = set()
        self.quits = 0

    async def handle_MAIL(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.sessions.add(id(session))
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_QUIT(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await SqliteStore.open(tmp_path / "outbox.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def relay() -> AsyncIterator[SessionRelay]:
    r = SessionRelay()
    await r.start()
    try:
        yield r
    finally:
        await r.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def relay_delivery(relay: RecordingRelay, **kwargs: Any) -> RelayDelivery:
    return RelayDelivery(Relay("smtp", "127.0.0.1", relay.port), timeout=5.0, **kwargs)


async def queue_reply(store: Store, recipients: Sequence[str] = (ALICE,), *, created_at: float) -> OutboxRow:
    """An answer committed to the outbox the way the scheduler commits one: with its message's end."""
    raw = b"Subject: q\r\n\r\nq\r\n"
    inbound_id = str(ULID())
    await store.admit(
        Admitted(
            raw_id=inbound_id,
            sha256="0" * 64,
            data=raw,
            messages=[
                NewMessage(
                    id=inbound_id,
                    raw_id=inbound_id,
                    received_at=created_at,
                    mail_from=ALICE,
                    rcpt=FROM,
                    alias="research",
                    sender=ALICE,
                    message_id=None,
                    subject="q",
                    dedupe_key=inbound_id,
                    state=InboundState.RECEIVED,
                )
            ],
        )
    )
    mail = make_mail(sender=FROM, to=list(recipients), subject="Re: q", body="The answer.\n\nCafé.")
    reply = NewReply(
        id=str(ULID()),
        inbound_id=inbound_id,
        task_id=None,
        kind="answer",
        notice=None,
        message_id=str(mail["Message-ID"]),
        mail_from=FROM,
        recipients=list(recipients),
        data=mail.as_bytes(policy=SMTP),
        created_at=created_at,
    )
    await store.finish(inbound_id, InboundState.ANSWERED, None, [reply])
    row = await store.outbox_row(reply.id)
    assert row is not None and row.state == OutboxState.PENDING
    return row


@contextlib.asynccontextmanager
async def running(
    store: Store, delivery: Delivery, clock: Clock, *, horizon: float = HORIZON
) -> AsyncIterator[Outbox]:
    """The outbox loop running in the test's loop; drained and stopped on leaving."""
    outbox = Outbox(store, delivery, horizon=horizon, clock=clock, retry_base=BASE)
    loop = asyncio.create_task(outbox.run(), name="outbox")
    try:
        yield outbox
    finally:
        await outbox.drain(2.0)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def settled(store: Store, outbox_id: str, attempts: int) -> OutboxRow:
    """Wait until the row's `attempts`-th delivery attempt is recorded; return the row."""

    async def done() -> bool:
        row = await store.outbox_row(outbox_id)
        return row is not None and row.attempts >= attempts

    await until(done, timeout=10, what=f"attempt {attempts} of {outbox_id}")
    row = await store.outbox_row(outbox_id)
    assert row is not None and row.attempts == attempts
    return row


async def retry_now(outbox: Outbox, clock: Clock, row: OutboxRow) -> None:
    """Move the clock to the row's retry time and wake the outbox."""
    assert row.next_attempt_at > clock.now
    clock.now = row.next_attempt_at
    outbox.wake()


def message_id_of(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=default)["Message-ID"])


# --- the happy path --------------------------------------------------------------------------------------


async def test_a_pending_reply_is_sent_with_the_relays_reply_recorded(
    store: Store, relay: SessionRelay, clock: Clock
) -> None:
    """`pending -> sent`: the relay gets the exact bytes for every recipient; its reply is on the row."""
    row = await queue_reply(store, [ALICE, BOB], created_at=clock.now)
    async with running(store, relay_delivery(relay), clock):
        [(mail_from, rcpts, data)] = await relay.wait_for(1)
        sent = await settled(store, row.id, 1)
    assert (mail_from, rcpts, data) == (FROM, [ALICE, BOB], row.data)
    assert sent.state == OutboxState.SENT
    assert (sent.relay_reply, sent.last_error) == ("250 2.0.0 Ok: queued as Q1", None)
    assert (sent.sent_at, sent.refused, sent.next_attempt_at) == (clock.now, None, 0)


async def test_the_maildir_transport_writes_the_reply_and_marks_it_sent(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    """Without a relay the reply lands in the Maildir's new/, with the envelope in front, and is sent."""
    row = await queue_reply(store, [ALICE, BOB], created_at=clock.now)
    maildir = tmp_path / "maildir"
    async with running(store, MaildirDelivery(maildir), clock):
        sent = await settled(store, row.id, 1)
    [written] = list((maildir / "new").iterdir())
    assert list((maildir / "tmp").iterdir()) == []
    assert sent.state == OutboxState.SENT
    assert (sent.relay_reply, sent.last_error) == (f"250 2.0.0 Ok: written to {written.name}", None)
    content = written.read_bytes()
    assert content.startswith(f"Return-Path: <{FROM}>\nX-Envelope-To: {ALICE}, {BOB}\n".encode())
    assert content.endswith(row.data.replace(b"\r\n", b"\n"))


async def test_a_maildir_that_cannot_be_written_is_retried(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    """A Maildir path that is not a directory defers the reply (retry, with the error), not loses it."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the Maildir should be")
    row = await queue_reply(store, created_at=clock.now)
    async with running(store, MaildirDelivery(blocker), clock):
        retry = await settled(store, row.id, 1)
    assert retry.state == OutboxState.RETRY
    assert retry.last_error is not None and retry.last_error.startswith(f"maildir {blocker}")
    assert retry.next_attempt_at == clock.now + BASE


# --- deferrals and failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "recipients"),
    [("MAIL", [ALICE, BOB]), ("RCPT", [ALICE]), ("DATA", [ALICE, BOB])],
)
async def test_a_4xx_is_retried_with_back_off_then_sent(
    store: Store, relay: SessionRelay, clock: Clock, stage: Any, recipients: list[str]
) -> None:
    """Two 4xx replies: `retry` after the first back-off, then a longer one, then `sent` on the third try."""
    relay.fail_next("451 4.3.0 Try again later", times=2, stage=stage)
    row = await queue_reply(store, recipients, created_at=clock.now)
    async with running(store, relay_delivery(relay), clock) as outbox:
        first = await settled(store, row.id, 1)
        assert first.state == OutboxState.RETRY
        assert first.last_error is not None and "451 4.3.0 Try again later" in first.last_error
        assert first.next_attempt_at == clock.now + BASE  # the first back-off is the base
        await retry_now(outbox, clock, first)
        second = await settled(store, row.id, 2)
        assert second.state == OutboxState.RETRY
        assert BASE <= second.next_attempt_at - clock.now <= 2 * BASE
        assert relay.messages == []
        await retry_now(outbox, clock, second)
        [(_, rcpts, data)] = await relay.wait_for(1)
        sent = await settled(store, row.id, 3)
    assert (rcpts, data) == (recipients, row.data)
    assert sent.state == OutboxState.SENT and sent.relay_reply == "250 2.0.0 Ok: queued as Q1"
    assert sent.last_error is None


async def test_an_unreachable_relay_is_retried(store: Store, clock: Clock) -> None:
    """A relay that refuses connections defers the reply, naming the relay in the error."""
    closed = RecordingRelay()
    await closed.start()
    await closed.close()
    row = await queue_reply(store, created_at=clock.now)
    async with running(store, relay_delivery(closed), clock):
        retry = await settled(store, row.id, 1)
    assert retry.state == OutboxState.RETRY
    assert retry.last_error is not None and retry.last_error.startswith(f"relay 127.0.0.1:{closed.port}: ")


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("MAIL", "550 5.7.1 Sender rejected"),
        ("RCPT", "550 5.1.1 No such user"),
        ("DATA", "554 5.6.0 Message rejected"),
    ],
)
async def test_a_5xx_is_dead_at_once(
    store: Store, relay: SessionRelay, clock: Clock, stage: Any, reply: str
) -> None:
    """A permanent refusal (of the sender, of every recipient, of the data) is `dead` after one attempt."""
    relay.fail_next(reply, times=2, stage=stage)
    row = await queue_reply(store, [ALICE, BOB], created_at=clock.now)
    async with running(store, relay_delivery(relay), clock):
        dead = await settled(store, row.id, 1)
    assert await store.claim_outbox(clock.now + 10 * HORIZON, 10, set()) == []  # never tried again
    assert dead.state == OutboxState.DEAD
    assert dead.last_error is not None and reply in dead.last_error
    assert relay.messages == []


@pytest.mark.parametrize(
    ("refusals", "final_refused"),
    [
        ({BOB: "451 4.2.2 Mailbox full"}, None),
        ({BOB: "451 4.2.2 Mailbox full", CAROL: "550 5.1.1 No such user"}, {CAROL: "550 5.1.1 No such user"}),
    ],
    ids=["one-deferred", "deferred-and-refused"],
)
async def test_a_partial_deferral_retries_only_the_deferred_recipient(
    store: Store,
    relay: SessionRelay,
    clock: Clock,
    refusals: dict[str, str],
    final_refused: dict[str, str] | None,
) -> None:
    """Delivered to some, deferred (4xx) for one: the row keeps the success and retries only that one."""
    for address, reply in refusals.items():
        relay.refuse(address, reply)
    recipients = [ALICE, BOB, CAROL]
    row = await queue_reply(store, recipients, created_at=clock.now)
    started = clock.now
    async with running(store, relay_delivery(relay), clock) as outbox:
        [(_, first_rcpts, _)] = await relay.wait_for(1)
        partial = await settled(store, row.id, 1)
        assert partial.state == OutboxState.RETRY
        assert partial.sent_at == started  # delivered to some already
        assert partial.refused is not None and json.loads(partial.refused) == refusals
        assert partial.last_error == f"deferred for {BOB}: 451 4.2.2 Mailbox full"
        relay.accept(BOB)
        clock.now += 1  # the retry happens later than the first delivery
        await retry_now(outbox, clock, partial)
        messages = await relay.wait_for(2)
        done = await settled(store, row.id, 2)
    assert first_rcpts == [r for r in recipients if r not in refusals]
    assert messages[1][1] == [BOB]
    assert done.state == OutboxState.SENT
    assert done.sent_at == started
    assert (json.loads(done.refused) if done.refused else None) == final_refused
    assert messages[0][2] == messages[1][2] == row.data  # the same bytes both times
    assert message_id_of(messages[0][2]) == message_id_of(messages[1][2]) == row.message_id


@pytest.mark.parametrize("how", ["whole", "no-recipient", "partial"])
async def test_the_retry_horizon_makes_a_row_dead(
    store: Store, relay: SessionRelay, clock: Clock, how: str
) -> None:
    """A deferral after MAILGATE_RETRY_HORIZON since the row was queued ends it `dead` with the error:
    a whole deferral, a retry no recipient accepts, and a retry delivered to some but deferred again."""
    if how == "whole":
        relay.fail_next("451 4.3.0 Try again later", times=10, stage="MAIL")
    else:
        relay.refuse(BOB, "451 4.2.2 Mailbox full")
        relay.refuse(CAROL, "451 4.2.2 Mailbox full")
    row = await queue_reply(store, [ALICE, BOB, CAROL], created_at=clock.now)
    async with running(store, relay_delivery(relay), clock, horizon=60.0) as outbox:
        first = await settled(store, row.id, 1)
        assert first.state == OutboxState.RETRY
        if how == "partial":
            relay.accept(CAROL)
        clock.now = row.created_at + 61.0
        outbox.wake()
        dead = await settled(store, row.id, 2)
    assert dead.state == OutboxState.DEAD
    assert dead.last_error is not None and "451" in dead.last_error
    assert len(relay.messages) == {"whole": 0, "no-recipient": 1, "partial": 2}[how]


async def test_the_bytes_and_message_id_never_change_between_attempts(
    store: Store, relay: SessionRelay, clock: Clock
) -> None:
    """A reply deferred at DATA and then sent carries the stored bytes and Message-ID, byte for byte."""
    relay.fail_next("452 4.3.1 Insufficient storage", times=1, stage="DATA")
    row = await queue_reply(store, [ALICE], created_at=clock.now)
    async with running(store, relay_delivery(relay), clock) as outbox:
        first = await settled(store, row.id, 1)
        await retry_now(outbox, clock, first)
        [(_, _, data)] = await relay.wait_for(1)
        sent = await settled(store, row.id, 2)
    assert sent.data == row.data == data
    assert sent.message_id == row.message_id == message_id_of(data)


async def test_drain_closes_kept_relay_connections(store: Store, relay: SessionRelay, clock: Clock) -> None:
    """Replies reuse one kept relay connection; draining the outbox QUITs it."""
    outbox = Outbox(
        store, relay_delivery(relay, keep_idle=30.0), horizon=HORIZON, clock=clock, retry_base=BASE
    )
    loop = asyncio.create_task(outbox.run(), name="outbox")
    try:
        for n in (1, 2):
            row = await queue_reply(store, [ALICE], created_at=clock.now)
            outbox.wake()
            await relay.wait_for(n)
            assert (await settled(store, row.id, 1)).state == OutboxState.SENT
        assert len(relay.sessions) == 1 and relay.quits == 0  # one connection, kept open
        assert await outbox.drain(2.0) == 0
        await until(lambda: relay.quits == 1, timeout=5, what="the kept connection to be closed")
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
