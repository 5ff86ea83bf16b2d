"""The SQLite store: every hand-off between mailgate's stages is a committed row here.

One writer connection (WAL, synchronous=FULL: a commit is on disk when it returns) fed by a queue, so
concurrent SMTP sessions share one transaction and one fsync (group commit); each caller is answered
when its batch is durable. A batch that fails is retried one item at a time, so one bad item fails
alone. Reads use a second connection and see every committed write.

One process owns the file, so a claim is the scheduler's and the outbox's own busy set (`claim_*` take
`busy` and leave it out; `release_*` have nothing to do) and nothing else commits work to wake for.

sqlite3 errors are translated to `StoreBusy` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite

from mailgate import private
from mailgate.errors import RawMissing, StoreBusy
from mailgate.models import InboundState, OutboxState, TaskRef
from mailgate.store import reads
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import (
    ACTIVE_SQL,
    BLOCKS,
    DENIED,
    DROPPED,
    MIGRATIONS,
    PRUNE_WINDOW,
    VERSION,
    Admitted,
    AllowedSenderRow,
    BounceRow,
    InboundRow,
    NewBounce,
    NewReply,
    OutboxRow,
    Problem,
    Pruned,
    Statement,
    SuppressionRow,
    TaskListing,
    TaskRow,
    api_hold_of,
    api_hold_value,
    insert,
    insert_row,
    row_of,
    update,
)

MAX_BATCH = 256
CHECKPOINT_EVERY = 1.0  # seconds between the background WAL checkpoints
BOUNCE_WINDOW = 30 * 86400.0  # hard bounces counted towards MAILGATE_BOUNCE_LIMIT over this long
HOUR = 3600.0  # the window of MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR
T = TypeVar("T")


BLOB_CHUNK = 1024 * 1024  # a raw message bigger than this is written into its row a chunk at a time
_WRITE_BLOB = "-- write blob"  # a statement of its own: (table, column, id, data), see `_raw_statements`


def _run_transaction(db: sqlite3.Connection, statements: list[Statement]) -> None:
    """On the writer's thread: BEGIN IMMEDIATE, the statements, COMMIT (fsync); ROLLBACK on failure."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            if sql == _WRITE_BLOB:
                _write_blob(db, *params)
            else:
                db.execute(sql, params)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteStore:
    """The SQLite store (`base.Store`). Open with `await SqliteStore.open(path)`, close with `close()`."""

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection | None = None,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._checkpointer = checkpointer
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[list[Statement], asyncio.Future[None]]] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions the writer committed (for benchmarks and tests)
        self.schema_version = VERSION
        self.migrated_from = VERSION  # the schema version found when the store was opened

    @classmethod
    async def open(cls, path: Path) -> Self:
        """Open (creating or migrating it to the current schema) the store at `path`.

        A new store's directory is made 0700 and its file 0600 before SQLite opens it, so the file and
        the `-wal` and `-shm` SQLite makes beside it (with the file's mode) are the owner's alone.
        """
        try:
            private.make_dir(path.parent)
            private.create_file(path)
            writer = await aiosqlite.connect(path, isolation_level=None)
            try:
                for pragma in (
                    "journal_mode=WAL",
                    "synchronous=FULL",
                    "busy_timeout=10000",
                    "foreign_keys=ON",
                    # no checkpoint inside a commit (it would hold that batch's 250 for the copy and
                    # its fsyncs): `_checkpoint_loop` does them on a connection of its own
                    "wal_autocheckpoint=0",
                ):
                    await writer.execute(f"PRAGMA {pragma}")
                found = await _migrate(writer)
                reader = await aiosqlite.connect(path, isolation_level=None)
                checkpointer = await aiosqlite.connect(path, isolation_level=None)
            except BaseException:
                await writer.close()
                raise
            reader.row_factory = sqlite3.Row
            await reader.execute("PRAGMA busy_timeout=10000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreBusy(f"cannot open the store at {path}: {exc}") from exc
        store = cls(writer, reader, checkpointer)
        store.migrated_from = found
        loop = asyncio.get_running_loop()
        store._writer_task = loop.create_task(store._write_loop(), name="store-writer")
        store._checkpoint_task = loop.create_task(store._checkpoint_loop(), name="store-checkpoint")
        return store

    async def close(self) -> None:
        if self._writer_task is not None:
            await self._queue.join()
            self._writer_task.cancel()
            await asyncio.gather(self._writer_task, return_exceptions=True)
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        if self._checkpointer is not None:
            await self._checkpointer.close()
        await self._reader.close()
        await self._writer.close()

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database every CHECKPOINT_EVERY seconds, on a connection (and a
        thread) of its own. PASSIVE: it never waits for a writer or a reader, and commits go on
        meanwhile; what it cannot copy yet, the next one does. (SQLite's own checkpoint runs inside
        the commit that crosses 1,000 pages, and the SMTP sessions of that batch wait for it.)"""
        assert self._checkpointer is not None
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            with contextlib.suppress(sqlite3.Error):
                await self._checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")

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

    async def admission_facts(
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
        legacy_keys: Sequence[str] = (),
        who: str = "",
    ) -> AdmissionFacts:
        """The reads of one message's DATA decision in one hop (see `AdmissionFacts`)."""
        return await self._read(
            reads.admission_facts,
            keys,
            token_task_ids,
            chain,
            aliases,
            sender,
            since,
            max_turns,
            max_new_tasks,
            legacy_keys,
            who,
        )

    async def task(self, task_id: str) -> TaskRef | None:
        return await self._read(reads.task, task_id)

    async def participants(self, task_id: str) -> list[str]:
        rows = await self._all("SELECT addr FROM participant WHERE task_id=? ORDER BY addr", (task_id,))
        return [str(r["addr"]) for r in rows]

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

    async def outbox_by_mail_from(self, mail_from: str) -> OutboxRow | None:
        """The reply sent with envelope sender `mail_from` (its VERP address), if any."""
        found = await self._one("SELECT * FROM outbox WHERE mail_from=? LIMIT 1", (mail_from.lower(),))
        row: OutboxRow | None = row_of(OutboxRow, found)
        return row

    async def bounces_of(self, outbox_ids: Sequence[str]) -> list[BounceRow]:
        """The bounces recorded for the replies `outbox_ids`, oldest first."""
        if not outbox_ids:
            return []
        marks = ",".join("?" * len(outbox_ids))
        sql = f"SELECT * FROM bounce WHERE outbox_id IN ({marks}) ORDER BY id"  # noqa: S608
        return [row_of(BounceRow, r) for r in await self._all(sql, list(outbox_ids))]

    async def bounce_reported_by(self, inbound_id: str) -> list[BounceRow]:
        """The bounces that the message `inbound_id` (a bounce report to a VERP address) recorded."""
        rows = await self._all("SELECT * FROM bounce WHERE inbound_id=? ORDER BY id", (inbound_id,))
        return [row_of(BounceRow, r) for r in rows]

    async def is_suppressed(self, addr: str) -> bool:
        """Does `addr` get no more notices (its hard bounces reached MAILGATE_BOUNCE_LIMIT)?"""
        sql = "SELECT 1 FROM suppression WHERE addr=? AND suppressed_at IS NOT NULL"
        return await self._one(sql, (addr.lower(),)) is not None

    async def suppressed(self) -> list[SuppressionRow]:
        """Every address that gets no more notices, oldest suppression first."""
        sql = "SELECT * FROM suppression WHERE suppressed_at IS NOT NULL ORDER BY suppressed_at"
        return [row_of(SuppressionRow, r) for r in await self._all(sql)]

    async def raw(self, raw_id: str) -> bytes:
        # through the blob API: a SELECT of a 40 MB blob peaks at twice its size, this at once
        try:
            found: tuple[bytes, int, float | None] | None = await self._reader._execute(  # type: ignore[no-untyped-call]
                _read_blob, self._reader._conn, raw_id
            )
        except sqlite3.Error as exc:
            raise StoreBusy(f"read failed: {exc}") from exc
        if found is None:
            raise RawMissing(f"raw message {raw_id} is missing")
        data, size, pruned_at = found
        if pruned_at is not None or len(data) < size:
            raise RawMissing(f"raw message {raw_id} was not kept whole (ignored mail, or pruned)")
        return data

    async def inbound(self, inbound_id: str) -> InboundRow | None:
        row: InboundRow | None = row_of(
            InboundRow, await self._one("SELECT * FROM inbound WHERE id=?", (inbound_id,))
        )
        return row

    async def task_row(self, task_id: str) -> TaskRow | None:
        row: TaskRow | None = row_of(TaskRow, await self._one("SELECT * FROM task WHERE id=?", (task_id,)))
        return row

    async def outbox_row(self, outbox_id: str) -> OutboxRow | None:
        row: OutboxRow | None = row_of(
            OutboxRow, await self._one("SELECT * FROM outbox WHERE id=?", (outbox_id,))
        )
        return row

    async def watch(self, *, on_inbound: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        """Nothing to watch: only this process commits work, and it wakes its own loops."""

    async def claim_outbox(self, now: float, limit: int, busy: set[str]) -> list[OutboxRow]:
        """The due outbox rows not in `busy` (the outbox's own set: the claim)."""
        rows = await self._all(
            "SELECT * FROM outbox WHERE state IN ('pending','retry') AND next_attempt_at<=? "
            "ORDER BY id LIMIT ?",
            (now, limit + len(busy)),
        )
        return [row_of(OutboxRow, r) for r in rows if r["id"] not in busy][:limit]

    async def release_outbox(self, outbox_id: str) -> None:
        """Nothing to hand back: the outbox's busy set is the claim."""

    async def claim_inbound(self, now: float, limit: int, busy: set[str]) -> list[InboundRow]:
        """The due messages not in `busy` (the scheduler's own set: the claim), each its task's oldest
        unfinished one. Ids first, then the rows of those taken: the ids of the jobs in hand come back
        too, and are cheap."""
        return await self._inbound_rows(await self._runnable_ids(now, limit, busy))

    async def release_inbound(self, inbound_id: str) -> None:
        """Nothing to hand back: the scheduler's busy set is the claim."""

    async def _runnable_ids(self, now: float, limit: int, busy: set[str]) -> list[str]:
        rows = await self._all(
            f"SELECT id FROM inbound i WHERE state IN ({ACTIVE_SQL}) AND next_attempt_at<=? "  # noqa: S608
            f"AND (task_id IS NULL OR NOT EXISTS (SELECT 1 FROM inbound j WHERE j.task_id=i.task_id "
            f"AND j.id<i.id AND j.state IN ({ACTIVE_SQL}) AND {BLOCKS})) ORDER BY id LIMIT ?",
            (now, limit + len(busy)),
        )
        return [str(r["id"]) for r in rows if r["id"] not in busy][:limit]

    async def _inbound_rows(self, ids: Sequence[str]) -> list[InboundRow]:
        """The rows of `ids` (those that exist), in id order, in one read."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = await self._all(f"SELECT * FROM inbound WHERE id IN ({marks}) ORDER BY id", list(ids))  # noqa: S608
        return [row_of(InboundRow, r) for r in rows]

    async def next_due_after(self, table: str, now: float) -> float | None:
        """Like `next_due`, but only rows due later than `now`: rows due already are in hand, or wait for
        a free slot (a finishing job wakes the loop), so they must not make the loop spin."""
        states = ACTIVE_SQL if table == "inbound" else "'pending','retry'"
        row = await self._one(
            f"SELECT min(next_attempt_at) AS t FROM {table} WHERE state IN ({states}) AND next_attempt_at>?",  # noqa: S608
            (now,),
        )
        return None if row is None or row["t"] is None else float(row["t"])

    async def raw_head(self, raw_id: str, size: int = 65536) -> bytes:
        """The start of a raw message, at most `size` bytes: enough for an operator to see its header."""
        row = await self._one("SELECT substr(data, 1, ?) AS head FROM raw_message WHERE id=?", (size, raw_id))
        if row is None:
            raise RawMissing(f"raw message {raw_id} is missing")
        return bytes(row["head"])

    async def list_inbound(self, state: str | None = None, limit: int = 50) -> list[InboundRow]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        rows = await self._all(f"SELECT * FROM inbound {where} ORDER BY id DESC LIMIT ?", [*params, limit])  # noqa: S608
        return [row_of(InboundRow, r) for r in rows]

    async def list_outbox(self, state: str | None = None, limit: int = 50) -> list[OutboxRow]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        rows = await self._all(f"SELECT * FROM outbox {where} ORDER BY id DESC LIMIT ?", [*params, limit])  # noqa: S608
        return [row_of(OutboxRow, r) for r in rows]

    async def list_tasks(self, limit: int = 50) -> list[TaskListing]:
        """The newest tasks, each with the state of its newest message (its status) and that one's time."""
        rows = await self._all(
            "SELECT t.*, m.state AS status, m.received_at AS last_message_at FROM "
            "(SELECT * FROM task ORDER BY created_at DESC LIMIT ?) t "
            "LEFT JOIN inbound m ON m.id = (SELECT max(id) FROM inbound WHERE task_id = t.id) "
            "ORDER BY t.created_at DESC",
            (limit,),
        )
        return [row_of(TaskListing, r) for r in rows]

    async def find_message_id(self, message_id: str) -> tuple[list[InboundRow], list[OutboxRow]]:
        """The inbound messages and the replies carrying Message-ID `message_id` (angle brackets or not)."""
        wanted = message_id.strip()
        wanted = wanted if wanted.startswith("<") else f"<{wanted}>"
        inbound = await self._all("SELECT * FROM inbound WHERE message_id=? ORDER BY id", (wanted,))
        outbox = await self._all("SELECT * FROM outbox WHERE message_id=? ORDER BY id", (wanted,))
        return [row_of(InboundRow, r) for r in inbound], [row_of(OutboxRow, r) for r in outbox]

    async def count_by_state(self) -> dict[str, dict[str, int]]:
        """Rows per state: `{"inbound": {"queued": 3, ...}, "outbox": {"sent": 9, ...}}`."""
        counts: dict[str, dict[str, int]] = {"inbound": {}, "outbox": {}}
        for table in counts:
            rows = await self._all(f"SELECT state, count(*) AS n FROM {table} GROUP BY state")  # noqa: S608
            counts[table] = {str(r["state"]): int(r["n"]) for r in rows}
        return counts

    async def oldest_waiting(self) -> InboundRow | None:
        """The oldest inbound message not yet at rest (received, queued, submitting or running)."""
        row: InboundRow | None = row_of(
            InboundRow,
            await self._one(
                f"SELECT * FROM inbound WHERE state IN ({ACTIVE_SQL}) ORDER BY received_at LIMIT 1"  # noqa: S608
            ),
        )
        return row

    async def recent_problems(self, limit: int = 5) -> list[Problem]:
        """The newest troubles, newest first: failed messages, messages waiting on a retry with an error,
        and replies dead or waiting on a retry."""
        rows = await self._all(
            "SELECT * FROM ("  # noqa: S608 (constants)
            "SELECT updated_at AS at, 'inbound' AS tbl, id, state, coalesce(reason, last_error) AS error "
            "FROM inbound WHERE state='failed' OR (last_error IS NOT NULL AND state IN "
            f"({ACTIVE_SQL})) "
            "UNION ALL SELECT updated_at, 'outbox', id, state, last_error FROM outbox "
            "WHERE state IN ('dead','retry') AND last_error IS NOT NULL"
            ") ORDER BY at DESC LIMIT ?",
            (limit,),
        )
        return [
            Problem(float(r["at"]), str(r["tbl"]), str(r["id"]), str(r["state"]), str(r["error"] or ""))
            for r in rows
        ]

    async def api_hold(self) -> dict[str, Any] | None:
        """The hold a running gateway recorded while the API refuses its key: `{"since", "reason"}`."""
        row = await self._one("SELECT value FROM meta WHERE key='api_hold'")
        return api_hold_of(None if row is None else row["value"])

    async def set_api_hold(self, since: float, reason: str) -> None:
        """Record that the API refuses the key (for `mailgate status`; the gateway holds in memory)."""
        value = api_hold_value(since, reason)
        await self.write([("INSERT OR REPLACE INTO meta (key, value) VALUES ('api_hold', ?)", (value,))])

    async def clear_api_hold(self) -> None:
        await self.write([("DELETE FROM meta WHERE key='api_hold'", ())])

    async def check_writable(self) -> None:
        """Commit a small write (the time, under `ready_probe`), so a store that cannot take writes
        (read-only, full, failing) says so with `StoreBusy`."""
        value = str(time.time())
        await self.write([("INSERT OR REPLACE INTO meta (key, value) VALUES ('ready_probe', ?)", (value,))])

    async def outbox_for(self, inbound_id: str) -> list[OutboxRow]:
        rows = await self._all("SELECT * FROM outbox WHERE inbound_id=? ORDER BY id", (inbound_id,))
        return [row_of(OutboxRow, r) for r in rows]

    async def messages_of_task(self, task_id: str) -> list[InboundRow]:
        rows = await self._all("SELECT * FROM inbound WHERE task_id=? ORDER BY id", (task_id,))
        return [row_of(InboundRow, r) for r in rows]

    async def file_hashes_of_task(self, task_id: str, before: str) -> set[str]:
        """The sha256 of every file the task's messages older than `before` sent to the API."""
        rows = await self._all(
            "SELECT files FROM inbound WHERE task_id=? AND id<? AND files IS NOT NULL", (task_id, before)
        )
        return {f["sha256"] for r in rows for f in json.loads(r["files"] or "[]")}

    async def thread_chain(self, task_id: str, before: str, *, limit: int) -> list[str]:
        """The Message-IDs of a task's messages older than `before` (both directions), oldest first: the
        first message and the newest `limit - 1`, each followed by the replies mailgate sent to it."""
        rows = await self._all(
            "SELECT id, message_id FROM inbound WHERE task_id=? AND id<? ORDER BY id", (task_id, before)
        )
        if len(rows) > limit:  # the first, then the newest `limit - 1` (none of them when limit is 1)
            rows = [rows[0], *rows[len(rows) - limit + 1 :]]
        chain: list[str] = []
        for row in rows:
            if row["message_id"]:
                chain.append(str(row["message_id"]))
            sent = await self._all(
                "SELECT message_id FROM outbox WHERE inbound_id=? ORDER BY id", (row["id"],)
            )
            chain += [str(r["message_id"]) for r in sent]
        return chain

    # --- state changes (named: each is one transaction) ------------------------------------------------

    async def admit(self, admitted: Admitted) -> None:
        """Commit one accepted DATA: the raw bytes and every row that refers to them, durably."""
        statements = _raw_statements(admitted.raw_id, admitted.sha256, admitted.data, admitted.full_size)
        statements += [insert_row("task", task) for task in admitted.tasks]
        for message in admitted.messages:
            values = asdict(message)
            values["updated_at"] = message.received_at
            statements.append(insert("inbound", values))
        statements += [
            insert("participant", {"task_id": task_id, "addr": addr}, or_ignore=True)
            for task_id, addr in admitted.participants
        ]
        statements += [
            insert(
                "thread_message",
                {"message_id": message_id, "task_id": task_id, "direction": "in"},
                or_ignore=True,
            )
            for message_id, task_id in admitted.thread_ids
        ]
        for inbound_id, bounce in admitted.bounces:
            statements += _bounce_statements(inbound_id, bounce, admitted.received_at, admitted.bounce_limit)
        await self.write(statements)

    async def prune_raw(self, before: float, *, limit: int = 200) -> Pruned:
        """Cut up to `limit` raw messages to their header block: those whose messages all finished
        (answered, ignored, failed) and changed last before `before`. Each is marked `pruned_at`."""
        found = await self._read(reads.prune_candidates, before, limit, PRUNE_WINDOW)
        if not found:
            return Pruned()
        now = time.time()
        sql = (
            "UPDATE raw_message AS r SET data=substr(data, 1, ?), pruned_at=? "  # noqa: S608
            f"WHERE r.id=? AND {reads.PRUNABLE}"
        )
        await self.write([(sql, (head, now, raw_id, before)) for raw_id, _, head in found])
        return Pruned(len(found), sum(stored - head for _, stored, head in found))

    async def count_crash(self, inbound_id: str, crashes: int) -> None:
        """Count an attempt before the work it guards, so a message that kills the process is caught."""
        await self._set_inbound(inbound_id, crashes=crashes)

    async def set_turn_input(
        self,
        inbound_id: str,
        *,
        input: str,
        files: Sequence[dict[str, Any]],
        skipped: Sequence[dict[str, str]],
    ) -> None:
        """`received -> queued`: the turn's input and its spooled files are known."""
        await self._set_inbound(
            inbound_id,
            state=InboundState.QUEUED,
            input=input,
            crashes=0,
            files=json.dumps(list(files)),
            skipped=json.dumps(list(skipped)),
        )

    async def set_files(self, inbound_id: str, files: Sequence[dict[str, Any]]) -> None:
        """The spooled files were made again: the state and the input stay as they are."""
        await self._set_inbound(inbound_id, files=json.dumps(list(files)))

    async def mark_submitting(self, inbound_id: str, *, turn_seq: int, attempts: int) -> None:
        """About to POST the turn numbered `turn_seq`: from here on it may exist at the API."""
        await self._set_inbound(
            inbound_id, state=InboundState.SUBMITTING, turn_seq=turn_seq, attempts=attempts
        )

    async def mark_running(self, inbound_id: str, *, turn_seq: int | None = None) -> None:
        """The API has the turn: wait for its end."""
        values: dict[str, Any] = {"state": InboundState.RUNNING, "last_error": None}
        values["started_at"] = time.time()  # the acknowledgement of a long turn counts from here
        if turn_seq is not None:
            values["turn_seq"] = turn_seq
        await self._set_inbound(inbound_id, **values)

    async def reschedule(
        self,
        inbound_id: str,
        at: float,
        *,
        state: str | None = None,
        error: str | None = None,
        crashes: int | None = None,
        replies: Sequence[NewReply] = (),
    ) -> None:
        """Look at the message again at `at` (a retry, a poll, a hold), keeping or changing its state;
        `replies` (a notice to the sender of a held message) are queued in the same transaction.

        A plain wait (a poll of a running turn, a lost POST settling) leaves `updated_at` alone: it says
        since when the row has been in its state, which is what those waits measure.
        """
        values: dict[str, Any] = {"next_attempt_at": at}
        if state is not None:
            values["state"] = state
        if error is not None:
            values["last_error"] = error[:500]
        if crashes is not None:
            values["crashes"] = crashes
        if len(values) > 1:
            values["updated_at"] = time.time()
        await self.write([*_reply_statements(replies), update("inbound", inbound_id, **values)])

    async def acknowledge(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> None:
        """The sender is told the turn is being worked on (`replies`: the notice, if the limits let it
        go): remembered on the row in the same transaction, so a turn is acknowledged at most once.
        `updated_at` is left alone (it says since when the row has been in its state)."""
        now = time.time()
        sql = "UPDATE inbound SET acked_at=? WHERE id=?"
        await self.write([*_reply_statements(replies), (sql, (now, inbound_id))])

    async def finish(
        self,
        inbound_id: str,
        state: str,
        reason: str | None,
        replies: Sequence[NewReply] = (),
        *,
        turn_seq: int | None = None,
        task_id: str | None = None,
        task_url: str | None = None,
        task_turns: int | None = None,
        turn_status: str | None = None,
    ) -> None:
        """End a message (`answered`, `failed`, `ignored`) and queue its replies, in one transaction.
        `turn_status`: how its turn ended at the API, when it ran one to its end."""
        now = time.time()
        statements = _reply_statements(replies)
        ending: dict[str, Any] = {"state": state, "reason": reason, "updated_at": now, "next_attempt_at": 0}
        if turn_seq is not None:
            ending["turn_seq"] = turn_seq
        if turn_status is not None:
            ending["turn_status"] = turn_status
        statements.append(update("inbound", inbound_id, **ending))
        if task_id is not None and task_turns is not None:
            statements.append(update("task", task_id, url=task_url, turns=task_turns))
        await self.write(statements)

    async def record_delivery(
        self,
        outbox_id: str,
        state: str,
        *,
        attempts: int,
        error: str | None,
        next_attempt_at: float = 0.0,
        refused: dict[str, str] | None = None,
        sent_at: float | None = None,
        reply: str | None = None,
    ) -> None:
        """What one delivery attempt of an outbox row came to (`sent`, `retry`, `dead`): `error` what
        went wrong (None clears it), `reply` the relay's answer when it took the message."""
        values: dict[str, Any] = {
            "state": state,
            "attempts": attempts,
            "last_error": (error or "")[:1000] or None,
            "next_attempt_at": next_attempt_at,
        }
        if reply is not None:
            values["relay_reply"] = reply[:1000]
        if refused is not None:
            values["refused"] = json.dumps(refused) if refused else None
        if sent_at is not None:
            values["sent_at"] = sent_at
        await self._set_outbox(outbox_id, **values)

    async def set_task_worker(self, task_id: str, worker_id: str) -> None:
        """A task not yet created at the API starts on `worker_id` (MAILGATE_WORKERS changed meanwhile)."""
        await self.write([update("task", task_id, worker_id=worker_id)])

    async def use_fallback(self, outbox_id: str) -> None:
        """The relay refused an outbox row's size: its links-only version becomes the message to send."""
        await self.write(
            [
                (
                    "UPDATE outbox SET data=fallback, fallback=NULL, updated_at=? "
                    "WHERE id=? AND fallback IS NOT NULL",
                    (time.time(), outbox_id),
                )
            ]
        )

    async def archive_task(self, task_id: str) -> None:
        """The task was archived at the API: later replies in its thread start a new task."""
        await self.write([update("task", task_id, archived=1)])

    async def _set_inbound(self, inbound_id: str, **values: Any) -> None:
        await self.write([update("inbound", inbound_id, updated_at=time.time(), **values)])

    async def _set_outbox(self, outbox_id: str, **values: Any) -> None:
        await self.write([update("outbox", outbox_id, updated_at=time.time(), **values)])

    async def reset_for_restart(self) -> None:
        """On start-up: everything in flight is due now (its state says where to resume)."""
        now = time.time()
        await self.write(
            [
                (
                    f"UPDATE inbound SET next_attempt_at=? WHERE state IN ({ACTIVE_SQL}) "  # noqa: S608 (constants)
                    "AND next_attempt_at>?",
                    (now, now),
                ),
            ]
        )

    async def replay_inbound(self, inbound_id: str) -> bool:
        row = await self.inbound(inbound_id)
        if row is None or row.state not in (InboundState.FAILED, InboundState.IGNORED):
            return False
        raw = await self._one(
            "SELECT size, length(data) AS kept, pruned_at FROM raw_message WHERE id=?", (row.raw_id,)
        )
        if raw is None or raw["pruned_at"] is not None or raw["kept"] < raw["size"]:
            return False  # its raw bytes are gone (pruned), or were never kept whole (ignored mail)
        state = InboundState.QUEUED if row.input is not None else InboundState.RECEIVED
        again: dict[str, Any] = {}
        if row.turn_status is not None and row.turn_seq is not None:
            # its turn ran to its end (in error): a new turn is posted, after that one. With no attempt
            # counted, nothing is "recovered"; the POST looks at the task first and numbers the new turn
            # after every turn there, so the old one is never taken for it.
            again = {"attempts": 0, "turn_seq": row.turn_seq + 1, "turn_status": None}
        # otherwise attempts are kept: a turn that may have reached the API is looked for before any POST
        await self._set_inbound(
            inbound_id,
            state=state,
            reason=None,
            crashes=0,
            next_attempt_at=0,
            last_error=None,
            received_at=time.time(),
            **again,
        )
        return True

    async def unsuppress(self, addr: str) -> bool:
        """Send notices to `addr` again; its earlier hard bounces no longer count. False when it was
        not suppressed."""
        if not await self.is_suppressed(addr):
            return False
        now = time.time()
        sql = "UPDATE suppression SET suppressed_at=NULL, reason=NULL, cleared_at=? WHERE addr=?"
        await self.write([(sql, (now, addr.lower()))])
        return True

    # --- the loop breaker, held mail and the stored allow list (issue 19) -------------------------------

    async def reply_times(self, addr: str, since: float, limit: int) -> list[float]:
        """When the newest replies (answers and notices) to `addr` due from `since` on go or went, newest
        first, at most `limit`: what MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR counts."""
        rows = await self._all(
            "SELECT at FROM reply_log WHERE addr=? AND at>=? ORDER BY at DESC LIMIT ?",
            (addr.lower(), since, limit),
        )
        return [float(r["at"]) for r in rows]

    async def reserve_reply(
        self, outbox_id: str, addrs: Sequence[str], now: float, limit: int, *, wait: bool
    ) -> float | None:
        """A place for one reply to `addrs` under `limit` replies per address per hour, taken in one
        write transaction (so concurrent replies count each other): the time it may go (`now`, or with
        `wait` the earliest time every address has room), recorded; None when it would have to wait and
        `wait` is False (nothing recorded)."""
        wanted = sorted({a.lower() for a in addrs})
        try:
            at: float | None = await self._writer._execute(  # type: ignore[no-untyped-call]
                _reserve, self._writer._conn, outbox_id, wanted, now, limit, wait
            )
        except sqlite3.Error as exc:
            raise StoreBusy(f"commit failed: {exc}") from exc
        self.batches += 1
        return at

    async def count_replies(self, since: float, until: float, limit: int) -> int:
        """Replies of the whole gateway due between `since` and `until`, counted up to `limit`: what
        MAILGATE_MAX_REPLIES_PER_MINUTE counts."""
        row = await self._one(
            "SELECT count(*) AS n FROM (SELECT DISTINCT outbox_id FROM reply_log WHERE at>=? AND at<=? "
            "LIMIT ?)",
            (since, until, limit),
        )
        return int(row["n"]) if row else 0

    async def forget_replies(self, before: float) -> None:
        """Drop the loop breaker's record of replies due before `before` (it counts the last hour)."""
        await self.write([("DELETE FROM reply_log WHERE at<?", (before,))])

    async def task_busy_before(self, task_id: str, before: str) -> bool:
        """Is a message of the task older than `before` still active (its turn comes first)?"""
        row = await self._one(
            f"SELECT 1 AS x FROM inbound WHERE task_id=? AND id<? AND state IN ({ACTIVE_SQL}) LIMIT 1",  # noqa: S608
            (task_id, before),
        )
        return row is not None

    async def held_untold(self, limit: int = 50) -> list[InboundRow]:
        """Held messages whose sender has not been told yet that they wait for approval, oldest first."""
        rows = await self._all(
            "SELECT * FROM inbound WHERE state='held' AND told_at IS NULL ORDER BY id LIMIT ?", (limit,)
        )
        return [row_of(InboundRow, r) for r in rows]

    async def count_held(self, limit: int) -> int:
        sql = "SELECT count(*) FROM (SELECT 1 FROM inbound WHERE state='held' LIMIT ?)"
        row = await self._one(sql, (limit,))
        return int(row[0]) if row is not None else 0

    async def tell_held(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> bool:
        """Remember that the sender of the held message was told (queueing `replies`, the notice, if any,
        in the same transaction). False when it is no longer held or was told already."""
        row = await self.inbound(inbound_id)
        if row is None or row.state != InboundState.HELD or row.told_at is not None:
            return False
        sql = "UPDATE inbound SET told_at=? WHERE id=? AND state='held' AND told_at IS NULL"
        await self.write([*_reply_statements(replies), (sql, (time.time(), inbound_id))])
        return True

    async def approve_held(self, inbound_id: str) -> InboundRow | None:
        """`held -> received`: the message runs as if its sender were allowed. Its row, or None when it
        is not held."""
        row = await self.inbound(inbound_id)
        if row is None or row.state != InboundState.HELD:
            return None
        now = time.time()
        sql = (
            "UPDATE inbound SET state='received', next_attempt_at=0, updated_at=?, last_error=NULL "
            "WHERE id=? AND state='held'"
        )
        await self.write([(sql, (now, inbound_id))])
        return await self.inbound(inbound_id)

    async def deny_held(self, inbound_id: str) -> bool:
        """`held -> ignored`, refused by the operator. False when it is not held."""
        row = await self.inbound(inbound_id)
        if row is None or row.state != InboundState.HELD:
            return False
        sql = "UPDATE inbound SET state='ignored', reason=?, updated_at=? WHERE id=? AND state='held'"
        await self.write([(sql, (DENIED, time.time(), inbound_id))])
        return True

    async def drop_held(self, before: float) -> list[InboundRow]:
        """Held messages received before `before` end `ignored` (dropped); returns them as they were."""
        rows = [
            row_of(InboundRow, r)
            for r in await self._all(
                "SELECT * FROM inbound WHERE state='held' AND received_at<? ORDER BY id", (before,)
            )
        ]
        if rows:
            now = time.time()
            sql = "UPDATE inbound SET state='ignored', reason=?, updated_at=? WHERE id=? AND state='held'"
            await self.write([(sql, (DROPPED, now, row.id)) for row in rows])
        return rows

    async def allow_sender(self, addr: str, note: str | None = None) -> bool:
        """Allow `addr` to send from now on (the stored allow list); False when it was on it already."""
        addr = addr.strip().lower()
        if await self.is_allowed_sender(addr):
            return False
        values = {"addr": addr, "added_at": time.time(), "note": note}
        await self.write([insert("allowed_sender", values, or_ignore=True)])
        return True

    async def is_allowed_sender(self, addr: str) -> bool:
        """Is `addr` on the stored allow list?"""
        sql = "SELECT 1 AS x FROM allowed_sender WHERE addr=?"
        return await self._one(sql, (addr.strip().lower(),)) is not None

    async def allowed_senders(self) -> list[AllowedSenderRow]:
        """The stored allow list, oldest first."""
        rows = await self._all("SELECT * FROM allowed_sender ORDER BY added_at, addr")
        return [row_of(AllowedSenderRow, r) for r in rows]

    async def replay_outbox(self, outbox_id: str) -> bool:
        row = await self.outbox_row(outbox_id)
        if row is None or row.state != OutboxState.DEAD:
            return False
        await self._set_outbox(
            outbox_id,
            state=OutboxState.RETRY,
            attempts=0,
            next_attempt_at=0,
            last_error=None,
            created_at=time.time(),
        )
        return True


def _reserve(
    db: sqlite3.Connection, outbox_id: str, addrs: list[str], now: float, limit: int, wait: bool
) -> float | None:
    """On the writer's thread: `SqliteStore.reserve_reply` in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        at = now
        for addr in addrs:
            row = db.execute(
                "SELECT at FROM reply_log WHERE addr=? AND at>=? ORDER BY at DESC LIMIT 1 OFFSET ?",
                (addr, now - HOUR, limit - 1),
            ).fetchone()
            if row is not None:
                at = max(at, float(row[0]) + HOUR)
        if at > now and not wait:
            db.execute("ROLLBACK")
            return None
        db.executemany(
            "INSERT INTO reply_log (addr, at, outbox_id) VALUES (?, ?, ?)",
            [(addr, at, outbox_id) for addr in addrs],
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return at


def _raw_statements(raw_id: str, sha256: str, data: bytes, size: int) -> list[Statement]:
    """Insert a raw message (`data`: all of its `size` bytes, or its head). A big one goes in as a
    zeroblob filled a chunk at a time: binding the bytes whole makes SQLite copy them twice more (a 40 MB
    message cost 78 MB of peak RSS; this, 3 MB)."""
    row = {"id": raw_id, "sha256": sha256, "size": size}
    if len(data) <= BLOB_CHUNK:
        return [insert("raw_message", row | {"data": data})]
    return [
        (
            "INSERT INTO raw_message (id, sha256, size, data) VALUES (?, ?, ?, zeroblob(?))",
            (raw_id, sha256, size, len(data)),
        ),
        (_WRITE_BLOB, ("raw_message", "data", raw_id, data)),
    ]


def _write_blob(db: sqlite3.Connection, table: str, column: str, key: str, data: bytes) -> None:
    """Fill the zeroblob in `table`.`column` of the row with id `key` from `data`, a chunk at a time."""
    [(rowid,)] = db.execute(f"SELECT rowid FROM {table} WHERE id = ?", (key,)).fetchall()  # noqa: S608
    view = memoryview(data)
    with db.blobopen(table, column, rowid) as blob:
        for start in range(0, len(view), BLOB_CHUNK):
            blob.write(view[start : start + BLOB_CHUNK])


def _read_blob(db: sqlite3.Connection, raw_id: str) -> tuple[bytes, int, float | None] | None:
    """On the reader's thread: a raw message's stored bytes (read through the blob API), its whole size
    and when it was pruned; None if missing."""
    sql = "SELECT rowid, size, pruned_at FROM raw_message WHERE id = ?"
    found = db.execute(sql, (raw_id,)).fetchall()  # stepped to its end: no open cursor
    if not found:
        return None
    rowid, size, pruned_at = found[0]
    with db.blobopen("raw_message", "data", rowid, readonly=True) as blob:
        return blob.read(), int(size), pruned_at


def _reply_statements(replies: Sequence[NewReply]) -> list[Statement]:
    """Queue `replies` in the outbox, each Message-ID recorded as part of its task's thread."""
    statements: list[Statement] = []
    for reply in replies:
        values = asdict(reply)
        values |= {
            "recipients": json.dumps(list(reply.recipients)),
            "state": OutboxState.PENDING,
            "updated_at": reply.created_at,
        }
        statements.append(insert("outbox", values))
        if reply.task_id:
            statements.append(
                insert(
                    "thread_message",
                    {"message_id": reply.message_id, "task_id": reply.task_id, "direction": "out"},
                    or_ignore=True,
                )
            )
    return statements


def _bounce_statements(inbound_id: str, bounce: NewBounce, now: float, limit: int) -> list[Statement]:
    """Record a bounce of our reply: the `bounce` row, the reply `bounced` (a row still being retried
    keeps its state, with the bounce noted), and for a hard bounce that reaches `limit` in the window
    the address suppressed (hard bounces before an `unsuppress` no longer count)."""
    addr = bounce.addr.lower() if bounce.addr else None
    statements: list[Statement] = [
        insert(
            "bounce",
            {
                "outbox_id": bounce.outbox_id,
                "inbound_id": inbound_id,
                "addr": addr,
                "status": bounce.status,
                "diagnostic": (bounce.diagnostic or "")[:1000] or None,
                "hard": int(bounce.hard),
                "at": now,
            },
        ),
        (
            "UPDATE outbox SET bounced_at=?, bounce_status=?, bounce_diagnostic=?, updated_at=?, "
            "state=CASE WHEN state='sent' THEN 'bounced' ELSE state END WHERE id=?",
            (now, bounce.status, (bounce.diagnostic or "")[:1000] or None, now, bounce.outbox_id),
        ),
    ]
    if bounce.hard and addr:
        statements.append(
            (
                "INSERT INTO suppression (addr, suppressed_at, reason) SELECT ?, ?, ? WHERE (SELECT count(*) "
                "FROM bounce WHERE addr=? AND hard=1 AND at>=max(?, coalesce((SELECT cleared_at FROM "
                "suppression WHERE addr=?), 0))) >= ? ON CONFLICT(addr) DO UPDATE SET "
                "suppressed_at=excluded.suppressed_at, reason=excluded.reason "
                "WHERE suppression.suppressed_at IS NULL",
                (
                    addr,
                    now,
                    f"{limit} hard bounces in 30 days (the last: {bounce.status or 'no status'})",
                    addr,
                    now - BOUNCE_WINDOW,
                    addr,
                    limit,
                ),
            )
        )
    return statements


def probe(path: Path) -> int:
    """The schema version of the existing store at `path`, read without writing or creating anything.

    Synchronous (run it in a thread). `mode=ro` never creates the database; while a process has the
    store open its `-wal` and `-shm` exist and are read as they are. When no `-wal` exists nobody writes
    the store, and it is read as `immutable`, so SQLite makes no `-wal`/`-shm` of its own either.
    `StoreBusy` when it is missing, unreadable, not a database, or newer than this mailgate.
    """
    immutable = "" if Path(f"{path}-wal").exists() else "&immutable=1"
    uri = f"{path.resolve().as_uri()}?mode=ro{immutable}"
    try:
        db = sqlite3.connect(uri, uri=True)
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0 and db.execute("SELECT 1 FROM sqlite_master WHERE name='inbound'").fetchone():
                version = 1
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreBusy(f"cannot read the store at {path}: {exc}") from exc
    if version > VERSION:
        raise StoreBusy(f"the store at {path} has schema version {version}, newer than this mailgate's")
    return version


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        err = StoreBusy(f"commit failed: {exc}")
        err.__cause__ = exc
        future.set_exception(err)


async def _migrate(db: aiosqlite.Connection) -> int:
    """Bring the store to the current schema version, one step at a time, each in its own transaction;
    returns the version found (0: a new store)."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version == 0:  # a store from before versions were kept has version 1's tables, or none
        async with db.execute("SELECT 1 FROM sqlite_master WHERE name='inbound'") as cursor:
            version = 1 if await cursor.fetchone() else 0
        if version == 1:
            await db.executescript(MIGRATIONS[0])  # indexes a partial first start may have left out
    if version > VERSION:
        raise sqlite3.DatabaseError(f"the store has schema version {version}, newer than this mailgate's")
    for step in range(version, VERSION):
        await db.executescript(
            f"BEGIN IMMEDIATE; {MIGRATIONS[step]}; PRAGMA user_version={step + 1}; COMMIT;"
        )
    return version
