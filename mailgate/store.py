"""The SQLite store: every hand-off between mailgate's stages is a committed row here.

One writer connection (WAL, synchronous=FULL: a commit is on disk when it returns) fed by a queue, so
concurrent SMTP sessions share one transaction and one fsync (group commit); each caller is answered
when its batch is durable. A batch that fails is retried one item at a time, so one bad item fails
alone. Reads use a second connection and see every committed write.

sqlite3 errors are translated to `StoreBusy` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from mailgate.errors import StoreBusy
from mailgate.models import InboundState, OutboxState
from mailgate.threads import TaskRef

Statement = tuple[str, Sequence[Any]]
ACTIVE = (InboundState.RECEIVED, InboundState.QUEUED, InboundState.SUBMITTING, InboundState.RUNNING)
_ACTIVE_SQL = ",".join(f"'{s.value}'" for s in ACTIVE)
MAX_BATCH = 256
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raw_message (
    id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS inbound (
    id TEXT PRIMARY KEY,                 -- the queue id of the 250 reply; a ULID: sorts by arrival
    raw_id TEXT NOT NULL REFERENCES raw_message(id),
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    mail_from TEXT NOT NULL, rcpt TEXT NOT NULL, alias TEXT NOT NULL,
    sender TEXT, message_id TEXT, subject TEXT NOT NULL DEFAULT '',
    dedupe_key TEXT NOT NULL UNIQUE,
    task_id TEXT, new_task INTEGER NOT NULL DEFAULT 0, note TEXT,
    state TEXT NOT NULL, reason TEXT,
    input TEXT, files TEXT, skipped TEXT,
    turn_seq INTEGER, attempts INTEGER NOT NULL DEFAULT 0, crashes INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX IF NOT EXISTS inbound_due ON inbound (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS inbound_task ON inbound (task_id, id);
CREATE INDEX IF NOT EXISTS inbound_sender ON inbound (sender, received_at);
CREATE TABLE IF NOT EXISTS task (
    id TEXT PRIMARY KEY, alias TEXT NOT NULL, worker_id TEXT NOT NULL, owner TEXT NOT NULL,
    budget TEXT NOT NULL, subject TEXT NOT NULL, created_at REAL NOT NULL, url TEXT,
    turns INTEGER NOT NULL DEFAULT 0, archived INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS task_owner ON task (owner, created_at);
CREATE TABLE IF NOT EXISTS participant (
    task_id TEXT NOT NULL, addr TEXT NOT NULL, PRIMARY KEY (task_id, addr)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS thread_message (
    message_id TEXT NOT NULL, task_id TEXT NOT NULL, direction TEXT NOT NULL,
    PRIMARY KEY (message_id, task_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, inbound_id TEXT, task_id TEXT, kind TEXT NOT NULL, notice TEXT,
    message_id TEXT NOT NULL UNIQUE, mail_from TEXT NOT NULL, recipients TEXT NOT NULL, data BLOB NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT, refused TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL, sent_at REAL);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_notice ON outbox (notice, created_at);
"""


@dataclass
class InboundRow:
    id: str
    raw_id: str
    received_at: float
    updated_at: float
    mail_from: str
    rcpt: str
    alias: str
    sender: str | None
    message_id: str | None
    subject: str
    dedupe_key: str
    task_id: str | None
    new_task: int
    note: str | None
    state: str
    reason: str | None
    input: str | None
    files: str | None
    skipped: str | None
    turn_seq: int | None
    attempts: int
    crashes: int
    next_attempt_at: float
    last_error: str | None


@dataclass
class OutboxRow:
    id: str
    inbound_id: str | None
    task_id: str | None
    kind: str
    notice: str | None
    message_id: str
    mail_from: str
    recipients: str
    data: bytes
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    refused: str | None
    created_at: float
    updated_at: float
    sent_at: float | None

    @property
    def recipient_list(self) -> list[str]:
        return list(json.loads(self.recipients))


