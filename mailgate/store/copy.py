"""`mailgate copy`: move a gateway's state from its SQLite file to a PostgreSQL database.

Both stores are first brought to the current schema (the SQLite file as `serve` would, the database
under the migration lock); then every table is copied in one PostgreSQL transaction with `COPY`: the raw
messages, tasks, participants, the Message-IDs of each thread, inbound messages with their states, the
outbox, the bounces of our replies and the suppression list, and `meta` (the reply-token secret, so
tokens already mailed keep working). Every column both sides have is copied, so what a later schema
version added comes along. Leases start empty,
so the first gateway on the database takes the work. A database that already holds messages, tasks or
replies is refused: two gateways' states are never merged; so is a SQLite file a gateway still runs on
(it holds the store's lock).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailgate.errors import SourceInUse, StoreBusy, TargetNotEmpty

# In the order the foreign keys need; `meta` last so its upsert follows the check for an empty target.
TABLES = (
    "raw_message",
    "task",
    "participant",
    "thread_message",
    "inbound",
    "outbox",
    "bounce",
    "suppression",
    "meta",
)
CHUNK = 500


async def copy_sqlite_to_postgres(source: Path, url: str) -> dict[str, int]:
    """Copy everything in the SQLite store at `source` to the PostgreSQL database at `url`; returns the rows
    copied per table. Raises `TargetNotEmpty`, `SourceInUse`, `FileNotFoundError`, or `StoreBusy` (either
    store unusable)."""
    from mailgate.store.lock import holder
    from mailgate.store.postgres import PostgresStore
    from mailgate.store.sqlite import SqliteStore

    if not await asyncio.to_thread(source.is_file):  # opening would create it
        raise FileNotFoundError(f"{source}: no such file")
    if (pid := holder(source)) is not None:
        raise SourceInUse(f"a gateway runs on {source} (pid {pid or '?'}): stop it first")
    await (await SqliteStore.open(source)).close()  # at the current schema, like the target
    await (await PostgresStore.open(url)).close()
    try:
        return await asyncio.to_thread(_copy, source, url)
    except (sqlite3.Error, OSError) as exc:
        raise StoreBusy(f"copy failed: {exc}") from exc


def _copy(source: Path, url: str) -> dict[str, int]:
    import psycopg

    from mailgate.store.postgres import clean

    counts: dict[str, int] = {}
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        with psycopg.connect(url, application_name="mailgate-copy") as dst, dst.transaction():
            busy = dst.execute(
                "SELECT (SELECT count(*) FROM inbound) + (SELECT count(*) FROM task) "
                "+ (SELECT count(*) FROM outbox) + (SELECT count(*) FROM raw_message) "
                "+ (SELECT count(*) FROM bounce) + (SELECT count(*) FROM suppression)"
            ).fetchone()
            if busy and busy[0]:
                raise TargetNotEmpty(
                    "the PostgreSQL database already holds messages, tasks or replies; "
                    "copy only into a new database"
                )
            for table in TABLES:
                target = {r[0] for r in dst.execute(_COLUMNS, [table]).fetchall()}
                cols = [c[1] for c in src.execute(f"PRAGMA table_info({table})") if c[1] in target]
                names = ",".join(cols)
                if table == "meta":  # the target may have made its own secret: the source's wins
                    dst.execute("DELETE FROM meta")
                with dst.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    counts[table] = 0
                    for row in _rows(src, f"SELECT {names} FROM {table}"):  # noqa: S608
                        copy.write_row(clean(list(row)))
                        counts[table] += 1
            # bounce ids were copied as they were: the next one the database makes comes after them
            dst.execute(
                "SELECT setval(pg_get_serial_sequence('bounce', 'id'), coalesce(max(id), 0) + 1, false) "
                "FROM bounce"
            )
    except psycopg.Error as exc:
        raise StoreBusy(f"copy failed, nothing was written: {exc}") from exc
    finally:
        src.close()
    return counts


_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = %s"
)


def _rows(db: sqlite3.Connection, sql: str) -> Iterator[tuple[Any, ...]]:
    cursor = db.execute(sql)
    while chunk := cursor.fetchmany(CHUNK):
        yield from chunk
