"""The throwaway PostgreSQL server works, and so do the primitives the PostgreSQL store will build on.

Each test states one fact the store relies on: durable commits, bytea round trips, batch inserts,
`FOR UPDATE SKIP LOCKED` claims that never overlap, a lease claim that keeps one task's turns in order,
and `LISTEN/NOTIFY` wake-ups that arrive only once the notifying transaction commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pgserver import (
    DIR_PREFIX,
    PostgresServer,
    PostgresUnavailable,
    find_bin_dir,
    reap_stale_clusters,
    running_postgres,
    skip_or_fail,
)

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

# The lease claim the store will use: the oldest active message of each task only (so one task's turns
# stay in order across hosts), whose lease is free or expired, skipping rows another host has locked.
CLAIM = """
UPDATE messages SET lease_owner = %(owner)s, lease_until = now() + make_interval(secs => %(lease)s)
WHERE id IN (
    SELECT m.id FROM messages m
    WHERE m.state = 'queued'
      AND (m.lease_until IS NULL OR m.lease_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM messages older
          WHERE older.task = m.task AND older.id < m.id AND older.state <> 'done'
      )
    ORDER BY m.id
    LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
RETURNING id, task
"""

MESSAGES = """
CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    task text NOT NULL,
    state text NOT NULL DEFAULT 'queued',
    lease_owner text,
    lease_until timestamptz,
    raw bytea
)
"""


@pytest.fixture
async def db(postgres_db: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """An autocommit connection to a fresh database holding an empty `messages` table."""
    async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as conn:
        await conn.execute(MESSAGES)
        yield conn


async def test_server_runs_durable_on_loopback(postgres_server: PostgresServer) -> None:
    """The session's server commits durably (fsync, synchronous_commit) and answers on 127.0.0.1."""
    assert postgres_server.url.startswith("postgresql://")
    async with await psycopg.AsyncConnection.connect(postgres_server.url) as conn:
        settings = {}
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            row = await (await conn.execute(f"SHOW {name}")).fetchone()
            assert row is not None
            settings[name] = row[0]
        row = await (await conn.execute("SELECT current_database(), inet_server_addr()::text")).fetchone()
    assert settings == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    assert row is not None
    assert row[0] == postgres_server.database
    if postgres_server.data_dir is not None:  # a server we started ourselves
        assert row[1] == "127.0.0.1/32"


async def test_fresh_database_per_test_is_empty_and_isolated(postgres_db: str) -> None:
    """`postgres_db` hands each test its own database, with none of the other tests' tables."""
    async with await psycopg.AsyncConnection.connect(postgres_db) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        row = await cur.fetchone()
        name = await (await conn.execute("SELECT current_database()")).fetchone()
    assert row == (0,)
    assert name is not None and name[0].startswith("t_")


