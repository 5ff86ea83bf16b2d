"""The PostgreSQL store: the same operations, states and guarantees as SQLite's, shared by several gateways.

Invariants:
- Every operation is one transaction on a pooled connection with `synchronous_commit = on` (set on every
  connection the pool opens), so a call that returns has committed durably: `admit` before the `250`.
- **Leases.** `claim_*` takes due rows with `FOR UPDATE SKIP LOCKED`, writing this gateway's `owner` (host,
  pid, a random part: new at every start) and `lease_until = now() + MAILGATE_LEASE_SECONDS` by the
  database's clock. Rows held are renewed every third of the lease while their job runs. A row is
  claimable when nobody holds it, its lease ran out, or this gateway holds it but has no job on it (after
  a storage pause). A message past `received` is claimable only as its task's oldest unfinished one
  (one still to be read, once the earlier ones are read: `schema.BLOCKS`), so a task's turns stay in
  order across hosts.
- **Fencing.** Every change to a row is `... WHERE id = %s AND (lease_owner = <owner> OR lease_owner IS
  NULL)`; a change that finds the row claimed by another gateway raises `LeaseLost` and the transaction
  (with the replies `finish` would have queued) rolls back. Releasing a lease (the changes that end a
  job's look at a row: `reschedule`, `finish`, `record_delivery`; `release_*`; `close` for every lease
  left) clears `lease_until` but keeps `lease_owner`: a row once claimed stays fenced against every
  gateway but its last claimant, so a gateway that lost its lease cannot write after the new owner has
  finished. Only a row nobody ever claimed (operator verbs, tests) is changed without a claim.
- **Wake-ups.** Work committed for another gateway sends `NOTIFY` in the same transaction (admitted mail
  and a finished turn -> `mailgate_inbound`; queued replies -> `mailgate_outbox`), so the wake-up never
  arrives before the work is visible; `watch` LISTENs on one extra connection (reconnecting, and waking
  both loops after a reconnect, since notifications sent meanwhile are lost). The loops still look every
  few seconds, so a lost wake-up only delays work.
- Strings are stored without NUL characters (PostgreSQL's `text` cannot hold them; they become U+FFFD,
  in lookups too, so both sides agree).

psycopg errors are translated to `StoreBusy` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any, Self, TypeVar

import psycopg
from psycopg import AsyncPipeline
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool

from mailgate.errors import LeaseLost, RawMissing, StoreBusy
from mailgate.models import InboundState, OutboxState, TaskRef
from mailgate.store import pg_reads, pg_schema
from mailgate.store.base import Queue
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import (
    ACTIVE_SQL,
    BLOCKS,
    DENIED,
    DROPPED,
    FINISHED_SQL,
    PRUNE_WINDOW,
    Admitted,
    AllowedSenderRow,
    BounceRow,
    InboundRow,
    NewBounce,
    NewReply,
    OutboxRow,
    Problem,
    Pruned,
    SuppressionRow,
    TaskListing,
    TaskRow,
    api_hold_of,
    api_hold_value,
)

log = logging.getLogger("mailgate.store")

Conn = psycopg.AsyncConnection[DictRow]
Statement = tuple[str, Sequence[Any] | Mapping[str, Any]]
T = TypeVar("T")

POOL_SIZE = 10  # connections per gateway, plus one for LISTEN
BOUNCE_WINDOW = 30 * 86400.0  # hard bounces counted towards MAILGATE_BOUNCE_LIMIT over this long
CHANNEL = {"inbound": "mailgate_inbound", "outbox": "mailgate_outbox"}
_DUE = {"inbound": f"state IN ({ACTIVE_SQL})", "outbox": "state IN ('pending','retry')"}
_FREE = "(lease_until IS NULL OR lease_until < now() OR lease_owner = %(me)s)"
# libpq: notice a dead peer (a partition without a reset) within about a minute
_KEEPALIVE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}

CLAIM_INBOUND = f"""
UPDATE inbound SET lease_owner = %(me)s, lease_until = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT i.id FROM inbound i
    WHERE i.state IN ({ACTIVE_SQL}) AND i.next_attempt_at <= %(now)s AND {_FREE.replace("lease", "i.lease")}
      AND NOT (i.id = ANY(%(busy)s::text[]))
      AND (i.task_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM inbound j
          WHERE j.task_id = i.task_id AND j.id < i.id AND j.state IN ({ACTIVE_SQL}) AND {BLOCKS}))
    ORDER BY i.id LIMIT %(n)s
    FOR UPDATE SKIP LOCKED)
RETURNING *
"""  # noqa: S608 (constants only)

CLAIM_OUTBOX = f"""
UPDATE outbox SET lease_owner = %(me)s, lease_until = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT o.id FROM outbox o
    WHERE o.state IN ('pending','retry') AND o.next_attempt_at <= %(now)s
      AND {_FREE.replace("lease", "o.lease")} AND NOT (o.id = ANY(%(busy)s::text[]))
    ORDER BY o.id LIMIT %(n)s
    FOR UPDATE SKIP LOCKED)
