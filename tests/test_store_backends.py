"""More of the store's operations on both backends (besides tests/test_store.py: the 8-bit raw bytes, the
DATA decision's reads, a message's whole walk, notices, NUL characters), and PostgreSQL's leases,
fencing, renewal and wake-ups: what several gateways on one database need.

Rows are made through the store's own operations (`admit`, `claim_*`, `finish`), never with SQL, so each
test reads as the stages use the store. Ids sort in the order the test makes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mailgate.errors import LeaseLost, RawMissing
from mailgate.models import InboundState, OutboxState
from mailgate.store import Admitted, NewMessage, NewReply, NewTask, SqliteStore, Store
from tests.mail import until

pytestmark = pytest.mark.anyio

_seq = itertools.count(1)
RAW = b"From: alice@example.org\r\nSubject: caf\xe9\r\n\r\n\x00\xff 8-bit body\r\n"


def next_id(prefix: str = "01J") -> str:
    """An id that sorts after every id made before it (ULIDs made in one millisecond need not)."""
    return f"{prefix}{next(_seq):023d}"


def admitted(
    *,
    task: str | None = None,
    new_task: bool = False,
    state: str = InboundState.RECEIVED,
    sender: str = "alice@example.org",
    message_id: str | None = None,
    received_at: float | None = None,
    subject: str = "Numbers",
    raw: bytes = RAW,
) -> Admitted:
    """One accepted DATA for one recipient, optionally starting task `task`."""
    task_id = task or f"tsk_{next_id()}"
    mid = message_id or f"<{next_id('m')}@example.org>"
    now = time.time() if received_at is None else received_at
    msg = NewMessage(
        id=next_id(),
        raw_id=next_id("R"),
        received_at=now,
        mail_from=sender,
        rcpt="research@agents.example.com",
        alias="research",
        sender=sender,
        message_id=mid,
        subject=subject,
        dedupe_key=hashlib.sha256(mid.encode()).hexdigest(),
        state=state,
        task_id=task_id,
        new_task=int(new_task),
        in_reply_to=None,
        to_cc='["research@agents.example.com"]',
        sender_name="Alice",
    )
    tasks = (
        [NewTask(task_id, "research", "wrk_research", sender, "standard", subject, now)] if new_task else []
    )
    return Admitted(
        raw_id=msg.raw_id,
        sha256=hashlib.sha256(raw).hexdigest(),
        data=raw,
        messages=[msg],
        tasks=tasks,
        participants=[(task_id, sender)],
        thread_ids=[(mid, task_id)],
    )


def reply(message: NewMessage, *, kind: str = "answer", notice: str | None = None) -> NewReply:
    return NewReply(
        id=next_id("O"),
        inbound_id=message.id,
        task_id=message.task_id,
        kind=kind,
        notice=notice,
        message_id=f"<{next_id()}.mailgate@agents.example.com>",
        mail_from="research@agents.example.com",
        recipients=[message.sender or ""],
        data=b"Subject: Re: Numbers\r\n\r\nThe answer.\r\n",
        created_at=time.time(),
    )


Opener = Callable[..., Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """`await open_store()` opens (another handle on) the test's store: one SQLite file, or one fresh
    PostgreSQL database (each handle then is a gateway of its own). All are closed at the end."""
    opened: list[Store] = []
    url = str(request.getfixturevalue("postgres_db")) if request.param == "postgres" else None

    async def open_(lease_seconds: float = 60.0) -> Store:
        if url is not None:
            from mailgate.store.postgres import PostgresStore

            store: Store = await PostgresStore.open(url, lease_seconds=lease_seconds)
        else:
            store = await SqliteStore.open(tmp_path / "mailgate.db")
        opened.append(store)
        return store

    open_.backend = request.param  # type: ignore[attr-defined]
    yield open_
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(open_store: Opener) -> Store:
    """The test's store, on each backend."""
    return await open_store()


@pytest.fixture
def pg_url(postgres_db: str) -> str:
    """A fresh PostgreSQL database for a PostgreSQL-only test."""
    pytest.importorskip("psycopg_pool")
    return postgres_db


async def pg_store(url: str, lease_seconds: float = 60.0) -> Any:
    from mailgate.store.postgres import PostgresStore

    return await PostgresStore.open(url, lease_seconds=lease_seconds)


# --- both backends ---------------------------------------------------------------------------------