@dataclass
class TaskRow:
    id: str
    alias: str
    worker_id: str
    owner: str
    budget: str
    subject: str
    created_at: float
    url: str | None
    turns: int
    archived: int


def _row(cls: type[Any], row: sqlite3.Row | None) -> Any:
    if row is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: row[k] for k in row.keys() if k in names})  # noqa: SIM118 (sqlite3.Row has no __iter__ of keys)


def _run_transaction(db: sqlite3.Connection, statements: list[Statement]) -> None:
    """On the writer's thread: BEGIN IMMEDIATE, the statements, COMMIT (fsync); ROLLBACK on failure."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            db.execute(sql, params)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


# --- reads, run on the reader's thread (each steps its statement to the end: see Store._one) ------------


def _duplicate_of(db: sqlite3.Connection, dedupe_key: str) -> str | None:
    rows = db.execute("SELECT id FROM inbound WHERE dedupe_key=?", (dedupe_key,)).fetchall()
    return str(rows[0][0]) if rows else None


def _task(db: sqlite3.Connection, task_id: str) -> TaskRef | None:
    rows = db.execute("SELECT id, alias, owner FROM task WHERE id=?", (task_id,)).fetchall()
    return TaskRef(rows[0][0], rows[0][1], rows[0][2]) if rows else None


def _task_for_message_ids(db: sqlite3.Connection, message_ids: Sequence[str], alias: str) -> TaskRef | None:
    for message_id in message_ids[:50]:
        rows = db.execute(
            "SELECT t.id, t.alias, t.owner FROM thread_message m JOIN task t ON t.id = m.task_id "
            "WHERE m.message_id=? AND t.alias=? ORDER BY t.created_at DESC LIMIT 1",
            (message_id, alias),
        ).fetchall()
        if rows:
            return TaskRef(rows[0][0], rows[0][1], rows[0][2])
    return None


def _is_participant(db: sqlite3.Connection, task_id: str, addr: str) -> bool:
    rows = db.execute("SELECT 1 FROM participant WHERE task_id=? AND addr=?", (task_id, addr)).fetchall()
    return bool(rows)


def _count_new_tasks(db: sqlite3.Connection, owner: str, since: float, limit: int | None) -> int:
    # Counting stops at `limit`: the caller only asks "at the limit yet?", and the count would grow with
    # the sender's history (one index entry per task of the last hour).
    rows = db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM task WHERE owner=? AND created_at>=? LIMIT ?)",
        (owner, since, -1 if limit is None else limit),
    ).fetchall()
    return int(rows[0][0])


def _count_turns(db: sqlite3.Connection, task_id: str, since: float, limit: int | None) -> int:
    rows = db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM inbound WHERE task_id=? AND received_at>=? LIMIT ?)",
        (task_id, since, -1 if limit is None else limit),
    ).fetchall()
    return int(rows[0][0])


@dataclass
class IntakeFacts:
    """Everything `Intake` reads at the end of DATA, read in one hop to the reader's thread.

    Asked for: the dedupe keys; the task ids named by reply tokens; one Message-ID chain and the
    aliases it is looked up for; a sender, the start of the rate window and the limits.
    """

    duplicates: dict[str, str | None] = field(default_factory=dict)  # dedupe key -> queue id
    tasks: dict[str, TaskRef | None] = field(default_factory=dict)  # token task id -> task
    chain: list[str] = field(default_factory=list)
    by_chain: dict[str, TaskRef | None] = field(default_factory=dict)  # alias -> task of the chain
    sender: str = ""
    participant: dict[str, bool] = field(default_factory=dict)  # task id -> sender takes part
    turns: dict[str, int] = field(default_factory=dict)  # task id -> turns since (capped)
    new_tasks: int | None = None  # the sender's new tasks since (capped)


def _intake_facts(
    db: sqlite3.Connection,
    keys: Sequence[str],
    token_task_ids: Sequence[str],
    chain: Sequence[str],
    aliases: Sequence[str],
    sender: str | None,
    since: float,
    max_turns: int,
    max_new_tasks: int,
) -> IntakeFacts:
    facts = IntakeFacts(duplicates={key: _duplicate_of(db, key) for key in keys})
    if sender is None:
        return facts
    facts.sender = sender
    facts.tasks = {task_id: _task(db, task_id) for task_id in token_task_ids}
    facts.chain = list(chain)
    if chain:
        facts.by_chain = {alias: _task_for_message_ids(db, chain, alias) for alias in aliases}
    for ref in (*facts.tasks.values(), *facts.by_chain.values()):
        if ref is not None and ref.task_id not in facts.turns:
            facts.participant[ref.task_id] = _is_participant(db, ref.task_id, sender)
            facts.turns[ref.task_id] = _count_turns(db, ref.task_id, since, max_turns)
    facts.new_tasks = _count_new_tasks(db, sender, since, max_new_tasks)
    return facts


def insert(table: str, values: dict[str, Any], *, or_ignore: bool = False) -> Statement:
    """An INSERT statement for `values` (column names come from our own code, never from input)."""
    cols = ",".join(values)
    marks = ",".join("?" * len(values))
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    return f"{verb} INTO {table} ({cols}) VALUES ({marks})", list(values.values())


def update(table: str, key: str, **values: Any) -> Statement:
    sets = ",".join(f"{col}=?" for col in values)
    return f"UPDATE {table} SET {sets} WHERE id=?", [*values.values(), key]  # noqa: S608


class Store:
    """The async face of the database. Open with `await Store.open(path)`, close with `await close()`."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer = writer
        self._reader = reader
        self._queue: asyncio.Queue[tuple[list[Statement], asyncio.Future[None]]] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions the writer committed (for benchmarks and tests)

    @classmethod
    async def open(cls, path: Path) -> Self:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = await aiosqlite.connect(path, isolation_level=None)
            try:
                for pragma in (
                    "journal_mode=WAL",
                    "synchronous=FULL",
                    "busy_timeout=10000",
                    "foreign_keys=ON",
                ):
                    await writer.execute(f"PRAGMA {pragma}")
                await writer.executescript(SCHEMA)
                reader = await aiosqlite.connect(path, isolation_level=None)
            except BaseException:
                await writer.close()
                raise
            reader.row_factory = sqlite3.Row
            await reader.execute("PRAGMA busy_timeout=10000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreBusy(f"cannot open the store at {path}: {exc}") from exc
        store = cls(writer, reader)
        store._writer_task = asyncio.get_running_loop().create_task(store._write_loop(), name="store-writer")
        return store

    async def close(self) -> None:
        if self._writer_task is not None:
            await self._queue.join()
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        await self._reader.close()
        await self._writer.close()

    # --- writing ---------------------------------------------------------------------------------

    async def write(self, statements: Iterable[Statement]) -> None:
        """Run `statements` in one transaction (shared with concurrent callers); return once durable."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((list(statements), future))
        await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[tuple[list[Statement], asyncio.Future[None]]]) -> None:
        try:
            await self._transaction([s for statements, _ in batch for s in statements])
        except sqlite3.Error as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            for statements, future in batch:  # find the one that failed; the others still commit
                try:
                    await self._transaction(statements)
                except sqlite3.Error as one:
                    _settle(future, one)
                else:
                    _settle(future, None)
            return
        for _, future in batch:
            _settle(future, None)

    async def _transaction(self, statements: list[Statement]) -> None:
        # One hop to the writer's thread for the whole transaction, not one per statement: the hops
        # (queue, GIL hand-off, loop wake-up) cost more than the inserts (bench/smtp_accept.py).
        await self._writer._execute(_run_transaction, self._writer._conn, statements)  # type: ignore[no-untyped-call]
        self.batches += 1

    # --- reading ---------------------------------------------------------------------------------

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        # One hop that steps the statement to its end: a cursor left open across an await keeps the
        # reader's snapshot (and the WAL) pinned while other reads overlap, so a read right after a
        # commit could miss it (seen at 300+ concurrent tasks in bench/accept_latency.py).
        try:
            rows = await self._reader.execute_fetchall(sql, params)
            return next(iter(rows), None)
        except sqlite3.Error as exc:
            raise StoreBusy(f"read failed: {exc}") from exc

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            rows = await self._reader.execute_fetchall(sql, params)
            return list(rows)
        except sqlite3.Error as exc:
            raise StoreBusy(f"read failed: {exc}") from exc

    async def secret(self) -> str:
        """The reply-token key: generated and stored on first use."""
        row = await self._one("SELECT value FROM meta WHERE key='secret'")
        if row is not None:
            return str(row["value"])
        await self.write(
            [insert("meta", {"key": "secret", "value": secrets.token_urlsafe(32)}, or_ignore=True)]
        )
        row = await self._one("SELECT value FROM meta WHERE key='secret'")
        assert row is not None
        return str(row["value"])

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on the reader's thread: several reads for one hop."""
        try:
            result: T = await self._reader._execute(fn, self._reader._conn, *args)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise StoreBusy(f"read failed: {exc}") from exc
        return result

    async def intake_facts(
        self,
        keys: Sequence[str],
        *,
        token_task_ids: Sequence[str] = (),
        chain: Sequence[str] = (),
        aliases: Sequence[str] = (),
        sender: str | None = None,
        since: float = 0.0,
        max_turns: int,
        max_new_tasks: int,
    ) -> IntakeFacts:
        """The reads of one message's DATA decision in one hop (see `IntakeFacts`)."""
        return await self._read(
            _intake_facts, keys, token_task_ids, chain, aliases, sender, since, max_turns, max_new_tasks
        )

    async def duplicate_of(self, dedupe_key: str) -> str | None:
        return await self._read(_duplicate_of, dedupe_key)

    # ThreadIndex (see threads.py)
    async def task(self, task_id: str) -> TaskRef | None:
        return await self._read(_task, task_id)

    async def task_for_message_ids(self, message_ids: Sequence[str], alias: str) -> TaskRef | None:
        return await self._read(_task_for_message_ids, list(message_ids), alias)

    async def is_participant(self, task_id: str, addr: str) -> bool:
        return await self._read(_is_participant, task_id, addr)

    async def participants(self, task_id: str) -> list[str]:
        rows = await self._all("SELECT addr FROM participant WHERE task_id=? ORDER BY addr", (task_id,))
        return [str(r["addr"]) for r in rows]

    async def count_new_tasks(self, owner: str, since: float, limit: int | None = None) -> int:
        """Tasks `owner` started since `since`, counted up to `limit` at most."""
        return await self._read(_count_new_tasks, owner, since, limit)

    async def count_turns(self, task_id: str, since: float, limit: int | None = None) -> int:
        """Messages received for `task_id` since `since`, counted up to `limit` at most."""
        return await self._read(_count_turns, task_id, since, limit)

    async def count_notices(self, addr: str, since: float, notice: str | None = None) -> int:
        sql = "SELECT count(*) AS n FROM outbox WHERE kind='notice' AND created_at>=? AND recipients LIKE ?"
        params: list[Any] = [since, f'["{addr}"%']
        if notice is not None:
            sql += " AND notice=?"
            params.append(notice)
        row = await self._one(sql, params)
        return int(row["n"]) if row else 0

    async def count_notices_for_task(self, task_id: str, notice: str, since: float) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM outbox WHERE task_id=? AND notice=? AND created_at>=?",
            (task_id, notice, since),
        )
        return int(row["n"]) if row else 0

    async def raw(self, raw_id: str) -> bytes:
        row = await self._one("SELECT data FROM raw_message WHERE id=?", (raw_id,))
        if row is None:
            raise StoreBusy(f"raw message {raw_id} is missing")
        return bytes(row["data"])

    async def inbound(self, inbound_id: str) -> InboundRow | None:
        row: InboundRow | None = _row(
            InboundRow, await self._one("SELECT * FROM inbound WHERE id=?", (inbound_id,))
        )
        return row

    async def task_row(self, task_id: str) -> TaskRow | None:
        row: TaskRow | None = _row(TaskRow, await self._one("SELECT * FROM task WHERE id=?", (task_id,)))
        return row

    async def outbox_row(self, outbox_id: str) -> OutboxRow | None:
        row: OutboxRow | None = _row(
            OutboxRow, await self._one("SELECT * FROM outbox WHERE id=?", (outbox_id,))
        )
        return row

    async def runnable(self, now: float, limit: int, busy: set[str]) -> list[InboundRow]:
        """Active messages that are due, only the oldest active one of each task (turns go in order)."""
        rows = await self._all(
            f"SELECT * FROM inbound i WHERE state IN ({_ACTIVE_SQL}) AND next_attempt_at<=? "  # noqa: S608
            f"AND (task_id IS NULL OR NOT EXISTS (SELECT 1 FROM inbound j WHERE j.task_id=i.task_id "
            f"AND j.id<i.id AND j.state IN ({_ACTIVE_SQL}))) ORDER BY id LIMIT ?",
            (now, limit + len(busy)),
        )
        found = [_row(InboundRow, r) for r in rows if r["id"] not in busy]
        return found[:limit]

    async def next_due(self, table: str) -> float | None:
        states = _ACTIVE_SQL if table == "inbound" else "'pending','retry'"
        row = await self._one(f"SELECT min(next_attempt_at) AS t FROM {table} WHERE state IN ({states})")  # noqa: S608
        return None if row is None or row["t"] is None else float(row["t"])

    async def outbox_due(self, now: float, limit: int, busy: set[str]) -> list[OutboxRow]:
        rows = await self._all(
            "SELECT * FROM outbox WHERE state IN ('pending','retry') AND next_attempt_at<=? "
            "ORDER BY id LIMIT ?",
            (now, limit + len(busy)),
        )
        return [_row(OutboxRow, r) for r in rows if r["id"] not in busy][:limit]

    async def runnable_ids(self, now: float, limit: int, busy: set[str]) -> list[str]:
        """`runnable`, but only the ids: cheap when many jobs are in flight (their rows come back too)."""
        rows = await self._all(
            f"SELECT id FROM inbound i WHERE state IN ({_ACTIVE_SQL}) AND next_attempt_at<=? "  # noqa: S608
            f"AND (task_id IS NULL OR NOT EXISTS (SELECT 1 FROM inbound j WHERE j.task_id=i.task_id "
            f"AND j.id<i.id AND j.state IN ({_ACTIVE_SQL}))) ORDER BY id LIMIT ?",
            (now, limit + len(busy)),
        )
        return [str(r["id"]) for r in rows if r["id"] not in busy][:limit]

    async def inbound_rows(self, ids: Sequence[str]) -> list[InboundRow]:
        """The rows of `ids` (those that exist), in id order, in one read."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = await self._all(f"SELECT * FROM inbound WHERE id IN ({marks}) ORDER BY id", list(ids))  # noqa: S608
        return [_row(InboundRow, r) for r in rows]

    async def next_due_after(self, table: str, now: float) -> float | None:
        """Like `next_due`, but only rows due later than `now`: rows due already are in hand, or wait for
        a free slot (a finishing job wakes the loop), so they must not make the loop spin."""
        states = _ACTIVE_SQL if table == "inbound" else "'pending','retry'"
        row = await self._one(
            f"SELECT min(next_attempt_at) AS t FROM {table} WHERE state IN ({states}) AND next_attempt_at>?",  # noqa: S608
            (now,),
        )
        return None if row is None or row["t"] is None else float(row["t"])

    async def raw_head(self, raw_id: str, size: int = 65536) -> bytes:
        """The start of a raw message, enough for its header block: the whole message only when the
        header block does not end within the first `size` bytes."""
        row = await self._one("SELECT substr(data, 1, ?) AS head FROM raw_message WHERE id=?", (size, raw_id))
        if row is None:
            raise StoreBusy(f"raw message {raw_id} is missing")
        head = bytes(row["head"])
        if len(head) < size or any(sep in head for sep in (b"\n\n", b"\n\r\n", b"\r\r")):
            return head
        return await self.raw(raw_id)

    async def list_inbound(self, state: str | None = None, limit: int = 50) -> list[InboundRow]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        rows = await self._all(f"SELECT * FROM inbound {where} ORDER BY id DESC LIMIT ?", [*params, limit])  # noqa: S608
        return [_row(InboundRow, r) for r in rows]

    async def list_outbox(self, state: str | None = None, limit: int = 50) -> list[OutboxRow]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        rows = await self._all(f"SELECT * FROM outbox {where} ORDER BY id DESC LIMIT ?", [*params, limit])  # noqa: S608
        return [_row(OutboxRow, r) for r in rows]

    async def list_tasks(self, limit: int = 50) -> list[TaskRow]:
        rows = await self._all("SELECT * FROM task ORDER BY created_at DESC LIMIT ?", (limit,))
        return [_row(TaskRow, r) for r in rows]

    async def outbox_for(self, inbound_id: str) -> list[OutboxRow]:
        rows = await self._all("SELECT * FROM outbox WHERE inbound_id=? ORDER BY id", (inbound_id,))
        return [_row(OutboxRow, r) for r in rows]

    async def messages_of_task(self, task_id: str) -> list[InboundRow]:
        rows = await self._all("SELECT * FROM inbound WHERE task_id=? ORDER BY id", (task_id,))
        return [_row(InboundRow, r) for r in rows]

    # --- state changes -----------------------------------------------------------------------

    async def set_inbound(self, inbound_id: str, **values: Any) -> None:
        await self.write([update("inbound", inbound_id, updated_at=time.time(), **values)])

    async def set_outbox(self, outbox_id: str, **values: Any) -> None:
        await self.write([update("outbox", outbox_id, updated_at=time.time(), **values)])

    async def reset_for_restart(self) -> None:
        """On start-up: everything in flight is due now (its state says where to resume)."""
        now = time.time()
        await self.write(
            [
                (
                    f"UPDATE inbound SET next_attempt_at=? WHERE state IN ({_ACTIVE_SQL}) "  # noqa: S608 (constants)
                    "AND next_attempt_at>?",
                    (now, now),
                ),
            ]
        )

    async def replay_inbound(self, inbound_id: str) -> bool:
        row = await self.inbound(inbound_id)
        if row is None or row.state not in (InboundState.FAILED, InboundState.IGNORED):
            return False
        state = InboundState.QUEUED if row.input is not None else InboundState.RECEIVED
        await self.set_inbound(
            # attempts are kept: a turn that may have reached the API is looked for before any new POST
            inbound_id,
            state=state,
            reason=None,
            crashes=0,
            next_attempt_at=0,
            last_error=None,
            received_at=time.time(),
        )
        return True

    async def replay_outbox(self, outbox_id: str) -> bool:
        row = await self.outbox_row(outbox_id)
        if row is None or row.state != OutboxState.DEAD:
            return False
        await self.set_outbox(
            outbox_id,
            state=OutboxState.RETRY,
            attempts=0,
            next_attempt_at=0,
            last_error=None,
            created_at=time.time(),
        )
        return True


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        err = StoreBusy(f"commit failed: {exc}")
        err.__cause__ = exc
        future.set_exception(err)
