"""The store on its own, driven through `Store`'s named operations only: every test that is about an
operation's promise runs on both backends (`store`: a real SQLite file, and a fresh PostgreSQL database on
the session's server); schema versions of the SQLite file and SQLite's group commit are SQLite's own.

What each operation promises (one transaction, the per-task order of turns, what replay accepts) is
asserted on the rows read back, and where it matters on a second connection to the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from mailgate.errors import RawMissing, StoreBusy
from mailgate.models import InboundState, OutboxState, TaskRef
from mailgate.store import Admitted, NewBounce, NewMessage, NewReply, NewTask, SqliteStore, Store
from mailgate.store.schema import ACTIVE, MIGRATIONS, VERSION

pytestmark = pytest.mark.anyio

OWNER = "alice@example.org"
NEW_COLUMNS = ("in_reply_to", "refs", "to_cc", "sender_name")
TERMINAL = tuple(s for s in InboundState if s not in ACTIVE)
FINISHED = (InboundState.ANSWERED, InboundState.IGNORED, InboundState.FAILED)


async def task_by_chain(store: Store, message_ids: list[str], alias: str) -> TaskRef | None:
    """The task the Message-IDs name for `alias`, as admission reads it."""
    facts = await store.admission_facts(
        [], chain=message_ids, aliases=[alias], sender="x@example.org", max_turns=1, max_new_tasks=1
    )
    return facts.by_chain.get(alias)


async def duplicate_of(store: Store, key: str) -> str | None:
    """The queue id a dedupe key was committed under, as admission reads it."""
    facts = await store.admission_facts([key], max_turns=1, max_new_tasks=1)
    return facts.duplicates[key]


Opener = Callable[[str], Awaitable[Store]]


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """`await open_store(name)` opens the store called `name` (an SQLite file, or a PostgreSQL database
    made for this test); the same name opens the same store again. The caller closes it."""
    urls: dict[str, str] = {}

    async def open_(name: str) -> Store:
        if request.param == "sqlite":
            return await SqliteStore.open(tmp_path / f"{name}.db")
        from mailgate.store.postgres import PostgresStore

        if name not in urls:
            urls[name] = request.getfixturevalue("postgres_dbs")()
        return await PostgresStore.open(urls[name])

    return open_


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[Store]:
    """The test's store, on each backend."""
    s = await open_store("store")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(tmp_path / "store.db")
    try:
        yield s
    finally:
        await s.close()


def new_task(*, owner: str = OWNER, created_at: float | None = None) -> NewTask:
    return NewTask(
        id=f"tsk_{ULID()}",
        alias="research",
        worker_id="wrk_research",
        owner=owner,
        budget="standard",
        subject="Quarterly numbers",
        created_at=time.time() if created_at is None else created_at,
    )


def new_message(
    task_id: str | None,
    *,
    state: str = InboundState.RECEIVED,
    received_at: float | None = None,
    message_id: str | None = None,
    dedupe_key: str | None = None,
    raw_id: str = "",
) -> NewMessage:
    mid = str(ULID())
    return NewMessage(
        id=mid,
        raw_id=raw_id,
        received_at=time.time() if received_at is None else received_at,
        mail_from=OWNER,
        rcpt="research@agents.example.com",
        alias="research",
        sender=OWNER,
        message_id=message_id if message_id is not None else f"<{mid}@example.org>",
        subject="Quarterly numbers",
        dedupe_key=dedupe_key or f"key-{mid}",
        state=state,
        task_id=task_id,
        in_reply_to="<earlier@example.org>",
        refs="<first@example.org> <earlier@example.org>",
        to_cc=json.dumps(["research@agents.example.com", "bob@example.org"]),
        sender_name="Alice Example",
    )


def admitted(
    *messages: NewMessage,
    tasks: Sequence[NewTask] = (),
    participants: Sequence[tuple[str, str]] = (),
    thread_ids: Sequence[tuple[str, str]] = (),
    data: bytes = b"Subject: Quarterly numbers\r\n\r\nPlease summarise.\r\n",
) -> Admitted:
    """One DATA's commit: `messages` are re-pointed at a fresh raw message id."""
    raw_id = str(ULID())
    return Admitted(
        raw_id=raw_id,
        sha256=hashlib.sha256(data).hexdigest(),
        data=data,
        messages=[NewMessage(**{**m.__dict__, "raw_id": raw_id}) for m in messages],
        tasks=tasks,
        participants=participants,
        thread_ids=thread_ids,
    )


async def one_task_message(store: Store, **kwargs: Any) -> tuple[NewTask, NewMessage]:
    """A new task and its first message, committed."""
    task = new_task()
    message = new_message(task.id, **kwargs)
    batch = admitted(message, tasks=[task], participants=[(task.id, OWNER)])
    await store.admit(batch)
    return task, batch.messages[0]


def reply(
    inbound_id: str | None, task_id: str | None, *, message_id: str | None = None, kind: str = "answer"
) -> NewReply:
    rid = str(ULID())
    return NewReply(
        id=rid,
        inbound_id=inbound_id,
        task_id=task_id,
        kind=kind,
        notice=None if kind == "answer" else "gave_up",
        message_id=message_id or f"<{rid}.mailgate@agents.example.com>",
        mail_from="research@agents.example.com",
        recipients=[OWNER, "bob@example.org"],
        data=b"Subject: Re: Quarterly numbers\r\n\r\nThe answer.\r\n",
        created_at=time.time(),
    )


def pragma_user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.close()
    return version


def columns_of(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as db:
        names = {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}
    db.close()
    return names


# --- opening: schema versions -------------------------------------------------------------------------


def make_v1_store(path: Path, user_version: int) -> None:
    """A store as version 1 left it: its tables only, with a task, a message and a reply in them."""
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])
        db.execute("INSERT INTO raw_message VALUES ('raw1', 'abc', 5, x'68656c6c6f')")
        db.execute(
            "INSERT INTO task (id, alias, worker_id, owner, budget, subject, created_at, turns) "
            "VALUES ('tsk_1', 'research', 'wrk_research', ?, 'high', 'Old', 100.0, 2)",
            (OWNER,),
        )
        db.execute(
            "INSERT INTO inbound (id, raw_id, received_at, updated_at, mail_from, rcpt, alias, sender, "
            "message_id, subject, dedupe_key, task_id, state, input, attempts) VALUES ('m1', 'raw1', 100.0, "
            "101.0, ?, 'research@agents.example.com', 'research', ?, '<old@example.org>', 'Old', 'k1', "
            "'tsk_1', 'answered', 'the old input', 1)",
            (OWNER, OWNER),
        )
        db.execute(
            "INSERT INTO outbox (id, inbound_id, task_id, kind, message_id, mail_from, recipients, data, "
            "state, created_at, updated_at) VALUES ('o1', 'm1', 'tsk_1', 'answer', '<r1@agents>', "
            "'research@agents.example.com', ?, x'00', 'sent', 102.0, 103.0)",
            (json.dumps([OWNER]),),
        )
        db.execute("INSERT INTO thread_message VALUES ('<old@example.org>', 'tsk_1', 'in')")
        db.execute(f"PRAGMA user_version={user_version}")
    db.close()