async def test_admit_commits_the_raw_bytes_and_every_row(store: Store) -> None:
    """What `admit` commits reads back as written: 8-bit raw bytes, the row, its task and participant."""
    a = admitted(new_task=True)
    await store.admit(a)
    [m] = a.messages
    row = await store.inbound(m.id)
    assert row is not None
    assert (row.state, row.task_id, row.message_id, row.sender_name) == (
        "received",
        m.task_id,
        m.message_id,
        "Alice",
    )
    assert row.to_cc_addrs == ["research@agents.example.com"]
    assert row.updated_at == m.received_at
    assert await store.raw(a.raw_id) == RAW
    assert await store.raw_head(a.raw_id, 20) == RAW[:20]
    assert m.task_id is not None
    task = await store.task_row(m.task_id)
    assert task is not None and (task.owner, task.turns, task.archived) == ("alice@example.org", 0, 0)
    assert (await store.task(m.task_id)) is not None
    assert await store.participants(m.task_id) == ["alice@example.org"]
    assert [r.id for r in await store.list_inbound()] == [m.id]
    assert [t.id for t in await store.list_tasks()] == [m.task_id]
    with pytest.raises(RawMissing):
        await store.raw("no-such-raw")


async def test_admission_facts_answer_every_data_question(store: Store) -> None:
    """Duplicates, a token's task, the task a Message-ID chain names, participation and capped counts."""
    first = admitted(new_task=True)
    await store.admit(first)
    [m] = first.messages
    assert m.task_id is not None and m.message_id is not None
    for _ in range(3):
        await store.admit(admitted(task=m.task_id))
    facts = await store.admission_facts(
        [m.dedupe_key, "unseen"],
        token_task_ids=[m.task_id, "tsk_unknown"],
        chain=["<unknown@example.org>", m.message_id],
        aliases=["research", "writer"],
        sender="alice@example.org",
        since=0.0,
        max_turns=2,
        max_new_tasks=10,
    )
    assert facts.duplicates == {m.dedupe_key: m.id, "unseen": None}
    assert facts.tasks[m.task_id] is not None and facts.tasks["tsk_unknown"] is None
    found = facts.by_chain["research"]
    assert found is not None and found.task_id == m.task_id
    assert facts.by_chain["writer"] is None
    assert facts.participant == {m.task_id: True}
    assert facts.turns == {m.task_id: 2}  # four messages, counted up to the limit
    assert facts.new_tasks == 1
    anonymous = await store.admission_facts([m.dedupe_key], max_turns=5, max_new_tasks=5)
    assert anonymous.duplicates == {m.dedupe_key: m.id} and anonymous.tasks == {}


async def test_claims_take_only_the_oldest_unfinished_message_of_each_task(store: Store) -> None:
    """One task's turns run in order: its second message is claimable only once the first is done."""
    a1 = admitted(new_task=True)
    [m1] = a1.messages
    await store.admit(a1)
    a2 = admitted(task=m1.task_id)
    b1 = admitted(new_task=True)
    await store.admit(a2)
    await store.admit(b1)
    now = time.time()
    claimed = await store.claim_inbound(now, 10, set())
    assert [r.id for r in claimed] == [m1.id, b1.messages[0].id]
    await store.finish(
        m1.id, InboundState.ANSWERED, None, [reply(m1)], task_id=m1.task_id, turn_seq=0, task_turns=1
    )
    await store.release_inbound(m1.id)
    busy = {b1.messages[0].id}
    assert [r.id for r in await store.claim_inbound(now, 10, busy)] == [a2.messages[0].id]


async def test_a_rescheduled_message_is_due_again_at_its_time(store: Store) -> None:
    """`reschedule` hides a message until its time; `next_due_after` names that time."""
    a = admitted(new_task=True)
    [m] = a.messages
    await store.admit(a)
    now = time.time()
    [row] = await store.claim_inbound(now, 5, set())
    await store.reschedule(row.id, now + 30, state=InboundState.QUEUED, error="API 503")
    await store.release_inbound(row.id)
    assert await store.claim_inbound(now, 5, set()) == []
    assert await store.next_due_after("inbound", now) == pytest.approx(now + 30)
    [again] = await store.claim_inbound(now + 31, 5, set())
    assert (again.id, again.state, again.last_error) == (m.id, "queued", "API 503")