async def test_bytea_round_trips_raw_mail(db: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Raw message bytes (8-bit, NUL, CRLF, not UTF-8) come back from bytea byte for byte."""
    raw = b"From: a@example.org\r\nSubject: =?x?=\r\n\r\n\x00\xff\xfe caf\xe9 \x80\r\n.\r\n" * 1000
    async with db.transaction():
        cur = await db.execute("INSERT INTO messages (task, raw) VALUES ('t', %s) RETURNING id", [raw])
        row = await cur.fetchone()
    assert row is not None
    back = await (await db.execute("SELECT raw FROM messages WHERE id = %s", [row[0]])).fetchone()
    assert back is not None
    assert bytes(back[0]) == raw


async def test_executemany_batch_inserts_in_one_transaction(
    db: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """executemany (pipelined by psycopg) inserts a batch atomically: all rows or, on error, none."""
    async with db.cursor() as cur, db.transaction():
        await cur.executemany("INSERT INTO messages (task) VALUES (%s)", [(f"task-{i}",) for i in range(500)])
    with pytest.raises(psycopg.errors.NotNullViolation):
        async with db.cursor() as cur, db.transaction():
            await cur.executemany("INSERT INTO messages (task) VALUES (%s)", [("ok",), (None,)])
    row = await (await db.execute("SELECT count(*), count(DISTINCT task) FROM messages")).fetchone()
    assert row == (500, 500)


async def test_skip_locked_claims_disjoint_rows(postgres_db: str, db: psycopg.AsyncConnection) -> None:
    """Two connections claiming with FOR UPDATE SKIP LOCKED at once get disjoint rows, neither waits."""
    await db.execute("INSERT INTO messages (task) SELECT 'task-' || g FROM generate_series(1, 10) g")
    select = "SELECT id FROM messages WHERE state = 'queued' ORDER BY id LIMIT 4 FOR UPDATE SKIP LOCKED"
    async with (
        await psycopg.AsyncConnection.connect(postgres_db) as a,
        await psycopg.AsyncConnection.connect(postgres_db) as b,
    ):
        await a.execute("SET lock_timeout = '2s'")  # a blocked claim fails instead of hanging the test
        await b.execute("SET lock_timeout = '2s'")
        async with a.transaction():
            first = [r[0] for r in await (await a.execute(select)).fetchall()]
            async with b.transaction():  # a still holds its row locks here
                second = [r[0] for r in await (await b.execute(select)).fetchall()]
    assert first == [1, 2, 3, 4]
    assert second == [5, 6, 7, 8]


async def test_lease_claim_keeps_one_tasks_turns_in_order(
    postgres_db: str, db: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """The lease claim takes only each task's oldest unfinished message, never one leased elsewhere."""
    await db.execute("INSERT INTO messages (task) VALUES ('a'), ('a'), ('b'), ('a'), ('c')")  # ids 1..5
    async with (
        await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as host1,
        await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as host2,
    ):

        async def claim(conn: psycopg.AsyncConnection[tuple[object, ...]], owner: str) -> list[object]:
            cur = await conn.execute(CLAIM, {"owner": owner, "lease": 60, "n": 10})
            return sorted(r[0] for r in await cur.fetchall())

        assert await claim(host1, "host1") == [1, 3, 5]  # a's first, b's, c's; not a's 2nd and 3rd
        assert await claim(host2, "host2") == []  # all leased, and 2 waits for 1
        await db.execute("UPDATE messages SET state = 'done', lease_owner = NULL WHERE id = 1")
        assert await claim(host2, "host2") == [2]  # a's next turn, on any host
        await db.execute("UPDATE messages SET lease_until = now() - interval '1 second' WHERE id = 3")
        assert await claim(host2, "host2") == [3]  # host1's lease on 3 expired: host2 resumes it
        owners = await (await db.execute("SELECT id, lease_owner FROM messages ORDER BY id")).fetchall()
    assert owners == [(1, None), (2, "host2"), (3, "host2"), (4, None), (5, "host1")]


async def test_concurrent_lease_claims_run_each_message_once_in_task_order(
    postgres_db: str, db: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """Four hosts racing the lease claim over 200 messages of 10 tasks: each runs once, tasks in order."""
    await db.execute("INSERT INTO messages (task) SELECT 'task-' || (g % 10) FROM generate_series(1, 200) g")
    ran: list[tuple[str, int, str]] = []  # (task, id, host) in the order the turns ran
    progress = asyncio.Event()

    async def host(name: str) -> None:
        async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as conn:
            while True:
                cur = await conn.execute(CLAIM, {"owner": name, "lease": 60, "n": 5})
                claimed = await cur.fetchall()
                for message_id, task in claimed:
                    await conn.execute(
                        "SELECT %s", [message_id]
                    )  # the turn: a round trip other hosts overtake
                    ran.append((task, message_id, name))
                    await conn.execute(
                        "UPDATE messages SET state = 'done' WHERE id = %s AND lease_owner = %s",
                        [message_id, name],
                    )
                    progress.set()
                if claimed:
                    continue
                left = await (
                    await conn.execute("SELECT count(*) FROM messages WHERE state <> 'done'")
                ).fetchone()
                if left == (0,):
                    return
                progress.clear()
                with contextlib.suppress(TimeoutError):  # another host finishing a turn frees the next one
                    await asyncio.wait_for(progress.wait(), timeout=1)

    async with asyncio.timeout(30):
        await asyncio.gather(*(host(f"host{i}") for i in range(4)))
    ids = [message_id for _, message_id, _ in ran]
    assert sorted(ids) == list(range(1, 201))  # every message once, none twice
    for task in {t for t, _, _ in ran}:
        order = [message_id for t, message_id, _ in ran if t == task]
        assert order == sorted(order), task
    assert len({h for _, _, h in ran}) > 1  # the work really was shared


async def test_notify_wakes_a_listener_only_after_commit(
    postgres_db: str, db: psycopg.AsyncConnection[tuple[object, ...]]
) -> None:
    """A NOTIFY sent inside a transaction reaches a LISTENing connection on commit, not before."""
    async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as listener:
        await listener.execute("LISTEN mailgate_wake")
        async with await psycopg.AsyncConnection.connect(postgres_db) as sender:
            async with sender.transaction():
                await sender.execute("INSERT INTO messages (task) VALUES ('a')")
                await sender.execute("SELECT pg_notify('mailgate_wake', 'turns')")
                early = [n async for n in listener.notifies(timeout=0.3)]
            started = time.monotonic()
            woken = [n async for n in listener.notifies(timeout=10, stop_after=1)]
            waited = time.monotonic() - started
    assert early == []
    assert [(n.channel, n.payload) for n in woken] == [("mailgate_wake", "turns")]
    assert waited < 5


async def test_pool_hands_out_checked_connections(postgres_db: str) -> None:
    """AsyncConnectionPool opens explicitly, checks a connection before lending it, and closes cleanly."""
    from psycopg_pool import AsyncConnectionPool

    pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[object, ...]]] = AsyncConnectionPool(
        postgres_db, min_size=1, max_size=4, open=False, check=AsyncConnectionPool.check_connection
    )
    await pool.open(wait=True, timeout=10)
    try:
        async with pool.connection() as conn:
            first = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert first is not None
        async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", [first[0]])  # kill the idle one
        async with pool.connection() as conn:  # the dead one fails the check and is replaced, not lent
            second = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    finally:
        await pool.close()
    assert second is not None and second != first