@pytest.mark.parametrize("user_version", [0, 1], ids=["unversioned", "version-1"])
async def test_a_version_1_store_is_migrated_and_keeps_its_rows(tmp_path: Path, user_version: int) -> None:
    """A version 1 store (recorded as 0 or 1) gets the new columns and the current version; old rows stay."""
    path = tmp_path / "old.db"
    make_v1_store(path, user_version)
    assert not set(NEW_COLUMNS) & columns_of(path, "inbound")
    store = await SqliteStore.open(path)
    try:
        row = await store.inbound("m1")
        task = await store.task_row("tsk_1")
        sent = await store.outbox_row("o1")
        found = await task_by_chain(store, ["<old@example.org>"], "research")
        raw = await store.raw("raw1")
    finally:
        await store.close()
    assert set(NEW_COLUMNS) <= columns_of(path, "inbound")
    assert pragma_user_version(path) == VERSION
    assert row is not None
    assert (row.state, row.input, row.attempts, row.updated_at) == ("answered", "the old input", 1, 101.0)
    assert (row.in_reply_to, row.refs, row.to_cc, row.sender_name) == (None, None, None, None)
    assert row.to_cc_addrs == [] and row.reference_ids == []
    assert task is not None and (task.turns, task.budget) == (2, "high")
    assert sent is not None and (sent.state, sent.recipient_list) == ("sent", [OWNER])
    assert found == TaskRef("tsk_1", "research", OWNER)
    assert raw == b"hello"


async def test_a_version_1_store_missing_an_index_gets_it(tmp_path: Path) -> None:
    """An unversioned store a partial first start left without an index gets the index on opening."""
    path = tmp_path / "partial.db"
    make_v1_store(path, 0)
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX inbound_due")
    db.close()
    await (await SqliteStore.open(path)).close()
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    db.close()
    assert "inbound_due" in indexes


async def test_a_new_store_is_created_at_the_current_version_and_reopens(tmp_path: Path) -> None:
    """A fresh file gets every table at the current version; opening it again changes nothing."""
    path = tmp_path / "deep" / "dir" / "new.db"
    store = await SqliteStore.open(path)
    _, message = await one_task_message(store)
    await store.close()
    store = await SqliteStore.open(path)
    try:
        row = await store.inbound(message.id)
    finally:
        await store.close()
    assert pragma_user_version(path) == VERSION
    assert set(NEW_COLUMNS) <= columns_of(path, "inbound")
    assert row is not None and row.sender_name == "Alice Example"


async def test_a_store_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    """A store whose schema version is above this mailgate's is not opened (and not touched)."""
    path = tmp_path / "future.db"
    make_v1_store(path, VERSION + 1)
    with pytest.raises(StoreBusy, match="newer than this mailgate"):
        await SqliteStore.open(path)
    assert pragma_user_version(path) == VERSION + 1
    assert not set(NEW_COLUMNS) & columns_of(path, "inbound")


# --- admit: one DATA, one transaction ---------------------------------------------------------------


async def test_admit_commits_the_raw_message_and_every_row(store: Store) -> None:
    """The raw bytes, the task, both recipients' rows, the participants and the thread ids all land."""
    task = new_task()
    first = new_message(task.id, message_id="<q1@example.org>")
    second = new_message(None, state=InboundState.IGNORED, message_id="<q1@example.org>")
    batch = admitted(
        first,
        second,
        tasks=[task],
        participants=[(task.id, OWNER), (task.id, "bob@example.org")],
        thread_ids=[("<q1@example.org>", task.id)],
        data=b"Subject: x\r\n\r\nthe exact bytes\r\n",
    )
    before = store.batches
    await store.admit(batch)
    assert store.batches == before + 1
    assert await store.raw(batch.raw_id) == b"Subject: x\r\n\r\nthe exact bytes\r\n"
    rows = [await store.inbound(m.id) for m in batch.messages]
    assert [r.state if r else None for r in rows] == ["received", "ignored"]
    assert rows[0] is not None and rows[0].updated_at == rows[0].received_at
    assert rows[0].in_reply_to_ids == ["<earlier@example.org>"]
    assert rows[0].reference_ids == ["<first@example.org>", "<earlier@example.org>"]
    assert rows[0].to_cc_addrs == ["research@agents.example.com", "bob@example.org"]
    assert rows[0].sender_name == "Alice Example"
    assert await store.task(task.id) == TaskRef(task.id, "research", OWNER)
    assert await store.participants(task.id) == ["alice@example.org", "bob@example.org"]
    assert await task_by_chain(store, ["<q1@example.org>"], "research") == TaskRef(task.id, "research", OWNER)
    assert await duplicate_of(store, batch.messages[0].dedupe_key) == batch.messages[0].id


async def test_a_duplicate_dedupe_key_fails_the_whole_admit(store: Store) -> None:
    """A second DATA reusing a committed dedupe key is refused whole: no raw bytes, task or row of it."""
    _, committed = await one_task_message(store)
    task = new_task()
    fresh = new_message(task.id)
    clash = new_message(task.id, dedupe_key=committed.dedupe_key)
    batch = admitted(fresh, clash, tasks=[task], participants=[(task.id, "carol@example.org")])
    with pytest.raises(StoreBusy, match="commit failed"):
        await store.admit(batch)
    with pytest.raises(RawMissing, match="missing"):
        await store.raw(batch.raw_id)
    assert await store.task_row(task.id) is None
    assert await store.inbound(batch.messages[0].id) is None
    assert await store.participants(task.id) == []
    assert await duplicate_of(store, committed.dedupe_key) == committed.id


@pytest.mark.parametrize("callers", [8, 40])
async def test_concurrent_admits_share_transactions(sqlite_store: SqliteStore, callers: int) -> None:
    """SQLite: many callers at once commit in fewer transactions than callers, and every row is there."""
    store = sqlite_store
    batches = [admitted(new_message(t.id), tasks=[t]) for t in (new_task() for _ in range(callers))]
    before = store.batches
    await asyncio.gather(*(store.admit(b) for b in batches))
    assert store.batches - before < callers
    for batch in batches:
        assert await store.inbound(batch.messages[0].id) is not None