async def test_a_message_walks_its_states_and_its_reply_goes_out(store: Store) -> None:
    """received -> queued -> submitting -> running -> answered, then the outbox sends the reply once."""
    a = admitted(new_task=True)
    [m] = a.messages
    await store.admit(a)
    now = time.time()
    [row] = await store.claim_inbound(now, 1, set())
    await store.count_crash(row.id, 1)
    files = [
        {"filename": "a.txt", "content_type": "text/plain", "path": "x/01.bin", "size": 1, "sha256": "ab"}
    ]
    await store.set_turn_input(row.id, input="What were the numbers?", files=files, skipped=[])
    await store.set_files(row.id, files)
    await store.mark_submitting(row.id, turn_seq=0, attempts=1)
    await store.mark_running(row.id, turn_seq=0)
    running = await store.inbound(row.id)
    assert running is not None
    assert (running.state, running.crashes, running.attempts, running.input) == (
        "running",
        0,
        1,
        "What were the numbers?",
    )
    out = reply(m)
    assert m.task_id is not None
    await store.finish(
        row.id,
        InboundState.ANSWERED,
        None,
        [out],
        turn_seq=0,
        task_id=m.task_id,
        task_url="https://t",
        task_turns=1,
    )
    await store.release_inbound(row.id)
    done = await store.inbound(row.id)
    assert done is not None and done.state == "answered"
    task = await store.task_row(m.task_id)
    assert task is not None and (task.turns, task.url) == (1, "https://t")
    assert await store.file_hashes_of_task(m.task_id, before="~") == {"ab"}
    assert await store.thread_chain(m.task_id, "~", limit=10) == [m.message_id, out.message_id]
    [due] = await store.claim_outbox(time.time(), 5, set())
    assert (due.id, due.data, due.recipient_list) == (out.id, out.data, ["alice@example.org"])
    assert await store.claim_outbox(time.time(), 5, {out.id}) == []
    await store.record_delivery(
        due.id, OutboxState.SENT, attempts=1, error="250 ok", sent_at=time.time(), refused={}
    )
    await store.release_outbox(due.id)
    assert await store.claim_outbox(time.time() + 3600, 5, set()) == []
    [sent] = await store.outbox_for(m.id)
    assert (sent.state, sent.attempts, sent.refused) == ("sent", 1, None)
    assert [o.id for o in await store.list_outbox("sent")] == [out.id]


async def test_a_replys_fallback_replaces_its_bytes_once(store: Store) -> None:
    """`use_fallback` makes the links-only version the message to send (same row, same Message-ID)."""
    from dataclasses import replace

    a = admitted(new_task=True)
    [m] = a.messages
    await store.admit(a)
    [row] = await store.claim_inbound(time.time(), 1, set())
    big = replace(reply(m), fallback=b"Subject: Re: Numbers\r\n\r\nThe files are linked.\r\n")
    await store.finish(row.id, InboundState.ANSWERED, None, [big], task_id=m.task_id)
    [due] = await store.claim_outbox(time.time(), 1, set())
    assert due.fallback == big.fallback
    await store.use_fallback(due.id)
    await store.use_fallback(due.id)  # nothing left to swap: no change
    swapped = await store.outbox_row(due.id)
    assert swapped is not None
    assert (swapped.data, swapped.fallback, swapped.message_id) == (big.fallback, None, big.message_id)


async def test_notice_counts_and_replays(store: Store) -> None:
    """Notices count per address and per task; a failed message and a dead reply can be replayed."""
    a = admitted(new_task=True)
    [m] = a.messages
    assert m.task_id is not None
    await store.admit(a)
    [row] = await store.claim_inbound(time.time(), 1, set())
    notice = reply(m, kind="notice", notice="gave_up")
    await store.finish(row.id, InboundState.FAILED, "gave up", [notice], task_id=m.task_id)
    await store.release_inbound(row.id)
    assert await store.count_notices("alice@example.org", 0.0) == 1
    assert await store.count_notices("alice@example.org", 0.0, "gave_up") == 1
    assert await store.count_notices("bob@example.org", 0.0) == 0
    assert await store.count_notices_for_task(m.task_id, "gave_up", 0.0) == 1
    assert await store.replay_inbound(m.id) is True
    assert await store.replay_inbound(m.id) is False  # received again, not failed
    [again] = await store.claim_inbound(time.time(), 1, set())
    assert (again.id, again.state, again.reason) == (m.id, "received", None)
    [due] = await store.claim_outbox(time.time(), 1, set())
    await store.record_delivery(due.id, OutboxState.DEAD, attempts=1, error="550 no")
    await store.release_outbox(due.id)
    assert await store.replay_outbox(due.id) is True
    replayed = await store.outbox_row(due.id)
    assert replayed is not None and (replayed.state, replayed.attempts) == ("retry", 0)


