"""The PostgreSQL schema and its versions: the same tables as SQLite's (`schema`), plus the leases.

`schema_version` (one row) says where a database is; `MIGRATIONS[n]` brings it from version n to n + 1.
`migrate` applies what is missing, each step in its own transaction, while holding an advisory lock, so
gateways starting at once take turns and the second finds nothing left to do. A database newer than this
mailgate knows is refused.

Differences from the SQLite tables, each for a reason:
- ids, task ids and Message-IDs are `text COLLATE "C"`: ULIDs sort by arrival only byte-wise, and the
  claim's "oldest unfinished message of a task" relies on that order whatever the database's locale.
- raw bytes and reply bytes are `bytea`; times stay epoch seconds (`double precision`) as the stages
  write them; only the leases use the database's clock (`timestamptz`), so hosts' clocks do not matter.
- `inbound` and `outbox` carry `lease_owner` and `lease_until`, and partial indexes over the rows that
  can still be claimed, so a claim never scans finished work.
"""

from __future__ import annotations

from typing import Any

from mailgate.store.schema import ACTIVE_SQL

# An arbitrary constant: the advisory lock key all mailgate gateways agree on for migrations.
MIGRATION_LOCK = 0x6D61696C67617465 & 0x7FFFFFFFFFFFFFFF  # "mailgate"

V1 = f"""
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE raw_message (
    id text COLLATE "C" PRIMARY KEY, sha256 text NOT NULL, size bigint NOT NULL, data bytea NOT NULL);
CREATE TABLE inbound (
    id text COLLATE "C" PRIMARY KEY,
    raw_id text COLLATE "C" NOT NULL REFERENCES raw_message(id),
    received_at double precision NOT NULL, updated_at double precision NOT NULL,
    mail_from text NOT NULL, rcpt text NOT NULL, alias text NOT NULL,
    sender text, message_id text, subject text NOT NULL DEFAULT '',
    dedupe_key text NOT NULL UNIQUE,
    task_id text COLLATE "C", new_task integer NOT NULL DEFAULT 0, note text,
    state text NOT NULL, reason text,
    input text, files text, skipped text,
    turn_seq integer, attempts integer NOT NULL DEFAULT 0, crashes integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0, last_error text,
    in_reply_to text, refs text, to_cc text, sender_name text,
    lease_owner text, lease_until timestamptz);
CREATE INDEX inbound_active ON inbound (id) WHERE state IN ({ACTIVE_SQL});
CREATE INDEX inbound_task ON inbound (task_id, id);
CREATE INDEX inbound_sender ON inbound (sender, received_at);
CREATE INDEX inbound_state ON inbound (state, id);
CREATE TABLE task (
    id text COLLATE "C" PRIMARY KEY, alias text NOT NULL, worker_id text NOT NULL, owner text NOT NULL,
    budget text NOT NULL, subject text NOT NULL, created_at double precision NOT NULL, url text,
    turns integer NOT NULL DEFAULT 0, archived integer NOT NULL DEFAULT 0);
CREATE INDEX task_owner ON task (owner, created_at);
CREATE TABLE participant (task_id text COLLATE "C" NOT NULL, addr text NOT NULL, PRIMARY KEY (task_id, addr));
CREATE TABLE thread_message (
    message_id text COLLATE "C" NOT NULL, task_id text COLLATE "C" NOT NULL, direction text NOT NULL,
    PRIMARY KEY (message_id, task_id));
CREATE TABLE outbox (
    id text COLLATE "C" PRIMARY KEY, inbound_id text COLLATE "C", task_id text COLLATE "C",
    kind text NOT NULL, notice text,
    message_id text NOT NULL UNIQUE, mail_from text NOT NULL, recipients text NOT NULL, data bytea NOT NULL,
    state text NOT NULL, attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    last_error text, refused text, created_at double precision NOT NULL,
    updated_at double precision NOT NULL, sent_at double precision,
    lease_owner text, lease_until timestamptz);
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE state IN ('pending', 'retry');
CREATE INDEX outbox_inbound ON outbox (inbound_id, id);
CREATE INDEX outbox_notice ON outbox (notice, created_at);
CREATE INDEX outbox_task ON outbox (task_id, notice, created_at);
CREATE INDEX outbox_state ON outbox (state, id);
"""