@pytest.mark.parametrize("bad", [0, 7, 14])
async def test_one_failing_caller_in_a_batch_fails_alone(store: Store, bad: int) -> None:
    """In a shared transaction, the one admit that breaks a constraint fails; the others commit."""
    _, committed = await one_task_message(store)
    batches = []
    for n in range(15):
        task = new_task()
        key = committed.dedupe_key if n == bad else None
        batches.append(admitted(new_message(task.id, dedupe_key=key), tasks=[task]))
    results = await asyncio.gather(*(store.admit(b) for b in batches), return_exceptions=True)
    failed = [n for n, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [bad]
    assert isinstance(results[bad], StoreBusy)
    for n, batch in enumerate(batches):
        row = await store.inbound(batch.messages[0].id)
        assert (row is None) == (n == bad)
        assert (await store.task_row(batch.tasks[0].id) is None) == (n == bad)


# --- which messages may run ----------------------------------------------------------------------------


@pytest.mark.parametrize("first_state", list(InboundState))
@pytest.mark.parametrize("second_state", [InboundState.RECEIVED, InboundState.QUEUED])
async def test_a_tasks_second_message_waits_while_its_first_is_active(
    store: Store, first_state: str, second_state: str
) -> None:
    """Turns of one task run in order: a second message ready for its turn is runnable only once the
    first has ended; one still to be read, once the first has been read (a `/status` is answered while
    a turn runs)."""
    task = new_task()
    first = new_message(task.id, state=first_state)
    second = new_message(task.id, state=second_state)
    await store.admit(admitted(first, tasks=[task]))
    await store.admit(admitted(second))
    runnable = await runnable_ids(store, time.time(), 10, set())
    if first_state not in ACTIVE:
        assert runnable == [second.id]
    elif second_state == InboundState.RECEIVED and first_state != InboundState.RECEIVED:
        assert runnable == [first.id, second.id]
    else:
        assert runnable == [first.id]
    assert await store.task_busy_before(task.id, second.id) is (first_state in ACTIVE)
    assert await store.task_busy_before(task.id, first.id) is False


async def runnable_ids(store: Store, now: float, limit: int, busy: set[str]) -> list[str]:
    """The ids `claim_inbound` hands out (claiming them: a claim is not a change of the row)."""
    return [row.id for row in await store.claim_inbound(now, limit, busy)]


async def test_runnable_ids_honour_next_attempt_at_busy_and_limit(store: Store) -> None:
    """A row is runnable from its `next_attempt_at` on; busy ids and the limit are respected; a task's
    next message stays behind a first that waits for a later time."""
    now = time.time()
    waiting_task, waiting = await one_task_message(store)
    behind = new_message(waiting_task.id)
    await store.admit(admitted(behind))
    await store.reschedule(waiting.id, now + 60)
    others = [(await one_task_message(store))[1] for _ in range(3)]
    assert await runnable_ids(store, now, 10, set()) == [m.id for m in others]
    assert await runnable_ids(store, now, 2, set()) == [m.id for m in others[:2]]
    assert await runnable_ids(store, now, 2, {others[0].id}) == [m.id for m in others[1:]]
    assert await runnable_ids(store, now + 61, 10, set()) == [waiting.id] + [m.id for m in others]
    assert await store.next_due_after("inbound", now) == pytest.approx(now + 60)
    assert await store.next_due_after("inbound", now + 61) is None


# --- state changes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "stamped"),
    [
        ({}, False),
        ({"state": InboundState.QUEUED}, True),
        ({"error": "503 from the API"}, True),
        ({"crashes": 2}, True),
    ],
    ids=["plain-wait", "state", "error", "crashes"],
)
async def test_reschedule_stamps_updated_at_only_when_something_changes(
    store: Store, change: dict[str, Any], stamped: bool
) -> None:
    """A plain wait keeps `updated_at` (since when the row is in its state); a change stamps it."""
    _, message = await one_task_message(store, received_at=1000.0)
    before = time.time()
    await store.reschedule(message.id, before + 30, **change)
    row = await store.inbound(message.id)
    assert row is not None
    assert row.next_attempt_at == before + 30
    if stamped:
        assert row.updated_at >= before
    else:
        assert row.updated_at == 1000.0
    assert row.state == change.get("state", InboundState.RECEIVED)
    assert row.last_error == change.get("error")
    assert row.crashes == change.get("crashes", 0)


async def test_reschedule_caps_the_error(store: Store) -> None:
    """The error kept on a row is capped at 500 characters."""
    _, message = await one_task_message(store)
    await store.reschedule(message.id, 0.0, error="x" * 2000)
    row = await store.inbound(message.id)
    assert row is not None and row.last_error == "x" * 500


async def test_finish_ends_the_message_with_its_replies_in_one_transaction(store: Store) -> None:
    """The outbox rows, their thread ids, the task's progress and the message's end commit together."""
    task, message = await one_task_message(store)
    await store.reschedule(message.id, time.time() + 60, state=InboundState.RUNNING)
    replies = [reply(message.id, task.id), reply(message.id, task.id, kind="notice")]
    before = store.batches
    await store.finish(
        message.id,
        InboundState.ANSWERED,
        None,
        replies,
        turn_seq=3,
        task_id=task.id,
        task_url="https://handinger.test/t/1",
        task_turns=4,
    )
    assert store.batches == before + 1
    row = await store.inbound(message.id)
    assert row is not None
    assert (row.state, row.reason, row.turn_seq, row.next_attempt_at) == ("answered", None, 3, 0)
    rows = await store.outbox_for(message.id)
    assert [(r.id, r.state, r.kind) for r in rows] == [(r.id, "pending", r.kind) for r in replies]
    assert rows[0].recipient_list == [OWNER, "bob@example.org"]
    assert rows[0].data == replies[0].data and rows[0].updated_at == replies[0].created_at
    for sent in replies:
        assert await task_by_chain(store, [sent.message_id], "research") == TaskRef(
            task.id, "research", OWNER
        )
    task_row = await store.task_row(task.id)
    assert task_row is not None and (task_row.turns, task_row.url) == (4, "https://handinger.test/t/1")


async def test_a_failing_finish_leaves_everything_as_it_was(store: Store) -> None:
    """A reply whose Message-ID is taken fails the finish whole: message, task and outbox unchanged."""
    task, first = await one_task_message(store)
    taken = reply(first.id, task.id)
    await store.finish(first.id, InboundState.ANSWERED, None, [taken], task_id=task.id, task_turns=1)
    second = new_message(task.id)
    await store.admit(admitted(second))
    clash = [reply(second.id, task.id), reply(second.id, task.id, message_id=taken.message_id)]
    with pytest.raises(StoreBusy):
        await store.finish(second.id, InboundState.ANSWERED, None, clash, task_id=task.id, task_turns=2)
    row = await store.inbound(second.id)
    assert row is not None and row.state == InboundState.RECEIVED
    assert await store.outbox_for(second.id) == []
    assert await store.outbox_row(clash[0].id) is None
    assert await task_by_chain(store, [clash[0].message_id], "research") is None
    task_row = await store.task_row(task.id)
    assert task_row is not None and task_row.turns == 1


async def test_finish_without_task_progress_leaves_the_task_alone(store: Store) -> None:
    """A message that ends before any turn (no `task_turns`) does not touch its task's counters."""
    task, message = await one_task_message(store)
    await store.finish(message.id, InboundState.FAILED, "empty", [], task_id=task.id)
    row = await store.inbound(message.id)
    task_row = await store.task_row(task.id)
    assert row is not None and (row.state, row.reason) == ("failed", "empty")
    assert task_row is not None and (task_row.turns, task_row.url) == (0, None)


async def pending_reply(store: Store) -> str:
    """A committed answer in the outbox; its id."""
    task, message = await one_task_message(store)
    answer = reply(message.id, task.id)
    await store.finish(message.id, InboundState.ANSWERED, None, [answer], task_id=task.id, task_turns=1)
    return answer.id