def test_running_postgres_stops_and_removes_the_cluster() -> None:
    """The context manager's server is gone (refused, dir removed) once the block exits."""
    try:
        bin_dir = find_bin_dir()
    except PostgresUnavailable as e:  # the fixture-free path skips (or fails) as the fixtures do
        skip_or_fail(str(e))
    with running_postgres(bin_dir) as server:
        assert server.data_dir is not None
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not server.data_dir.parent.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=3)


@pytest.mark.slow
def test_a_killed_runs_cluster_is_reaped_by_the_next_start(tmp_path: Path) -> None:
    """A cluster left running by a SIGKILLed run is stopped and removed by the next run's reaper."""
    try:
        bin_dir = find_bin_dir()
    except PostgresUnavailable as e:
        skip_or_fail(str(e))
    script = (
        "import sys, time\n"
        "from tests.pgserver import running_postgres\n"
        "with running_postgres() as s:\n"
        "    print(s.url, s.data_dir, flush=True)\n"
        "    time.sleep(300)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            assert child.stdout is not None
            url, data_dir = child.stdout.readline().split()
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
    with psycopg.connect(url) as conn:  # the orphan is still serving: nobody stopped it
        assert conn.execute("SELECT 1").fetchone() == (1,)
    base = Path(data_dir).parent
    assert base.name.startswith(DIR_PREFIX)
    assert reap_stale_clusters(bin_dir, base.parent) >= 1
    assert not base.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3)