# Each step brings a database from the version before it to its own (version 1 = V1).
MIGRATIONS: tuple[str, ...] = (
    V1,
    # 2: a reply's links-only version, sent instead when the relay refuses the reply's size (552)
    "ALTER TABLE outbox ADD COLUMN fallback bytea;",
    # 3: SQLite's versions 4 and 5 at once. The sender always knows where things stand (issue 15): when a
    # turn started and whether it was acknowledged; the budget a new task asked for; bounces of our own
    # replies and the addresses that get no more notices. And (issue 14) the relay's reply in its own
    # column (`last_error` holds only errors); how the message's turn ended at the API.
    """
    ALTER TABLE inbound ADD COLUMN started_at double precision;
    ALTER TABLE inbound ADD COLUMN acked_at double precision;
    ALTER TABLE inbound ADD COLUMN turn_status text;
    ALTER TABLE task ADD COLUMN budget_asked text;
    ALTER TABLE outbox ADD COLUMN bounced_at double precision;
    ALTER TABLE outbox ADD COLUMN bounce_status text;
    ALTER TABLE outbox ADD COLUMN bounce_diagnostic text;
    ALTER TABLE outbox ADD COLUMN relay_reply text;
    CREATE INDEX outbox_mail_from ON outbox (mail_from);
    CREATE TABLE bounce (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        outbox_id text COLLATE "C" NOT NULL, inbound_id text COLLATE "C" NOT NULL, addr text,
        status text, diagnostic text, hard integer NOT NULL, at double precision NOT NULL);
    CREATE INDEX bounce_addr ON bounce (addr, at);
    CREATE INDEX bounce_outbox ON bounce (outbox_id);
    CREATE INDEX bounce_inbound ON bounce (inbound_id);
    CREATE TABLE suppression (
        addr text PRIMARY KEY, suppressed_at double precision, reason text, cleared_at double precision);
    UPDATE outbox SET relay_reply = last_error, last_error = NULL
        WHERE state = 'sent' AND last_error LIKE '2%';
    """,
    # 4: retention (issue 11): when a finished message's raw bytes were pruned to its header block; the
    # messages of a raw message found without a scan; the raw messages not yet pruned, the same
    "ALTER TABLE raw_message ADD COLUMN pruned_at double precision;"
    "CREATE INDEX inbound_raw ON inbound (raw_id);"
    "CREATE INDEX raw_unpruned ON raw_message (id) WHERE pruned_at IS NULL;",
)
VERSION = len(MIGRATIONS)


async def migrate(conn: Any) -> int:
    """Bring the database on `conn` (an autocommit psycopg connection) to VERSION; returns the version
    found (0: a new database). Raises `RuntimeError` for a database newer than this mailgate knows."""
    await conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        cur = await conn.execute("SELECT max(version) FROM schema_version")
        row = await cur.fetchone()
        found = int(_first(row) or 0)
        if found > VERSION:
            raise RuntimeError(
                f"the database has schema version {found}, newer than this mailgate's ({VERSION}): "
                "upgrade mailgate"
            )
        for step in range(found, VERSION):
            async with conn.transaction():
                await conn.execute(MIGRATIONS[step])
                await conn.execute("DELETE FROM schema_version")
                await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [step + 1])
        return found
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])


async def probe(url: str) -> int:
    """The schema version of the database at `url` (0: none yet), read without changing anything;
    `StoreBusy` when it cannot be read."""
    import psycopg

    from mailgate.errors import StoreBusy

    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=15, application_name="mailgate-check"
        ) as conn:
            cur = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            if not _first(await cur.fetchone()):
                return 0
            cur = await conn.execute("SELECT max(version) FROM schema_version")
            return int(_first(await cur.fetchone()) or 0)
    except (psycopg.Error, OSError) as exc:
        raise StoreBusy(f"cannot read the database: {exc}") from exc


def _first(row: Any) -> Any:
    if row is None:
        return None
    return next(iter(row.values())) if isinstance(row, dict) else row[0]