@pytest.mark.parametrize(
    ("state", "kwargs", "expect"),
    [
        (
            OutboxState.SENT,
            {"error": None, "reply": "250 2.0.0 Ok: queued as Q1", "refused": {}, "sent_at": 1234.5},
            {
                "last_error": None,
                "relay_reply": "250 2.0.0 Ok: queued as Q1",
                "refused": None,
                "sent_at": 1234.5,
            },
        ),
        (
            OutboxState.RETRY,
            {"error": "deferred", "next_attempt_at": 99.0, "refused": {"bob@example.org": "451 4.3.0 later"}},
            {"next_attempt_at": 99.0, "refused": '{"bob@example.org": "451 4.3.0 later"}', "sent_at": None},
        ),
        (OutboxState.DEAD, {"error": ""}, {"last_error": None, "refused": None, "sent_at": None}),
        (OutboxState.DEAD, {"error": "5" * 3000}, {"last_error": "5" * 1000}),
    ],
    ids=["sent", "retry-partial", "dead-no-error", "dead-long-error"],
)
async def test_record_delivery_writes_the_attempts_outcome(
    store: Store, state: str, kwargs: dict[str, Any], expect: dict[str, Any]
) -> None:
    """Each delivery outcome is recorded with its attempts, error (capped), the relay's reply, refusals and
    send time."""
    outbox_id = await pending_reply(store)
    await store.record_delivery(outbox_id, state, attempts=3, **kwargs)
    row = await store.outbox_row(outbox_id)
    assert row is not None
    assert (row.state, row.attempts) == (state, 3)
    assert {key: getattr(row, key) for key in expect} == expect


async def test_due_outbox_rows_exclude_sent_future_and_busy(store: Store) -> None:
    """`claim_outbox` hands out pending and retry rows that are due, minus those in hand, oldest first."""
    ids = [await pending_reply(store) for _ in range(4)]
    now = time.time()
    await store.record_delivery(ids[0], OutboxState.SENT, attempts=1, error="250")
    await store.record_delivery(ids[1], OutboxState.RETRY, attempts=1, error="451", next_attempt_at=now + 60)
    await store.record_delivery(ids[2], OutboxState.RETRY, attempts=1, error="451", next_attempt_at=now - 1)
    assert [r.id for r in await store.claim_outbox(now, 10, set())] == [ids[2], ids[3]]
    assert [r.id for r in await store.claim_outbox(now, 10, {ids[2]})] == [ids[3]]
    assert [r.id for r in await store.claim_outbox(now + 61, 1, set())] == [ids[1]]
    assert await store.next_due_after("outbox", now) == now + 60


# --- replay and restart ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "with_input"),
    [(state, False) for state in InboundState]
    + [(InboundState.FAILED, True), (InboundState.IGNORED, True), (InboundState.ANSWERED, True)],
)
async def test_replay_inbound_accepts_only_failed_and_ignored(
    store: Store, state: str, with_input: bool
) -> None:
    """Only a failed or ignored message is replayed, back to `received` (or `queued` with its input)."""
    task, message = await one_task_message(store)
    if with_input:
        await store.set_turn_input(message.id, input="the input", files=[], skipped=[])
    await store.mark_submitting(message.id, turn_seq=0, attempts=2)
    await store.finish(message.id, state, "why it ended", task_id=task.id)
    await store.reschedule(message.id, 5000.0, error="old error", crashes=4)
    replayed = await store.replay_inbound(message.id)
    row = await store.inbound(message.id)
    assert row is not None
    if state in (InboundState.FAILED, InboundState.IGNORED):
        assert replayed is True
        assert row.state == (InboundState.QUEUED if with_input else InboundState.RECEIVED)
        assert (row.reason, row.crashes, row.next_attempt_at, row.last_error) == (None, 0, 0, None)
        assert row.attempts == 2  # kept: an earlier POST is looked for before a new one
    else:
        assert replayed is False
        assert (row.state, row.reason, row.crashes) == (state, "why it ended", 4)


async def test_replay_of_an_unknown_id_is_refused(store: Store) -> None:
    """Replaying an id the store does not hold answers False for both tables."""
    assert await store.replay_inbound("no-such-id") is False
    assert await store.replay_outbox("no-such-id") is False


@pytest.mark.parametrize("state", list(OutboxState))
async def test_replay_outbox_accepts_only_dead(store: Store, state: str) -> None:
    """Only a dead reply is replayed: back to `retry`, due now, its attempts and error cleared."""
    outbox_id = await pending_reply(store)
    await store.record_delivery(outbox_id, state, attempts=5, error="550 5.1.1 no", next_attempt_at=9e9)
    before = time.time()
    replayed = await store.replay_outbox(outbox_id)
    row = await store.outbox_row(outbox_id)
    assert row is not None
    if state == OutboxState.DEAD:
        assert replayed is True
        assert (row.state, row.attempts, row.next_attempt_at, row.last_error) == ("retry", 0, 0, None)
        assert row.created_at >= before  # the retry horizon starts again
    else:
        assert replayed is False
        assert (row.state, row.attempts) == (state, 5)


async def test_reset_for_restart_makes_in_flight_rows_due_now(store: Store) -> None:
    """After a restart every active row waiting for later is due now; ended rows and due rows keep theirs."""
    later = time.time() + 3600
    waiting = {}
    for state in (*ACTIVE, *TERMINAL):
        _, message = await one_task_message(store)
        await store.reschedule(message.id, later, state=state)
        waiting[state] = message.id
    _, due = await one_task_message(store)
    await store.reschedule(due.id, 5.0)
    before = time.time()
    await store.reset_for_restart()
    after = time.time()
    for state, inbound_id in waiting.items():
        row = await store.inbound(inbound_id)
        assert row is not None and row.state == state
        if state in ACTIVE:
            assert before <= row.next_attempt_at <= after
        else:
            assert row.next_attempt_at == later
    due_row = await store.inbound(due.id)
    assert due_row is not None and due_row.next_attempt_at == 5.0


# --- small reads -------------------------------------------------------------------------------------------


async def test_the_secret_is_made_once_and_survives_reopening(open_store: Opener) -> None:
    """The reply-token key is generated on first use, then always the same, also after reopening."""
    store = await open_store("a")
    try:
        first = await store.secret()
        again = await store.secret()
        batches = store.batches
        assert await store.secret() == first
        assert store.batches == batches  # read, not written, once it exists
    finally:
        await store.close()
    store = await open_store("a")
    try:
        reopened = await store.secret()
    finally:
        await store.close()
    other = await open_store("b")
    try:
        elsewhere = await other.secret()
    finally:
        await other.close()
    assert first == again == reopened
    assert len(first) >= 40
    assert elsewhere != first


async def test_concurrent_first_uses_of_the_secret_agree(store: Store) -> None:
    """Two callers asking for the secret at once on a fresh store get the same one."""
    results = await asyncio.gather(*(store.secret() for _ in range(5)))
    assert len(set(results)) == 1