async def test_a_new_store_is_created_at_the_current_version(open_store: Opener) -> None:
    """A new store reports version 0 migrated to the current one; reopening finds nothing to do."""
    first = await open_store()
    assert (first.migrated_from, first.schema_version) == (0, first.schema_version)
    assert first.schema_version >= 1
    again = await open_store()
    assert again.migrated_from == again.schema_version


async def test_text_with_nul_characters_is_stored_and_found(store: Store) -> None:
    """A NUL in a header value neither fails the commit nor breaks the thread lookup by Message-ID."""
    a = admitted(new_task=True, subject="odd\x00subject", message_id="<nul\x00id@example.org>")
    await store.admit(a)
    [m] = a.messages
    row = await store.inbound(m.id)
    assert row is not None and row.subject.startswith("odd") and row.subject.endswith("subject")
    facts = await store.admission_facts(
        [],
        chain=["<nul\x00id@example.org>"],
        aliases=["research"],
        sender=m.sender,
        max_turns=9,
        max_new_tasks=9,
    )
    found = facts.by_chain["research"]
    assert found is not None and found.task_id == m.task_id


# --- PostgreSQL: several gateways on one database ----------------------------------------------------


async def test_two_gateways_never_claim_the_same_message(pg_url: str) -> None:
    """Two stores (two gateways) claiming at once get disjoint messages, together all of them."""
    one, two = await pg_store(pg_url), await pg_store(pg_url)
    try:
        for _ in range(20):
            await one.admit(admitted(new_task=True))
        now = time.time()
        first, second = await asyncio.gather(
            one.claim_inbound(now, 12, set()), two.claim_inbound(now, 12, set())
        )
        ids_one, ids_two = {r.id for r in first}, {r.id for r in second}
        assert not ids_one & ids_two
        assert len(ids_one | ids_two) == 20
    finally:
        await one.close()
        await two.close()


async def test_rate_limit_and_notice_counts_are_shared_between_gateways(pg_url: str) -> None:
    """What one gateway admitted and the notices it queued count towards the limits another one applies."""
    one, two = await pg_store(pg_url), await pg_store(pg_url)
    try:
        first = admitted(new_task=True)
        [m] = first.messages
        assert m.task_id is not None
        await one.admit(first)
        await one.admit(admitted(new_task=True))
        await one.admit(admitted(task=m.task_id))
        facts = await two.admission_facts(
            [],
            token_task_ids=[m.task_id],
            sender="alice@example.org",
            since=0.0,
            max_turns=5,
            max_new_tasks=5,
        )
        assert (facts.new_tasks, facts.turns) == (2, {m.task_id: 2})
        [row] = [r for r in await one.claim_inbound(time.time(), 5, set()) if r.id == m.id]
        notice = reply(m, kind="notice", notice="gave_up")
        await one.finish(row.id, InboundState.FAILED, "gave up", [notice], task_id=m.task_id)
        assert await two.count_notices("alice@example.org", 0.0, "gave_up") == 1
        assert await two.count_notices_for_task(m.task_id, "gave_up", 0.0) == 1
    finally:
        await one.close()
        await two.close()


async def test_a_dead_gateways_lease_runs_out_and_its_late_changes_are_refused(pg_url: str) -> None:
    """After the lease, another gateway claims the row; the first one's `finish` is refused whole."""
    dead, alive = await pg_store(pg_url, lease_seconds=1), await pg_store(pg_url, lease_seconds=1)
    try:
        a = admitted(new_task=True)
        [m] = a.messages
        await dead.admit(a)
        [row] = await dead.claim_inbound(time.time(), 1, set())
        for task in dead._background:  # the gateway stops renewing, as a frozen or dead one does
            task.cancel()
        assert await alive.claim_inbound(time.time(), 1, set()) == []
        due = await alive.next_due_after("inbound", time.time())
        assert due is not None and due - time.time() < 1.5  # it wakes when the lease runs out
        await until(_claims(alive, 1), timeout=5, what="the lease to run out")
        with pytest.raises(LeaseLost):
            await dead.finish(row.id, InboundState.ANSWERED, None, [reply(m)], task_id=m.task_id)
        assert await alive.outbox_for(m.id) == []  # the refused finish queued nothing
        stored = await alive.inbound(row.id)
        assert stored is not None and stored.state == "received"
        await alive.mark_running(row.id, turn_seq=0)  # the new owner's changes go through
    finally:
        await alive.close()
        await dead.close()