RETURNING *
"""  # noqa: S608


# `SqliteStore.prune_raw`'s two steps in one: each raw message whose messages all finished before
# `before` is cut to its header block (the first blank line in its first `window` bytes).
PRUNE = f"""
WITH c AS (
    SELECT r.id, octet_length(r.data) AS stored, substring(r.data FROM 1 FOR %(window)s) AS win
    FROM raw_message r
    WHERE r.pruned_at IS NULL AND NOT EXISTS (SELECT 1 FROM inbound i WHERE i.raw_id = r.id
        AND (i.state NOT IN ({FINISHED_SQL}) OR i.updated_at >= %(before)s))
    ORDER BY r.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), h AS (
    SELECT id, stored, LEAST(stored,
        coalesce(nullif(position('\\x0d0a0d0a'::bytea IN win), 0) + 3, octet_length(win)),
        coalesce(nullif(position('\\x0a0a'::bytea IN win), 0) + 1, octet_length(win))) AS head
    FROM c
)
UPDATE raw_message r SET data = substring(r.data FROM 1 FOR h.head), pruned_at = extract(epoch FROM now())
FROM h WHERE r.id = h.id
RETURNING h.stored, h.head
"""  # noqa: S608 (constants)


def clean(value: Any) -> Any:
    """`value` with NUL characters in its strings (also inside lists and dicts) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


def row_of(cls: type[T], row: Mapping[str, Any] | None) -> T | None:
    if row is None:
        return None
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in row.items() if k in names})


def rows_of(cls: type[T], rows: Sequence[Mapping[str, Any]]) -> list[T]:
    return [r for r in (row_of(cls, row) for row in rows) if r is not None]


def insert(table: str, values: Mapping[str, Any], *, or_ignore: bool = False) -> Statement:
    cols = ",".join(values)
    marks = ",".join(["%s"] * len(values))
    tail = " ON CONFLICT DO NOTHING" if or_ignore else ""
    return f"INSERT INTO {table} ({cols}) VALUES ({marks}){tail}", list(values.values())  # noqa: S608


def notify(queue: Queue, owner: str) -> Statement:
    return "SELECT pg_notify(%s, %s)", [CHANNEL[queue], owner]