async def thread_of(store: Store, count: int) -> tuple[NewTask, list[NewMessage], dict[str, list[str]]]:
    """A task with `count` messages; each but the last got one reply (message 2 got two)."""
    task = new_task()
    messages: list[NewMessage] = []
    sent: dict[str, list[str]] = {}
    for n in range(count):
        message = new_message(task.id, message_id="" if n == 1 else f"<in{n}@example.org>")
        await store.admit(admitted(message, tasks=[task] if n == 0 else []))
        messages.append(message)
        if n == count - 1:
            break
        replies = [reply(message.id, task.id, message_id=f"<out{n}.{k}@agents>") for k in range(1 + (n == 2))]
        await store.finish(
            message.id, InboundState.ANSWERED, None, replies, task_id=task.id, task_turns=n + 1
        )
        sent[message.id] = [r.message_id for r in replies]
    return task, messages, sent


async def test_thread_chain_lists_both_directions_oldest_first(store: Store) -> None:
    """The chain is each earlier message's id followed by mailgate's replies to it; no id is skipped."""
    task, messages, _ = await thread_of(store, 5)
    chain = await store.thread_chain(task.id, messages[-1].id, limit=10)
    assert chain == [
        "<in0@example.org>",
        "<out0.0@agents>",
        "<out1.0@agents>",  # message 1 had no Message-ID of its own
        "<in2@example.org>",
        "<out2.0@agents>",
        "<out2.1@agents>",
        "<in3@example.org>",
        "<out3.0@agents>",
    ]
    assert await store.thread_chain(task.id, messages[1].id, limit=10) == [
        "<in0@example.org>",
        "<out0.0@agents>",
    ]
    assert await store.thread_chain(task.id, messages[0].id, limit=10) == []


@pytest.mark.parametrize(("limit", "kept"), [(1, [0]), (2, [0, 3]), (3, [0, 2, 3]), (4, [0, 1, 2, 3])])
async def test_thread_chain_keeps_the_first_and_the_newest_messages(
    store: Store, limit: int, kept: list[int]
) -> None:
    """Over `limit` messages, the chain keeps the first message and the newest `limit - 1`."""
    task, messages, sent = await thread_of(store, 5)
    chain = await store.thread_chain(task.id, messages[-1].id, limit=limit)
    want: list[str] = []
    for n in kept:
        own = messages[n].message_id
        want += ([own] if own else []) + sent[messages[n].id]
    assert chain == want


async def test_file_hashes_of_task_are_the_earlier_messages_files(store: Store) -> None:
    """The hashes of files sent by a task's messages older than the given one, of that task only."""
    task, first = await one_task_message(store)
    second, third = new_message(task.id), new_message(task.id)
    await store.admit(admitted(second))
    await store.admit(admitted(third))
    _, elsewhere = await one_task_message(store)

    def files(*hashes: str) -> list[dict[str, Any]]:
        return [
            {"filename": f"{h}.txt", "content_type": "text/plain", "path": "/x", "size": 1, "sha256": h}
            for h in hashes
        ]

    await store.set_turn_input(first.id, input="1", files=files("aa", "bb"), skipped=[])
    await store.set_turn_input(second.id, input="2", files=files("cc"), skipped=[])
    await store.set_turn_input(third.id, input="3", files=files("dd"), skipped=[])
    await store.set_turn_input(elsewhere.id, input="4", files=files("ee"), skipped=[])
    assert await store.file_hashes_of_task(task.id, before=first.id) == set()
    assert await store.file_hashes_of_task(task.id, before=second.id) == {"aa", "bb"}
    assert await store.file_hashes_of_task(task.id, before=third.id) == {"aa", "bb", "cc"}


# --- issue 19: held mail, the stored allow list, the loop breaker's counts ---------------------------------


async def test_held_mail_is_told_once_then_approved_or_denied(store: Store) -> None:
    """A held message is listed until its sender is told (once); approve makes it `received` and
    runnable, deny makes it `ignored`; neither works on a message that is not held."""
    task = new_task(owner="stranger@elsewhere.example")
    held = new_message(task.id, state=InboundState.HELD)
    other = new_message(task.id, state=InboundState.HELD)
    await store.admit(admitted(held, other, tasks=[task]))
    assert await runnable_ids(store, time.time(), 10, set()) == []
    assert [r.id for r in await store.held_untold()] == [held.id, other.id]
    notice = reply(held.id, task.id, kind="notice")
    assert await store.tell_held(held.id, [notice]) is True
    assert await store.tell_held(held.id, [reply(held.id, task.id, kind="notice")]) is False
    assert [r.id for r in await store.outbox_for(held.id)] == [notice.id]  # told once
    assert [r.id for r in await store.held_untold()] == [other.id]

    approved = await store.approve_held(held.id)
    assert approved is not None and approved.state == InboundState.RECEIVED
    assert approved.told_at is not None
    assert await runnable_ids(store, time.time(), 10, set()) == [held.id]
    assert await store.approve_held(held.id) is None
    assert await store.deny_held(held.id) is False

    assert await store.deny_held(other.id) is True
    row = await store.inbound(other.id)
    assert row is not None and row.state == InboundState.IGNORED and "denied" in (row.reason or "")
    assert await store.approve_held(other.id) is None
    assert await store.held_untold() == []


async def test_held_mail_older_than_the_limit_is_dropped(store: Store) -> None:
    """`drop_held` ends the held messages received before the time given (returned as they were) and
    leaves newer ones and other states alone."""
    now = time.time()
    task = new_task(owner="stranger@elsewhere.example")
    old = new_message(task.id, state=InboundState.HELD, received_at=now - 8 * 86400)
    young = new_message(task.id, state=InboundState.HELD, received_at=now - 86400)
    answered = new_message(task.id, state=InboundState.ANSWERED, received_at=now - 9 * 86400)
    await store.admit(admitted(old, young, answered, tasks=[task]))
    dropped = await store.drop_held(now - 7 * 86400)
    assert [(r.id, r.state) for r in dropped] == [(old.id, InboundState.HELD)]
    assert await store.drop_held(now - 7 * 86400) == []
    rows = [await store.inbound(m.id) for m in (old, young, answered)]
    assert [(r.state if r else None) for r in rows] == ["ignored", "held", "answered"]
    assert rows[0] is not None and "7 days" in (rows[0].reason or "")


async def test_the_stored_allow_list_survives_reopening(open_store: Opener) -> None:
    """An address allowed once is on the list (in lower case, with its note) after the store reopens."""
    store = await open_store("allow")
    try:
        assert await store.allow_sender("Stranger@Elsewhere.example", "approved with 01ABC") is True
        assert await store.allow_sender("stranger@elsewhere.example") is False
    finally:
        await store.close()
    store = await open_store("allow")
    try:
        assert await store.is_allowed_sender("STRANGER@elsewhere.example") is True
        assert await store.is_allowed_sender("someone@elsewhere.example") is False
        [row] = await store.allowed_senders()
    finally:
        await store.close()
    assert (row.addr, row.note) == ("stranger@elsewhere.example", "approved with 01ABC")
    assert row.added_at == pytest.approx(time.time(), abs=60)