async def test_acknowledging_a_turn_another_gateway_holds_is_refused(pg_url: str) -> None:
    """`acknowledge` is fenced: a gateway that does not hold the message gets `LeaseLost` and its notice is
    not queued; the holder's goes through and it keeps the claim (the turn goes on)."""
    holder, other = await pg_store(pg_url), await pg_store(pg_url)
    try:
        a = admitted(new_task=True)
        [m] = a.messages
        await holder.admit(a)
        [row] = await holder.claim_inbound(time.time(), 1, set())
        await holder.mark_running(row.id, turn_seq=0)
        with pytest.raises(LeaseLost):
            await other.acknowledge(row.id, [reply(m, kind="notice", notice="working")])
        stored = await holder.inbound(row.id)
        assert stored is not None and stored.acked_at is None
        assert await holder.outbox_for(m.id) == []
        notice = reply(m, kind="notice", notice="working")
        await holder.acknowledge(row.id, [notice])
        stored = await holder.inbound(row.id)
        assert stored is not None and stored.acked_at is not None
        assert [o.id for o in await holder.outbox_for(m.id)] == [notice.id]
        assert await other.claim_inbound(time.time(), 1, set()) == []  # still held
    finally:
        await other.close()
        await holder.close()


async def test_gateways_recording_bounces_at_once_suppress_the_address_at_the_limit(pg_url: str) -> None:
    """Hard bounces of one address (of different replies) recorded by several gateways at the same moment
    are all counted: the address is suppressed once the limit is reached, whichever commits last. The
    moment is made: a transaction holds the replies' rows until every gateway's admit waits on a lock."""
    from dataclasses import replace

    import psycopg

    from mailgate.store import NewBounce

    gateways = [await pg_store(pg_url) for _ in range(4)]
    try:
        answers = []
        for _ in gateways:
            a = admitted(new_task=True)
            [m] = a.messages
            await gateways[0].admit(a)
            answers.append(reply(m))
            await gateways[0].finish(m.id, InboundState.ANSWERED, None, [answers[-1]], task_id=m.task_id)
        reports = []
        for answer in answers:
            report = admitted(state=InboundState.IGNORED)
            bounce = NewBounce(answer.id, "bob@example.org", "5.1.1", "550 no such user", True)
            batch = replace(report, bounces=[(report.messages[0].id, bounce)], received_at=time.time())
            reports.append(replace(batch, bounce_limit=len(gateways)))
        async with await psycopg.AsyncConnection.connect(pg_url) as blocker:
            await blocker.execute(
                "SELECT id FROM outbox WHERE id = ANY(%s::text[]) FOR UPDATE", [[a.id for a in answers]]
            )
            admits = [asyncio.ensure_future(g.admit(r)) for g, r in zip(gateways, reports, strict=True)]

            async def all_waiting() -> bool:
                cur = await blocker.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
                row = await cur.fetchone()
                return row is not None and row[0] == len(gateways)

            await until(all_waiting, timeout=10, what="every admit waiting on a lock")
            await blocker.rollback()
            await asyncio.gather(*admits)
        assert len(await gateways[0].bounces_of([a.id for a in answers])) == len(gateways)
        assert await gateways[0].is_suppressed("bob@example.org") is True
    finally:
        for g in gateways:
            await g.close()


def _claims(store: Any, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await store.claim_inbound(time.time(), n, set())) == n

    return check