class PostgresStore:
    """The PostgreSQL store (`base.Store`). Open with `await PostgresStore.open(url)`, close with
    `close()` (which hands back every lease this gateway still holds)."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], url: str, *, lease_seconds: float, owner: str
    ) -> None:
        self._pool = pool
        self._url = url
        self.lease_seconds = lease_seconds
        self.owner = owner
        self.batches = 0
        self.schema_version = pg_schema.VERSION
        self.migrated_from = pg_schema.VERSION
        self._held: dict[Queue, set[str]] = {"inbound": set(), "outbox": set()}
        self._background: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, url: str, *, lease_seconds: float = 60.0, pool_size: int = POOL_SIZE) -> Self:
        """Connect, migrate to the current schema (under an advisory lock), and open the pool."""
        owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        try:
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=15, application_name="mailgate"
            ) as conn:
                found = await pg_schema.migrate(conn)
                fsync = await (await conn.execute("SHOW fsync")).fetchone()
            if fsync and fsync[0] != "on":
                log.warning("postgres_fsync_off: the server runs with fsync=off; a 250 is not durable")
            pool = AsyncConnectionPool(
                url,
                connection_class=psycopg.AsyncConnection[DictRow],
                kwargs={
                    "autocommit": True,
                    "row_factory": dict_row,
                    "application_name": "mailgate",
                    **_KEEPALIVE,
                },
                min_size=1,
                max_size=pool_size,
                open=False,
                configure=_configure,
                name="mailgate",
            )
            await pool.open(wait=True, timeout=15)
        except (psycopg.Error, OSError, RuntimeError) as exc:
            raise StoreBusy(f"cannot open the PostgreSQL store: {exc}") from exc
        store = cls(pool, url, lease_seconds=lease_seconds, owner=owner)
        store.migrated_from = found
        store._background.append(asyncio.get_running_loop().create_task(store._renew(), name="store-leases"))
        return store

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(StoreBusy):  # another gateway may resume at once, not after the lease
            async with self._transaction() as (conn, _):
                for queue in ("inbound", "outbox"):
                    await conn.execute(
                        f"UPDATE {queue} SET lease_until = NULL "  # noqa: S608
                        "WHERE lease_owner = %s AND lease_until IS NOT NULL",
                        [self.owner],
                    )
                    await conn.execute(*notify(queue, self.owner))
        await self._pool.close()

    # --- connections and errors -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self, doing: str = "read") -> AsyncIterator[Conn]:
        try:
            async with self._pool.connection() as conn:
                yield conn
        except (psycopg.Error, OSError) as exc:
            raise StoreBusy(f"{doing} failed: PostgreSQL {type(exc).__name__}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[tuple[Conn, AsyncPipeline]]:
        """One transaction in pipeline mode: BEGIN, the statements and COMMIT go out together and cost
        one round trip, unless the caller syncs the pipeline to read a result on the way (an error
        surfaces at the latest when the block ends, and the transaction rolls back)."""
        async with self._connection("commit") as conn, conn.pipeline() as pipeline, conn.transaction():
            yield conn, pipeline
        self.batches += 1

    async def _all(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[DictRow]:
        async with self._connection() as conn:
            cur = await conn.execute(sql, clean(params))
            return await cur.fetchall()

    async def _one(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> DictRow | None:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def _write(self, statements: Sequence[Statement]) -> None:
        if len(statements) == 1:  # one statement is its own transaction (autocommit): one round trip
            async with self._connection("commit") as conn:
                await conn.execute(statements[0][0], clean(statements[0][1]))
            self.batches += 1
            return
        async with self._transaction() as (conn, _):
            for sql, params in statements:
                await conn.execute(sql, clean(params))

    async def secret(self) -> str:
        """Read; made (once, whichever gateway is first) only when missing."""
        row = await self._one("SELECT value FROM meta WHERE key = 'secret'")
        if row is None:
            made = {"key": "secret", "value": secrets.token_urlsafe(32)}
            await self._write([insert("meta", made, or_ignore=True)])
            row = await self._one("SELECT value FROM meta WHERE key = 'secret'")
        assert row is not None
        return str(row["value"])

    async def watch(self, *, on_inbound: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        callbacks = {CHANNEL["inbound"]: on_inbound, CHANNEL["outbox"]: on_outbox}
        self._background.append(
            asyncio.get_running_loop().create_task(self._listen(callbacks), name="store-listen")
        )

    async def _listen(self, callbacks: dict[str, Callable[[], None]]) -> None:
        delay = 1.0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, application_name="mailgate-listen", **_KEEPALIVE
                ) as conn:
                    for channel in callbacks:
                        await conn.execute(f"LISTEN {channel}")
                    for wake in callbacks.values():  # what was committed while nobody listened
                        wake()
                    delay = 1.0
                    async for note in conn.notifies():
                        callbacks.get(note.channel, _nothing)()
            except (psycopg.Error, OSError) as exc:
                log.warning("store_listen_lost", extra={"error": str(exc), "retry_in": delay})
            await asyncio.sleep(delay)  # reconnecting, backing off; the loops poll meanwhile
            delay = min(30.0, delay * 2)

    # --- reads -----------------------------------------------------------------------------------

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
        async with self._connection() as conn:
            return await pg_reads.admission_facts(
                conn,
                clean(list(keys)),
                legacy_keys=clean(list(legacy_keys)),
                who=clean(who),
                token_task_ids=clean(list(token_task_ids)),
                chain=clean(list(chain)),
                aliases=list(aliases),
                sender=clean(sender),
                since=since,
                max_turns=max_turns,
                max_new_tasks=max_new_tasks,
            )

    async def task(self, task_id: str) -> TaskRef | None:
        row = await self._one("SELECT id, alias, owner, archived FROM task WHERE id = %s", [task_id])
        return TaskRef(row["id"], row["alias"], row["owner"], bool(row["archived"])) if row else None

    async def participants(self, task_id: str) -> list[str]:
        rows = await self._all("SELECT addr FROM participant WHERE task_id = %s ORDER BY addr", [task_id])
        return [str(r["addr"]) for r in rows]

    async def count_notices(self, addr: str, since: float, notice: str | None = None) -> int:
        sql = (
            "SELECT count(*) AS n FROM outbox "
            "WHERE kind = 'notice' AND created_at >= %s AND recipients LIKE %s"
        )
        params: list[Any] = [since, f'["{addr}"%']
        if notice is not None:
            sql += " AND notice = %s"
            params.append(notice)
        row = await self._one(sql, params)
        return int(row["n"]) if row else 0

    async def count_notices_for_task(self, task_id: str, notice: str, since: float) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM outbox WHERE task_id = %s AND notice = %s AND created_at >= %s",
            [task_id, notice, since],
        )
        return int(row["n"]) if row else 0

    async def raw(self, raw_id: str) -> bytes:
        row = await self._one("SELECT data, size, pruned_at FROM raw_message WHERE id = %s", [raw_id])
        if row is None:
            raise RawMissing(f"raw message {raw_id} is missing")
        data = bytes(row["data"])
        if row["pruned_at"] is not None or len(data) < row["size"]:
            raise RawMissing(f"raw message {raw_id} was not kept whole (ignored mail, or pruned)")
        return data

    async def raw_head(self, raw_id: str, size: int = 65536) -> bytes:
        row = await self._one(
            "SELECT substring(data FROM 1 FOR %s) AS head FROM raw_message WHERE id = %s", [size, raw_id]
        )
        if row is None:
            raise RawMissing(f"raw message {raw_id} is missing")
        return bytes(row["head"])

    async def inbound(self, inbound_id: str) -> InboundRow | None:
        return row_of(InboundRow, await self._one("SELECT * FROM inbound WHERE id = %s", [inbound_id]))

    async def task_row(self, task_id: str) -> TaskRow | None:
        return row_of(TaskRow, await self._one("SELECT * FROM task WHERE id = %s", [task_id]))

    async def outbox_row(self, outbox_id: str) -> OutboxRow | None:
        return row_of(OutboxRow, await self._one("SELECT * FROM outbox WHERE id = %s", [outbox_id]))

    async def next_due_after(self, table: Queue, now: float) -> float | None:
        """Rows not held by another gateway count at their retry time; rows held by another gateway at
        the later of that and their lease's end (in this host's clock), when this gateway may take them."""
        row = await self._one(
            f"SELECT min(t) AS t FROM (SELECT CASE WHEN {_FREE} THEN next_attempt_at "  # noqa: S608
            "ELSE greatest(next_attempt_at, %(now)s + extract(epoch FROM lease_until - now())::float8) "
            "END AS t "
            f"FROM {table} WHERE {_DUE[table]}) due WHERE t > %(now)s",
            {"me": self.owner, "now": now},
        )
        return None if row is None or row["t"] is None else float(row["t"])

    async def list_inbound(self, state: str | None = None, limit: int = 50) -> list[InboundRow]:
        return rows_of(InboundRow, await self._list("inbound", state, limit))

    async def list_outbox(self, state: str | None = None, limit: int = 50) -> list[OutboxRow]:
        return rows_of(OutboxRow, await self._list("outbox", state, limit))

    async def _list(self, table: str, state: str | None, limit: int) -> list[DictRow]:
        where, params = ("WHERE state = %s", [state]) if state else ("", [])
        return await self._all(f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT %s", [*params, limit])  # noqa: S608

    async def list_tasks(self, limit: int = 50) -> list[TaskListing]:
        """The newest tasks, each with the state of its newest message (its status) and that one's time."""
        rows = await self._all(
            "SELECT t.*, m.state AS status, m.received_at AS last_message_at FROM "
            "(SELECT * FROM task ORDER BY created_at DESC LIMIT %s) t "
            "LEFT JOIN inbound m ON m.id = (SELECT max(id) FROM inbound WHERE task_id = t.id) "
            "ORDER BY t.created_at DESC",
            [limit],
        )
        return rows_of(TaskListing, rows)

    async def outbox_for(self, inbound_id: str) -> list[OutboxRow]:
        rows = await self._all("SELECT * FROM outbox WHERE inbound_id = %s ORDER BY id", [inbound_id])
        return rows_of(OutboxRow, rows)

    async def messages_of_task(self, task_id: str) -> list[InboundRow]:
        return rows_of(
            InboundRow, await self._all("SELECT * FROM inbound WHERE task_id = %s ORDER BY id", [task_id])
        )

    async def file_hashes_of_task(self, task_id: str, before: str) -> set[str]:
        rows = await self._all(
            "SELECT files FROM inbound WHERE task_id = %s AND id < %s AND files IS NOT NULL",
            [task_id, before],
        )
        return {f["sha256"] for r in rows for f in json.loads(r["files"] or "[]")}

    async def thread_chain(self, task_id: str, before: str, *, limit: int) -> list[str]:
        async with self._connection() as conn:
            return await pg_reads.thread_chain(conn, task_id, before, limit=limit)

    async def outbox_by_mail_from(self, mail_from: str) -> OutboxRow | None:
        """The reply sent with envelope sender `mail_from` (its VERP address), if any."""
        row = await self._one("SELECT * FROM outbox WHERE mail_from = %s LIMIT 1", [mail_from.lower()])
        return row_of(OutboxRow, row)

    async def bounces_of(self, outbox_ids: Sequence[str]) -> list[BounceRow]:
        if not outbox_ids:
            return []
        rows = await self._all(
            "SELECT * FROM bounce WHERE outbox_id = ANY(%s::text[]) ORDER BY id", [list(outbox_ids)]
        )
        return rows_of(BounceRow, rows)

    async def bounce_reported_by(self, inbound_id: str) -> list[BounceRow]:
        rows = await self._all("SELECT * FROM bounce WHERE inbound_id = %s ORDER BY id", [inbound_id])
        return rows_of(BounceRow, rows)

    async def is_suppressed(self, addr: str) -> bool:
        sql = "SELECT 1 AS hit FROM suppression WHERE addr = %s AND suppressed_at IS NOT NULL"
        return await self._one(sql, [addr.lower()]) is not None

    async def suppressed(self) -> list[SuppressionRow]:
        sql = "SELECT * FROM suppression WHERE suppressed_at IS NOT NULL ORDER BY suppressed_at, addr"
        return rows_of(SuppressionRow, await self._all(sql))

    # --- for the operator and the health checks -----------------------------------------------------

    async def find_message_id(self, message_id: str) -> tuple[list[InboundRow], list[OutboxRow]]:
        wanted = message_id.strip()
        wanted = wanted if wanted.startswith("<") else f"<{wanted}>"
        async with self._connection() as conn:
            inbound, outbox = await pg_reads.by_message_id(conn, clean(wanted))
        return rows_of(InboundRow, inbound), rows_of(OutboxRow, outbox)

    async def count_by_state(self) -> dict[str, dict[str, int]]:
        async with self._connection() as conn:
            return await pg_reads.count_by_state(conn)

    async def oldest_waiting(self) -> InboundRow | None:
        row = await self._one(
            f"SELECT * FROM inbound WHERE state IN ({ACTIVE_SQL}) ORDER BY received_at LIMIT 1"  # noqa: S608
        )
        return row_of(InboundRow, row)

    async def recent_problems(self, limit: int = 5) -> list[Problem]:
        async with self._connection() as conn:
            return await pg_reads.recent_problems(conn, limit)

    async def api_hold(self) -> dict[str, Any] | None:
        row = await self._one("SELECT value FROM meta WHERE key = 'api_hold'")
        return api_hold_of(None if row is None else row["value"])

    async def set_api_hold(self, since: float, reason: str) -> None:
        value = api_hold_value(since, reason)
        await self._write([_put_meta("api_hold", value)])

    async def clear_api_hold(self) -> None:
        await self._write([("DELETE FROM meta WHERE key = 'api_hold'", [])])

    async def check_writable(self) -> None:
        """Commit a small write (the time, under `ready_probe`): a database that cannot take writes (read
        only, full, a standby) says so with `StoreBusy`."""
        await self._write([_put_meta("ready_probe", str(time.time()))])

    # --- claims ------------------------------------------------------------------------------------

    async def claim_inbound(self, now: float, limit: int, busy: set[str]) -> list[InboundRow]:
        rows = await self._claim(CLAIM_INBOUND, "inbound", now, limit, busy)
        return sorted(rows_of(InboundRow, rows), key=lambda r: r.id)

    async def claim_outbox(self, now: float, limit: int, busy: set[str]) -> list[OutboxRow]:
        rows = await self._claim(CLAIM_OUTBOX, "outbox", now, limit, busy)
        return sorted(rows_of(OutboxRow, rows), key=lambda r: r.id)

    async def _claim(self, sql: str, queue: Queue, now: float, limit: int, busy: set[str]) -> list[DictRow]:
        params = {"me": self.owner, "lease": self.lease_seconds, "now": now, "n": limit, "busy": sorted(busy)}
        rows = await self._all(sql, params)
        self._held[queue].update(str(r["id"]) for r in rows)
        return rows

    async def release_inbound(self, inbound_id: str) -> None:
        await self._release("inbound", inbound_id)

    async def release_outbox(self, outbox_id: str) -> None:
        await self._release("outbox", outbox_id)

    async def _release(self, queue: Queue, row_id: str) -> None:
        if row_id not in self._held[queue]:
            return  # released by the change that ended the job (the usual case)
        self._held[queue].discard(row_id)
        with contextlib.suppress(StoreBusy):  # the lease runs out by itself
            await self._write(
                [
                    (
                        f"UPDATE {queue} SET lease_until = NULL "  # noqa: S608
                        "WHERE id = %s AND lease_owner = %s",
                        [row_id, self.owner],
                    )
                ]
            )

    async def _renew(self) -> None:
        """Every third of the lease, extend the leases of the rows in hand; report (and forget) the ones
        another gateway has claimed meanwhile. A row released meanwhile (`lease_until` cleared) is left
        alone: its lease is not renewed back."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            for queue in ("inbound", "outbox"):
                ids = sorted(self._held[queue])
                if not ids:
                    continue
                try:
                    renewed = await self._all(
                        f"UPDATE {queue} SET lease_until = now() + make_interval(secs => %s) "  # noqa: S608
                        "WHERE id = ANY(%s::text[]) AND lease_owner = %s AND lease_until IS NOT NULL "
                        "RETURNING id",
                        [self.lease_seconds, ids, self.owner],
                    )
                    missing = sorted(set(ids) - {str(r["id"]) for r in renewed})
                    taken = missing and await self._all(
                        f"SELECT id FROM {queue} WHERE id = ANY(%s::text[]) AND lease_owner <> %s",  # noqa: S608
                        [missing, self.owner],
                    )
                except StoreBusy as exc:
                    log.warning("lease_renewal_failed", extra={"queue": queue, "error": str(exc)})
                    continue
                lost = {str(r["id"]) for r in taken or []} & self._held[queue]
                if lost:
                    self._held[queue] -= lost
                    log.warning("leases_lost", extra={"queue": queue, "ids": ",".join(sorted(lost))})

    # --- state changes -------------------------------------------------------------------------------

    async def _change(
        self,
        queue: Queue,
        row_id: str,
        values: Mapping[str, Any],
        *,
        release: bool = False,
        then: Sequence[Statement] = (),
    ) -> None:
        """Change a claimed row, fenced on this gateway's lease, with `then` in the same transaction."""
        sets = dict(values)
        if release:
            sets["lease_until"] = None  # the owner stays: see the module docstring
        assignments = ",".join(f"{col} = %s" for col in sets)
        fenced = (
            f"UPDATE {queue} SET {assignments} "  # noqa: S608
            "WHERE id = %s AND (lease_owner = %s OR lease_owner IS NULL)"
        )
        params = clean([*sets.values(), row_id, self.owner])
        try:
            if not then:  # one statement: its own transaction (autocommit), one round trip
                async with self._connection("commit") as conn:
                    cur = await conn.execute(fenced, params)
                self.batches += 1
                if cur.rowcount != 1:
                    raise LeaseLost(f"{queue} {row_id}: no longer held by {self.owner}")
            else:
                async with self._transaction() as (conn, pipeline):
                    cur = await conn.execute(fenced, params)
                    await pipeline.sync()  # the fence's answer, before anything else is sent
                    if cur.rowcount != 1:
                        raise LeaseLost(f"{queue} {row_id}: no longer held by {self.owner}")
                    for sql, statement_params in then:
                        await conn.execute(sql, clean(statement_params))
        except LeaseLost:
            self._held[queue].discard(row_id)
            raise
        if release:
            self._held[queue].discard(row_id)

    async def admit(self, admitted: Admitted) -> None:
        statements: list[Statement] = [
            insert(
                "raw_message",
                {
                    "id": admitted.raw_id,
                    "sha256": admitted.sha256,
                    "size": admitted.full_size,
                    "data": admitted.data,
                },
            )
        ]
        statements += [insert("task", asdict(task)) for task in admitted.tasks]
        statements += [
            insert("inbound", asdict(message) | {"updated_at": message.received_at})
            for message in admitted.messages
        ]
        statements += [
            insert("participant", {"task_id": task_id, "addr": addr}, or_ignore=True)
            for task_id, addr in admitted.participants
        ]
        statements += [
            insert(
                "thread_message", {"message_id": mid, "task_id": task_id, "direction": "in"}, or_ignore=True
            )
            for mid, task_id in admitted.thread_ids
        ]
        for inbound_id, bounce in admitted.bounces:
            statements += _bounce_statements(inbound_id, bounce, admitted.received_at, admitted.bounce_limit)
        if any(m.state == InboundState.RECEIVED for m in admitted.messages):
            statements.append(notify("inbound", self.owner))
        await self._write(statements)

    async def count_crash(self, inbound_id: str, crashes: int) -> None:
        await self._change("inbound", inbound_id, {"crashes": crashes, "updated_at": time.time()})

    async def set_turn_input(
        self,
        inbound_id: str,
        *,
        input: str,
        files: Sequence[dict[str, Any]],
        skipped: Sequence[dict[str, str]],
    ) -> None:
        values = {
            "state": InboundState.QUEUED.value,
            "input": input,
            "crashes": 0,
            "files": json.dumps(list(files)),
            "skipped": json.dumps(list(skipped)),
            "updated_at": time.time(),
        }
        await self._change("inbound", inbound_id, values)

    async def set_files(self, inbound_id: str, files: Sequence[dict[str, Any]]) -> None:
        await self._change(
            "inbound", inbound_id, {"files": json.dumps(list(files)), "updated_at": time.time()}
        )

    async def mark_submitting(self, inbound_id: str, *, turn_seq: int, attempts: int) -> None:
        values = {
            "state": InboundState.SUBMITTING.value,
            "turn_seq": turn_seq,
            "attempts": attempts,
            "updated_at": time.time(),
        }
        await self._change("inbound", inbound_id, values)

    async def mark_running(self, inbound_id: str, *, turn_seq: int | None = None) -> None:
        values: dict[str, Any] = {
            "state": InboundState.RUNNING.value,
            "last_error": None,
            "updated_at": time.time(),
            "started_at": time.time(),  # the acknowledgement of a long turn counts from here
        }
        if turn_seq is not None:
            values["turn_seq"] = turn_seq
        await self._change("inbound", inbound_id, values)

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
        """As SQLite's: a plain wait leaves `updated_at` alone. Releases the lease."""
        values: dict[str, Any] = {"next_attempt_at": at}
        if state is not None:
            values["state"] = str(state)
        if error is not None:
            values["last_error"] = error[:500]
        if crashes is not None:
            values["crashes"] = crashes
        if len(values) > 1:
            values["updated_at"] = time.time()
        then = self._reply_statements(replies)
        await self._change("inbound", inbound_id, values, release=True, then=then)

    async def acknowledge(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> None:
        """As SQLite's: `acked_at` with the notice, in one transaction; fenced, and the claim is kept (the
        turn goes on)."""
        then = self._reply_statements(replies)
        await self._change("inbound", inbound_id, {"acked_at": time.time()}, then=then)

    def _reply_statements(self, replies: Sequence[NewReply]) -> list[Statement]:
        """Queue `replies` in the outbox (waking every gateway's outbox), each Message-ID recorded as part
        of its task's thread."""
        statements: list[Statement] = []
        for reply in replies:
            values = asdict(reply) | {
                "recipients": json.dumps(list(reply.recipients)),
                "state": OutboxState.PENDING.value,
                "updated_at": reply.created_at,
            }
            statements.append(insert("outbox", values))
            if reply.task_id:
                thread = {"message_id": reply.message_id, "task_id": reply.task_id, "direction": "out"}
                statements.append(insert("thread_message", thread, or_ignore=True))
        if replies:
            statements.append(notify("outbox", self.owner))
        return statements

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
        then = self._reply_statements(replies)
        if task_id is not None and task_turns is not None:
            then.append(
                ("UPDATE task SET url = %s, turns = %s WHERE id = %s", [task_url, task_turns, task_id])
            )
        if replies:
            then.append(notify("outbox", self.owner))
        if task_id is not None:  # the task's next message may run now, on any gateway
            then.append(notify("inbound", self.owner))
        ending: dict[str, Any] = {
            "state": str(state),
            "reason": reason,
            "updated_at": time.time(),
            "next_attempt_at": 0,
        }
        if turn_seq is not None:
            ending["turn_seq"] = turn_seq
        if turn_status is not None:
            ending["turn_status"] = turn_status
        await self._change("inbound", inbound_id, ending, release=True, then=then)

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
        values: dict[str, Any] = {
            "state": str(state),
            "attempts": attempts,
            "last_error": (error or "")[:1000] or None,
            "next_attempt_at": next_attempt_at,
            "updated_at": time.time(),
        }
        if reply is not None:
            values["relay_reply"] = reply[:1000]
        if refused is not None:
            values["refused"] = json.dumps(refused) if refused else None
        if sent_at is not None:
            values["sent_at"] = sent_at
        await self._change("outbox", outbox_id, values, release=True)

    async def set_task_worker(self, task_id: str, worker_id: str) -> None:
        await self._write([("UPDATE task SET worker_id = %s WHERE id = %s", [worker_id, task_id])])

    async def use_fallback(self, outbox_id: str) -> None:
        """Fenced like every change of a claimed row (the outbox holds it while it sends)."""
        row = await self.outbox_row(outbox_id)
        if row is None or row.fallback is None:
            return
        values = {"data": row.fallback, "fallback": None, "updated_at": time.time()}
        await self._change("outbox", outbox_id, values)

    async def archive_task(self, task_id: str) -> None:
        await self._write([("UPDATE task SET archived = 1 WHERE id = %s", [task_id])])

    async def reset_for_restart(self) -> None:
        """Work in flight that no live lease covers is due now (its state says where to resume)."""
        now = time.time()
        await self._write(
            [
                (
                    f"UPDATE inbound SET next_attempt_at = %s WHERE state IN ({ACTIVE_SQL}) "  # noqa: S608
                    "AND next_attempt_at > %s AND (lease_until IS NULL OR lease_until < now())",
                    [now, now],
                )
            ]
        )

    async def prune_raw(self, before: float, *, limit: int = 200) -> Pruned:
        """As `SqliteStore.prune_raw`, in one statement; rows another gateway prunes meanwhile are
        skipped (`SKIP LOCKED`)."""
        async with self._connection("commit") as conn:
            cur = await conn.execute(PRUNE, {"before": before, "limit": limit, "window": PRUNE_WINDOW})
            rows = await cur.fetchall()
        if rows:
            self.batches += 1
        return Pruned(len(rows), sum(int(r["stored"]) - int(r["head"]) for r in rows))

    async def replay_inbound(self, inbound_id: str) -> bool:
        row = await self.inbound(inbound_id)
        if row is None or row.state not in (InboundState.FAILED, InboundState.IGNORED):
            return False
        raw = await self._one(
            "SELECT size, octet_length(data) AS kept, pruned_at FROM raw_message WHERE id = %s", [row.raw_id]
        )
        if raw is None or raw["pruned_at"] is not None or raw["kept"] < raw["size"]:
            return False  # its raw bytes are gone (pruned), or were never kept whole (ignored mail)
        state = InboundState.QUEUED if row.input is not None else InboundState.RECEIVED
        values: dict[str, Any] = {
            "state": state.value,
            "reason": None,
            "crashes": 0,
            "next_attempt_at": 0,
            "last_error": None,
            "received_at": time.time(),
            "updated_at": time.time(),
            "lease_until": None,
        }
        if row.turn_status is not None and row.turn_seq is not None:
            # its turn ran to its end (in error): a new turn is posted, after that one (as SQLite's)
            values |= {"attempts": 0, "turn_seq": row.turn_seq + 1, "turn_status": None}
        # otherwise attempts are kept: a turn that may have reached the API is looked for before any POST
        assignments = ",".join(f"{col} = %s" for col in values)
        await self._write(
            [
                (f"UPDATE inbound SET {assignments} WHERE id = %s", [*values.values(), inbound_id]),  # noqa: S608
                notify("inbound", self.owner),
            ]
        )
        return True

    # --- the loop breaker, held mail and the stored allow list (issue 19) -------------------------------

    async def reply_times(self, addr: str, since: float, limit: int) -> list[float]:
        rows = await self._all(
            "SELECT at FROM reply_log WHERE addr = %s AND at >= %s ORDER BY at DESC LIMIT %s",
            [addr.lower(), since, limit],
        )
        return [float(r["at"]) for r in rows]

    async def reserve_reply(
        self, outbox_id: str, addrs: Sequence[str], now: float, limit: int, *, wait: bool
    ) -> float | None:
        """As SQLite's, under a transaction-scoped advisory lock per address (taken in a fixed order), so
        replies composed at once, on any gateway, count each other."""
        wanted = sorted({a.lower() for a in addrs})
        try:
            async with self._transaction() as (conn, _):
                for addr in wanted:
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"mailgate-reply:{addr}"]
                    )
                at = now
                for addr in wanted:
                    cur = await conn.execute(
                        "SELECT at FROM reply_log WHERE addr = %s AND at >= %s ORDER BY at DESC "
                        "LIMIT 1 OFFSET %s",
                        [addr, now - 3600.0, limit - 1],
                    )
                    row = await cur.fetchone()
                    if row is not None:
                        at = max(at, float(row["at"]) + 3600.0)
                if at > now and not wait:
                    raise _NotChanged
                for addr in wanted:
                    await conn.execute(
                        "INSERT INTO reply_log (addr, at, outbox_id) VALUES (%s, %s, %s)",
                        clean([addr, at, outbox_id]),
                    )
        except _NotChanged:
            return None
        return at

    async def count_replies(self, since: float, until: float, limit: int) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM (SELECT DISTINCT outbox_id FROM reply_log "
            "WHERE at >= %s AND at <= %s LIMIT %s) recent",
            [since, until, limit],
        )
        return int(row["n"]) if row else 0

    async def forget_replies(self, before: float) -> None:
        await self._write([("DELETE FROM reply_log WHERE at < %s", [before])])

    async def task_busy_before(self, task_id: str, before: str) -> bool:
        row = await self._one(
            f"SELECT 1 AS x FROM inbound WHERE task_id = %s AND id < %s AND state IN ({ACTIVE_SQL}) LIMIT 1",  # noqa: S608
            [task_id, before],
        )
        return row is not None

    async def held_untold(self, limit: int = 50) -> list[InboundRow]:
        rows = await self._all(
            "SELECT * FROM inbound WHERE state = 'held' AND told_at IS NULL ORDER BY id LIMIT %s", [limit]
        )
        return rows_of(InboundRow, rows)

    async def count_held(self, limit: int) -> int:
        row = await self._one(
            "SELECT count(*) AS n FROM (SELECT 1 FROM inbound WHERE state = 'held' LIMIT %s) AS h", [limit]
        )
        return int(row["n"]) if row is not None else 0

    async def tell_held(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> bool:
        """One gateway tells: the row is marked first (the one that marks it queues the notice)."""
        try:
            async with self._transaction() as (conn, pipeline):
                cur = await conn.execute(
                    "UPDATE inbound SET told_at = %s WHERE id = %s AND state = 'held' AND told_at IS NULL",
                    [time.time(), inbound_id],
                )
                await pipeline.sync()
                if cur.rowcount != 1:
                    raise _NotChanged
                for sql, params in self._reply_statements(replies):
                    await conn.execute(sql, clean(params))
        except _NotChanged:
            return False
        return True

    async def approve_held(self, inbound_id: str) -> InboundRow | None:
        async with self._transaction() as (conn, _):
            cur = await conn.execute(
                "UPDATE inbound SET state = 'received', next_attempt_at = 0, updated_at = %s, "
                "last_error = NULL, lease_until = NULL WHERE id = %s AND state = 'held' RETURNING *",
                [time.time(), inbound_id],
            )
            row = await cur.fetchone()
            await conn.execute(*notify("inbound", self.owner))
        return row_of(InboundRow, row)

    async def deny_held(self, inbound_id: str) -> bool:
        rows = await self._all(
            "UPDATE inbound SET state = 'ignored', reason = %s, updated_at = %s "
            "WHERE id = %s AND state = 'held' RETURNING id",
            [DENIED, time.time(), inbound_id],
        )
        return bool(rows)

    async def drop_held(self, before: float) -> list[InboundRow]:
        """Each row is taken by one gateway only (the one whose UPDATE changes it)."""
        rows = await self._all(
            "UPDATE inbound SET state = 'ignored', reason = %s, updated_at = %s "
            "WHERE state = 'held' AND received_at < %s RETURNING *",
            [DROPPED, time.time(), before],
        )
        held = [{**r, "state": InboundState.HELD.value, "reason": None} for r in rows]
        return sorted(rows_of(InboundRow, held), key=lambda r: r.id)

    async def allow_sender(self, addr: str, note: str | None = None) -> bool:
        rows = await self._all(
            "INSERT INTO allowed_sender (addr, added_at, note) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING addr",
            [addr.strip().lower(), time.time(), note],
        )
        return bool(rows)

    async def is_allowed_sender(self, addr: str) -> bool:
        row = await self._one("SELECT 1 AS x FROM allowed_sender WHERE addr = %s", [addr.strip().lower()])
        return row is not None

    async def allowed_senders(self) -> list[AllowedSenderRow]:
        rows = await self._all("SELECT * FROM allowed_sender ORDER BY added_at, addr")
        return rows_of(AllowedSenderRow, rows)

    async def unsuppress(self, addr: str) -> bool:
        """Send notices to `addr` again; its earlier hard bounces no longer count (from `cleared_at`)."""
        rows = await self._all(
            "UPDATE suppression SET suppressed_at = NULL, reason = NULL, cleared_at = %s "
            "WHERE addr = %s AND suppressed_at IS NOT NULL RETURNING addr",
            [time.time(), addr.lower()],
        )
        return bool(rows)

    async def replay_outbox(self, outbox_id: str) -> bool:
        row = await self.outbox_row(outbox_id)
        if row is None or row.state != OutboxState.DEAD:
            return False
        await self._write(
            [
                (
                    "UPDATE outbox SET state = %s, attempts = 0, next_attempt_at = 0, last_error = NULL, "
                    "created_at = %s, updated_at = %s, lease_until = NULL WHERE id = %s",
                    [OutboxState.RETRY.value, time.time(), time.time(), outbox_id],
                ),
                notify("outbox", self.owner),
            ]
        )
        return True


def _put_meta(key: str, value: str) -> Statement:
    return (
        "INSERT INTO meta (key, value) VALUES (%s, %s) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )


def _bounce_statements(inbound_id: str, bounce: NewBounce, now: float, limit: int) -> list[Statement]:
    """As SQLite's: the `bounce` row, the reply `bounced` (a row still being retried keeps its state,
    with the bounce noted), and for a hard bounce that reaches `limit` in the window the address
    suppressed (hard bounces before an `unsuppress` no longer count).

    The note on the outbox row is not fenced: it changes only the bounce columns (and `sent -> bounced`,
    a state no claim takes), never what a gateway sending the row writes. Bounces for one address are
    counted under a transaction-scoped advisory lock on it, so two gateways recording its bounces at once
    each count the other's: the limit is never stepped over unseen."""
    addr = bounce.addr.lower() if bounce.addr else None
    diagnostic = (bounce.diagnostic or "")[:1000] or None
    statements: list[Statement] = []
    if bounce.hard and addr:
        statements.append(("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"mailgate-bounce:{addr}"]))
    row = {
        "outbox_id": bounce.outbox_id,
        "inbound_id": inbound_id,
        "addr": addr,
        "status": bounce.status,
        "diagnostic": diagnostic,
        "hard": int(bounce.hard),
        "at": now,
    }
    statements += [
        insert("bounce", row),
        (
            "UPDATE outbox SET bounced_at = %s, bounce_status = %s, bounce_diagnostic = %s, updated_at = %s, "
            "state = CASE WHEN state = 'sent' THEN 'bounced' ELSE state END WHERE id = %s",
            [now, bounce.status, diagnostic, now, bounce.outbox_id],
        ),
    ]
    if bounce.hard and addr:
        reason = f"{limit} hard bounces in 30 days (the last: {bounce.status or 'no status'})"
        statements.append(
            (
                "INSERT INTO suppression (addr, suppressed_at, reason) SELECT %(addr)s, %(now)s, %(reason)s "
                "WHERE (SELECT count(*) FROM bounce WHERE addr = %(addr)s AND hard = 1 AND at >= greatest("
                "%(since)s, coalesce((SELECT cleared_at FROM suppression WHERE addr = %(addr)s), 0))) "
                ">= %(limit)s ON CONFLICT (addr) DO UPDATE SET suppressed_at = excluded.suppressed_at, "
                "reason = excluded.reason WHERE suppression.suppressed_at IS NULL",
                {"addr": addr, "now": now, "reason": reason, "since": now - BOUNCE_WINDOW, "limit": limit},
            )
        )
    return statements


def _nothing() -> None:
    pass


class _NotChanged(Exception):
    """A conditional change found nothing to change: its transaction rolls back."""


async def _configure(conn: Conn) -> None:
    """Every pooled connection: commits durable before they return, whatever the role's defaults."""
    await conn.execute("SET synchronous_commit = on")