async def test_replies_are_counted_per_address_and_for_the_gateway(store: Store) -> None:
    """A reply's place under the hourly limit: now while the address has room; then, when asked to wait,
    an hour after the place that filled it (the latest of its addresses), else none and nothing recorded.
    The gateway's count takes each reply once, in its window."""
    now = time.time()
    assert await store.reserve_reply("o1", [OWNER, "bob@example.org"], now - 10, 2, wait=False) == now - 10
    assert await store.reserve_reply("o2", [OWNER.upper()], now, 2, wait=False) == now
    assert await store.reserve_reply("o3", [OWNER], now, 2, wait=False) is None
    later = await store.reserve_reply("o4", ["bob@example.org", OWNER], now, 2, wait=True)
    assert later == pytest.approx(now - 10 + 3600)
    assert await store.reserve_reply("o5", ["bob@example.org"], now, 2, wait=False) is None  # o1, o4
    assert await store.reserve_reply("o6", ["carol@example.org"], now, 2, wait=False) == now
    assert await store.reply_times(OWNER, now - 3600, 10) == [pytest.approx(later), now, now - 10]
    assert await store.count_replies(now - 60, now + 1, 100) == 3  # o1, o2, o6; o4 is not due yet
    assert await store.count_replies(now - 60, later, 100) == 4
    assert await store.count_replies(now - 60, later, 2) == 2
    await store.forget_replies(now + 1)
    assert await store.reply_times(OWNER, 0, 10) == [pytest.approx(later)]


async def test_places_taken_at_once_count_each_other(store: Store) -> None:
    """Eight replies to one address composed at the same moment, two allowed: exactly two get a place."""
    now = time.time()
    got = await asyncio.gather(*(store.reserve_reply(f"o{n}", [OWNER], now, 2, wait=False) for n in range(8)))
    assert sorted(got, key=lambda t: t is None) == [now, now, *[None] * 6]


async def test_an_archived_task_is_named_as_archived(store: Store) -> None:
    """By id and by a Message-ID of its thread, an archived task says so (a reply then starts anew)."""
    task = new_task()
    message = new_message(task.id, message_id="<arch@example.org>")
    await store.admit(admitted(message, tasks=[task], thread_ids=[("<arch@example.org>", task.id)]))
    assert (await store.task(task.id)) == TaskRef(task.id, "research", OWNER, archived=False)
    await store.archive_task(task.id)
    assert (await store.task(task.id)) == TaskRef(task.id, "research", OWNER, archived=True)
    assert await task_by_chain(store, ["<arch@example.org>"], "research") == TaskRef(
        task.id, "research", OWNER, archived=True
    )
    facts = await store.admission_facts(
        [], token_task_ids=[task.id], sender=OWNER, max_turns=1, max_new_tasks=1
    )
    assert facts.tasks[task.id] == TaskRef(task.id, "research", OWNER, archived=True)


async def test_how_the_sender_was_verified_is_kept(store: Store) -> None:
    """The verification admission read at DATA comes back with the row."""
    task = new_task()
    message = NewMessage(**{**new_message(task.id).__dict__, "verified": "dmarc=pass (mx.example.org)"})
    await store.admit(admitted(message, tasks=[task]))
    row = await store.inbound(message.id)
    assert row is not None and row.verified == "dmarc=pass (mx.example.org)" and row.told_at is None


# --- duplicates: recipient, sender and Message-ID (issue 11) -----------------------------------------


def legacy_key(rcpt: str, message_id: str) -> str:
    """The duplicate key rows had before senders counted (recipient and Message-ID)."""
    return hashlib.sha256(f"{rcpt}\n{message_id}".encode()).hexdigest()


@pytest.mark.parametrize("authenticated", [True, False], ids=["sender", "envelope"])
async def test_a_row_recorded_before_senders_counted_matches_only_its_own_sender(
    store: Store, authenticated: bool
) -> None:
    """A row under the old key is a duplicate for the same sender (authenticated, or the envelope of
    an ignored one) and for no other; a row under the new key is found by it alone."""
    rcpt, mid = "research@agents.example.com", "<old@example.org>"
    old = new_message(None, state=InboundState.IGNORED, message_id=mid, dedupe_key=legacy_key(rcpt, mid))
    if not authenticated:
        old = NewMessage(**{**old.__dict__, "sender": None, "mail_from": "list-bounces@example.org"})
    batch = admitted(old)
    await store.admit(batch)
    who = OWNER if authenticated else "env:list-bounces@example.org"
    stranger = "mallory@example.net" if authenticated else "env:other@example.org"

    async def found(key: str, who: str) -> str | None:
        facts = await store.admission_facts(
            [key], legacy_keys=[legacy_key(rcpt, mid)], who=who, max_turns=1, max_new_tasks=1
        )
        return facts.duplicates[key]

    assert await found("new-key-1", who) == batch.messages[0].id
    assert await found("new-key-2", stranger) is None
    assert await duplicate_of(store, legacy_key(rcpt, mid)) == batch.messages[0].id  # without a sender
    newer = admitted(new_message(None, state=InboundState.IGNORED, message_id=mid, dedupe_key="new-key-3"))
    await store.admit(newer)
    assert await found("new-key-3", stranger) == newer.messages[0].id


# --- retention: prune_raw (issue 11) -----------------------------------------------------------------

HEAD = b"From: alice@example.org\r\nSubject: Quarterly numbers\r\n\r\n"
BODY = b"Please summarise.\r\n" + b"x" * 5000 + b"\r\n"
DAY = 86400.0


async def admit_at(store: Store, *states: str, at: float, data: bytes = HEAD + BODY) -> Admitted:
    """One raw message with a row per state in `states`, recorded (and last changed) at `at`."""
    batch = admitted(*(new_message(None, state=s, received_at=at) for s in states), data=data)
    await store.admit(batch)
    return batch


async def test_prune_cuts_only_raw_messages_whose_messages_all_finished_long_ago(store: Store) -> None:
    """Answered, ignored and failed rows older than the cut lose their body and keep their header
    block; a raw message with one active row, or one changed since the cut, stays whole."""
    now = time.time()
    old = [await admit_at(store, state, at=now - 40 * DAY) for state in FINISHED]
    lf = await admit_at(
        store, InboundState.ANSWERED, at=now - 40 * DAY, data=(HEAD + BODY).replace(b"\r\n", b"\n")
    )
    mixed = await admit_at(store, InboundState.ANSWERED, InboundState.QUEUED, at=now - 40 * DAY)
    active = await admit_at(store, InboundState.RECEIVED, at=now - 40 * DAY)
    recent = await admit_at(store, InboundState.ANSWERED, at=now - DAY)

    done = await store.prune_raw(now - 30 * DAY)

    assert done.messages == len(old) + 1
    assert done.bytes == len(old) * len(BODY) + len(BODY.replace(b"\r\n", b"\n"))
    for batch in old:
        assert await store.raw_head(batch.raw_id) == HEAD
        with pytest.raises(RawMissing, match="not kept whole"):
            await store.raw(batch.raw_id)
    assert await store.raw_head(lf.raw_id) == HEAD.replace(b"\r\n", b"\n")
    for batch in (mixed, active, recent):
        assert await store.raw(batch.raw_id) == HEAD + BODY
    assert await store.prune_raw(now - 30 * DAY) == type(done)()  # nothing left to do