async def test_a_lease_is_renewed_while_the_job_runs(pg_url: str) -> None:
    """A row in hand stays claimed past its lease time, because the holder keeps renewing it."""
    holder, other = await pg_store(pg_url, lease_seconds=1), await pg_store(pg_url, lease_seconds=1)
    try:
        await holder.admit(admitted(new_task=True))
        [row] = await holder.claim_inbound(time.time(), 1, set())
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # well past the 1 s lease: never claimable elsewhere
            assert await other.claim_inbound(time.time(), 1, set()) == []
            await asyncio.sleep(0.1)
        await holder.mark_running(row.id)
        await holder.release_inbound(row.id)
        assert [r.id for r in await other.claim_inbound(time.time(), 1, set())] == [row.id]
    finally:
        await holder.close()
        await other.close()


async def test_closing_hands_back_every_lease_at_once(pg_url: str) -> None:
    """A gateway that stops cleanly releases its claims: another takes them without waiting for the lease."""
    leaving, staying = await pg_store(pg_url), await pg_store(pg_url)
    try:
        for _ in range(3):
            await leaving.admit(admitted(new_task=True))
        await leaving.claim_inbound(time.time(), 3, set())
        await leaving.close()
        assert len(await staying.claim_inbound(time.time(), 5, set())) == 3
    finally:
        await staying.close()


async def test_notify_wakes_the_other_gateways_loops(pg_url: str) -> None:
    """Admitted mail wakes every gateway's scheduler; a finish with replies wakes their outboxes."""
    one, two = await pg_store(pg_url), await pg_store(pg_url)
    woken: list[str] = []
    try:
        await two.watch(on_inbound=lambda: woken.append("inbound"), on_outbox=lambda: woken.append("outbox"))
        await until(lambda: woken.count("inbound") >= 1, timeout=5, what="the listener")  # its first look
        woken.clear()
        a = admitted(new_task=True)
        [m] = a.messages
        await one.admit(a)
        await until(lambda: "inbound" in woken, timeout=5, what="a wake-up for the admitted mail")
        assert "outbox" not in woken
        [row] = await one.claim_inbound(time.time(), 1, set())
        await one.finish(row.id, InboundState.ANSWERED, None, [reply(m)], task_id=m.task_id)
        await until(lambda: "outbox" in woken, timeout=5, what="a wake-up for the queued reply")
    finally:
        await one.close()
        await two.close()


async def test_gateways_migrating_at_once_take_turns(pg_url: str) -> None:
    """Several gateways starting together on a new database: one migrates, the others find it done."""
    stores = await asyncio.gather(*(pg_store(pg_url) for _ in range(4)))
    try:
        assert sorted(s.migrated_from for s in stores)[1:] == [stores[0].schema_version] * 3
        assert sorted(s.migrated_from for s in stores)[0] == 0
    finally:
        for s in stores:
            await s.close()


async def test_a_database_newer_than_this_mailgate_is_refused(pg_url: str) -> None:
    """A schema version this mailgate does not know stops it at start-up (StoreBusy -> exit 3)."""
    import psycopg

    from mailgate.errors import StoreBusy

    await (await pg_store(pg_url)).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(StoreBusy, match="newer than this mailgate"):
        await pg_store(pg_url)


async def test_a_version_1_database_is_migrated_and_keeps_its_rows(pg_url: str) -> None:
    """A database at schema version 1 gets the later versions' columns and tables on opening (a reply's
    links-only version; bounces, suppression, the relay's reply in its own column); its rows stay, and
    the new columns read back empty."""
    import psycopg

    from mailgate.store import pg_schema

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(pg_schema.MIGRATIONS[0])
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO outbox (id, kind, message_id, mail_from, recipients, data, state, created_at, "
            "updated_at, last_error) VALUES ('o1', 'answer', '<r1@agents>', 'research@agents.example.com', "
            "'[\"alice@example.org\"]', '\\x00ff'::bytea, 'sent', 1.0, 2.0, '250 2.0.0 Ok: queued')"
        )
    store = await pg_store(pg_url)
    try:
        row = await store.outbox_row("o1")
        assert (store.migrated_from, store.schema_version) == (1, pg_schema.VERSION)
        assert await store.bounces_of(["o1"]) == [] and await store.suppressed() == []
    finally:
        await store.close()
    assert row is not None and (row.data, row.state, row.fallback) == (b"\x00\xff", "sent", None)
    # version 3: the relay's reply a sent row kept as its "error" moves to its own column
    assert (row.relay_reply, row.last_error, row.bounced_at) == ("250 2.0.0 Ok: queued", None, None)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(pg_schema.VERSION,)]