async def test_prune_keeps_a_held_message_whole(store: Store) -> None:
    """A `held` message is not finished (approved, it runs on its raw bytes): however long it has
    waited, retention leaves them whole."""
    held = await admit_at(store, InboundState.HELD, at=time.time() - 40 * DAY)
    assert (await store.prune_raw(time.time() - 30 * DAY)).messages == 0
    assert await store.approve_held(held.messages[0].id) is not None
    assert await store.raw(held.raw_id) == HEAD + BODY


async def test_prune_goes_a_batch_at_a_time(store: Store) -> None:
    """`limit` bounds one call; the next call takes the rest."""
    for _ in range(3):
        await admit_at(store, InboundState.ANSWERED, at=time.time() - 40 * DAY)
    first = await store.prune_raw(time.time() - 30 * DAY, limit=2)
    second = await store.prune_raw(time.time() - 30 * DAY, limit=2)
    assert (first.messages, second.messages) == (2, 1)


async def test_replay_refuses_a_pruned_message_and_an_ignored_ones_head(store: Store) -> None:
    """A message whose raw bytes were pruned, or stored only in part (ignored mail keeps its head),
    cannot be replayed; its raw bytes are reported missing, never handed out cut short."""
    pruned = await admit_at(store, InboundState.FAILED, at=time.time() - 40 * DAY)
    await store.prune_raw(time.time() - 30 * DAY)
    head = admitted(new_message(None, state=InboundState.IGNORED), data=HEAD + BODY[:100])
    head = Admitted(**{**head.__dict__, "size": len(HEAD + BODY)})
    await store.admit(head)
    whole = await admit_at(store, InboundState.IGNORED, at=time.time())

    assert await store.replay_inbound(pruned.messages[0].id) is False
    assert await store.replay_inbound(head.messages[0].id) is False
    with pytest.raises(RawMissing):
        await store.raw(head.raw_id)
    assert await store.raw_head(head.raw_id) == HEAD + BODY[:100]
    assert await store.replay_inbound(whole.messages[0].id) is True


# --- what the sender hears (issue 15) and what the operator sees (issue 14) ------------------------------

VERP = "research+bounce-{}@agents.example.com"


async def sent_reply(store: Store, *, mail_from: str | None = None, state: str = OutboxState.SENT) -> str:
    """A reply of a new task's first message, sent from its own return path (`VERP`) and then in `state`;
    its outbox id."""
    task, message = await one_task_message(store)
    answer = reply(message.id, task.id)
    answer = replace(answer, mail_from=mail_from or VERP.format(answer.id.lower()))
    await store.finish(message.id, InboundState.ANSWERED, None, [answer], task_id=task.id, task_turns=1)
    await store.record_delivery(answer.id, state, attempts=1, error=None, reply="250 2.0.0 Ok")
    return answer.id


async def record_bounce(
    store: Store,
    outbox_id: str,
    *,
    addr: str | None = "bob@example.org",
    hard: bool = True,
    status: str = "5.1.1",
    at: float | None = None,
    limit: int = 3,
) -> str:
    """A bounce report admitted (`ignored`, as admission records one) telling of a bounce of `outbox_id`;
    the report's queue id."""
    report = new_message(None, state=InboundState.IGNORED, received_at=at)
    bounce = NewBounce(outbox_id, addr, status, f"smtp; 550 {status} no such user", hard)
    batch = replace(
        admitted(report),
        bounces=[(report.id, bounce)],
        received_at=report.received_at,
        bounce_limit=limit,
    )
    await store.admit(batch)
    return report.id


async def test_a_bounce_is_recorded_against_the_reply_its_return_path_names(store: Store) -> None:
    """The reply is found by its return path (any case); a bounce marks a sent reply `bounced` with the
    report's status and diagnostic, and is listed per reply and per report; a reply still being retried
    keeps its state, with the bounce noted."""
    outbox_id = await sent_reply(store)
    found = await store.outbox_by_mail_from(VERP.format(outbox_id.lower()).upper())
    assert found is not None and found.id == outbox_id
    assert await store.outbox_by_mail_from("research+bounce-nothing@agents.example.com") is None

    report_id = await record_bounce(store, outbox_id, addr="Bob@Example.ORG")
    row = await store.outbox_row(outbox_id)
    assert row is not None and row.bounced_at is not None
    assert (row.state, row.bounce_status, row.bounce_diagnostic) == (
        "bounced",
        "5.1.1",
        "smtp; 550 5.1.1 no such user",
    )
    [bounce] = await store.bounces_of([outbox_id, "other"])
    assert (bounce.outbox_id, bounce.inbound_id, bounce.addr, bounce.status, bounce.hard) == (
        outbox_id,
        report_id,
        "bob@example.org",
        "5.1.1",
        1,
    )
    assert await store.bounce_reported_by(report_id) == [bounce]
    assert await store.bounces_of([]) == []
    report = await store.inbound(report_id)
    assert report is not None and report.state == InboundState.IGNORED

    retrying = await sent_reply(store, state=OutboxState.RETRY)
    await record_bounce(store, retrying, hard=False, status="4.2.2")
    row = await store.outbox_row(retrying)
    assert row is not None and (row.state, row.bounce_status) == ("retry", "4.2.2")
    assert [b.hard for b in await store.bounces_of([retrying, outbox_id])] == [1, 0]


async def test_hard_bounces_reaching_the_limit_suppress_the_address_until_unsuppressed(store: Store) -> None:
    """Hard bounces within 30 days count towards the limit (soft ones and older ones do not); at the limit
    the address is suppressed, with the reason; `unsuppress` clears it and the bounces before it stop
    counting."""
    outbox_id = await sent_reply(store)
    now = time.time()
    await record_bounce(store, outbox_id, at=now - 31 * 86400, limit=2)  # outside the window
    await record_bounce(store, outbox_id, at=now - 60, limit=2)
    await record_bounce(store, outbox_id, hard=False, status="4.2.2", at=now - 50, limit=2)
    await record_bounce(store, outbox_id, addr=None, at=now - 45, limit=2)  # no address: counts for none
    assert await store.is_suppressed("bob@example.org") is False
    assert await store.suppressed() == []

    await record_bounce(store, outbox_id, addr="BOB@example.org", at=now - 40, limit=2)
    assert await store.is_suppressed("Bob@Example.org") is True
    [entry] = await store.suppressed()
    assert (entry.addr, entry.suppressed_at, entry.cleared_at) == ("bob@example.org", now - 40, None)
    assert entry.reason is not None and entry.reason.startswith("2 hard bounces in 30 days")
    await record_bounce(store, outbox_id, at=now - 30, limit=2)  # already suppressed: kept as it was
    assert [(e.addr, e.suppressed_at) for e in await store.suppressed()] == [("bob@example.org", now - 40)]

    assert await store.unsuppress("Bob@example.org") is True
    assert await store.unsuppress("bob@example.org") is False
    assert await store.unsuppress("nobody@example.org") is False
    assert await store.is_suppressed("bob@example.org") is False
    assert await store.suppressed() == []

    await record_bounce(store, outbox_id, at=time.time(), limit=2)  # the earlier ones no longer count
    assert await store.is_suppressed("bob@example.org") is False
    await record_bounce(store, outbox_id, at=time.time(), limit=2)
    assert await store.is_suppressed("bob@example.org") is True
    assert len(await store.bounces_of([outbox_id])) == 8


async def test_a_running_turn_is_acknowledged_once_with_its_notice_in_one_transaction(store: Store) -> None:
    """`mark_running` stamps when the turn started; `acknowledge` stamps `acked_at` and queues the notice
    together (a failing notice leaves `acked_at` unset), keeping the state and `updated_at`."""
    task, message = await one_task_message(store)
    await store.mark_submitting(message.id, turn_seq=0, attempts=1)
    before = time.time()
    await store.mark_running(message.id, turn_seq=0)
    running = await store.inbound(message.id)
    assert running is not None and running.started_at is not None and running.acked_at is None
    assert before <= running.started_at <= time.time()

    other_task, other = await one_task_message(store)
    clash = replace(reply(other.id, other_task.id, kind="notice"), message_id="<same@agents.example.com>")
    await store.finish(other.id, InboundState.ANSWERED, None, [clash])
    with pytest.raises(StoreBusy):
        await store.acknowledge(message.id, [replace(clash, id=str(ULID()), inbound_id=message.id)])
    unchanged = await store.inbound(message.id)
    assert unchanged is not None and unchanged.acked_at is None
    assert await store.outbox_for(message.id) == []

    notice = reply(message.id, task.id, kind="notice")
    await store.acknowledge(message.id, [notice])
    row = await store.inbound(message.id)
    assert row is not None and row.acked_at is not None and row.acked_at >= running.started_at
    assert (row.state, row.updated_at) == (InboundState.RUNNING, running.updated_at)
    assert [o.id for o in await store.outbox_for(message.id)] == [notice.id]
    await store.acknowledge(message.id)  # the limits let no notice go: only remembered
    again = await store.inbound(message.id)
    assert again is not None and again.acked_at is not None and again.acked_at >= row.acked_at


async def test_replay_after_a_turn_that_ended_in_error_posts_a_new_turn(store: Store) -> None:
    """A message whose turn ended at the API (`turn_status`) is replayed as a new turn after that one,
    with no attempt counted; without a `turn_status` the attempts are kept (the POST is looked for)."""
    task, message = await one_task_message(store)
    await store.set_turn_input(message.id, input="the input", files=[], skipped=[])
    await store.mark_submitting(message.id, turn_seq=2, attempts=1)
    await store.mark_running(message.id, turn_seq=2)
    await store.finish(
        message.id, InboundState.FAILED, "the worker failed", task_id=task.id, turn_status="error"
    )
    ended = await store.inbound(message.id)
    assert ended is not None and (ended.turn_status, ended.turn_seq) == ("error", 2)

    assert await store.replay_inbound(message.id) is True
    row = await store.inbound(message.id)
    assert row is not None
    assert (row.state, row.attempts, row.turn_seq, row.turn_status, row.reason) == (
        InboundState.QUEUED,
        0,
        3,
        None,
        None,
    )


async def test_status_reads_count_states_find_the_oldest_and_the_problems(store: Store) -> None:
    """`count_by_state`, `oldest_waiting`, `recent_problems` (newest first, errors only) and
    `find_message_id` (with or without angle brackets) read what the operator's `status` and `show`
    print."""
    assert await store.count_by_state() == {"inbound": {}, "outbox": {}}
    assert await store.oldest_waiting() is None and await store.recent_problems() == []
    now = time.time()
    _, oldest = await one_task_message(store, received_at=now - 300)
    task, failed = await one_task_message(store, received_at=now - 200, message_id="<needle@example.org>")
    _, retried = await one_task_message(store, received_at=now - 100)
    await store.finish(failed.id, InboundState.FAILED, "API 422: no", task_id=task.id)
    await store.reschedule(retried.id, now + 60, state=InboundState.QUEUED, error="API unavailable")
    sent = await sent_reply(store)
    dead = await pending_reply(store)
    await store.record_delivery(dead, OutboxState.DEAD, attempts=3, error="550 5.1.1 no such user")

    counts = await store.count_by_state()
    assert counts["inbound"] == {"received": 1, "queued": 1, "failed": 1, "answered": 2}
    assert counts["outbox"] == {"sent": 1, "dead": 1}
    waiting = await store.oldest_waiting()
    assert waiting is not None and waiting.id == oldest.id

    problems = await store.recent_problems(10)
    assert [(p.table, p.id, p.state) for p in problems] == [
        ("outbox", dead, "dead"),
        ("inbound", retried.id, "queued"),
        ("inbound", failed.id, "failed"),
    ]
    assert [p.error for p in problems] == ["550 5.1.1 no such user", "API unavailable", "API 422: no"]
    assert [p.at for p in problems] == sorted((p.at for p in problems), reverse=True)
    assert len(await store.recent_problems(2)) == 2

    inbound, outbox = await store.find_message_id("needle@example.org")
    assert ([r.id for r in inbound], outbox) == ([failed.id], [])
    sent_row = await store.outbox_row(sent)
    assert sent_row is not None
    inbound, outbox = await store.find_message_id(f" {sent_row.message_id} ")
    assert (inbound, [r.id for r in outbox]) == ([], [sent])
    assert outbox[0].relay_reply == "250 2.0.0 Ok" and outbox[0].last_error is None


async def test_the_api_hold_is_recorded_read_and_cleared(store: Store) -> None:
    """`set_api_hold` records since when and why (replacing an earlier hold), `clear_api_hold` forgets it;
    `check_writable` commits on a store that takes writes."""
    assert await store.api_hold() is None
    await store.set_api_hold(100.0, "HTTP 401")
    await store.set_api_hold(200.0, "HTTP 401 " + "x" * 600)
    hold = await store.api_hold()
    assert hold is not None and hold["since"] == 200.0 and len(hold["reason"]) == 500
    await store.clear_api_hold()
    await store.clear_api_hold()
    assert await store.api_hold() is None
    before = store.batches
    await store.check_writable()
    await store.check_writable()
    assert store.batches == before + 2


async def test_list_tasks_shows_each_tasks_newest_message_and_the_budget_asked(store: Store) -> None:
    """Each task comes with the state and time of its newest message; a task keeps the budget its address
    asked for."""
    asked = replace(new_task(created_at=time.time() - 10), budget_asked="unlimited")
    first = new_message(asked.id, received_at=time.time() - 10)
    await store.admit(admitted(first, tasks=[asked], participants=[(asked.id, OWNER)]))
    second = new_message(asked.id)
    await store.admit(admitted(second))
    await store.finish(second.id, InboundState.FAILED, "no", task_id=asked.id)
    other, other_message = await one_task_message(store)

    listed = await store.list_tasks()
    assert [(t.id, t.status, t.last_message_at) for t in listed] == [
        (other.id, InboundState.RECEIVED, other_message.received_at),
        (asked.id, InboundState.FAILED, second.received_at),
    ]
    assert [t.budget_asked for t in listed] == [None, "unlimited"]
    row = await store.task_row(asked.id)
    assert row is not None and row.budget_asked == "unlimited"
    assert [t.id for t in await store.list_tasks(1)] == [other.id]
