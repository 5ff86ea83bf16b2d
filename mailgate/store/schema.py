"""The database's shape: the schema and its versions, the row types read back, and the new rows the
stages hand to the store. Plain data; the SQL that uses it lives in `reads` and `sqlite`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from mailgate.models import HELD_DAYS, InboundState

Statement = tuple[str, Sequence[Any]]
ACTIVE = (InboundState.RECEIVED, InboundState.QUEUED, InboundState.SUBMITTING, InboundState.RUNNING)
ACTIVE_SQL = ",".join(f"'{s.value}'" for s in ACTIVE)
# A message is done with its raw bytes only here (a `held` one is neither active nor done: approved, it runs)
FINISHED = (InboundState.ANSWERED, InboundState.IGNORED, InboundState.FAILED)
FINISHED_SQL = ",".join(f"'{s.value}'" for s in FINISHED)
# Which earlier active message `j` of a task holds back message `i`: every one, for a turn (the turns of
# a task run in order); only one not yet read, for a message still to be read (`received`: reading it
# changes nothing at the API, and a command such as `/status` is answered while a turn runs)
BLOCKS = "(i.state <> 'received' OR j.state = 'received')"
DENIED = "denied by the operator (mailgate deny)"
DROPPED = f"held for {HELD_DAYS} days without approval: dropped"

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

# Each step brings a store from the version before it to its own; `PRAGMA user_version` says where a
# store is. Version 1 is SCHEMA above (also what the first release created).
MIGRATIONS: tuple[str, ...] = (
    SCHEMA,
    # 2: what later stages need from the header, read once at DATA (parse once)
    "ALTER TABLE inbound ADD COLUMN in_reply_to TEXT;"
    "ALTER TABLE inbound ADD COLUMN refs TEXT;"
    "ALTER TABLE inbound ADD COLUMN to_cc TEXT;"
    "ALTER TABLE inbound ADD COLUMN sender_name TEXT;",
    # 3: a reply's links-only version, sent instead when the relay refuses the reply's size (552)
    "ALTER TABLE outbox ADD COLUMN fallback BLOB;",
    # 4: the sender always knows where things stand (issue 15): when a turn started and whether it was
    # acknowledged; the budget a new task asked for; bounces of our own replies and the addresses that
    # get no more notices
    "ALTER TABLE inbound ADD COLUMN started_at REAL;"
    "ALTER TABLE inbound ADD COLUMN acked_at REAL;"
    "ALTER TABLE task ADD COLUMN budget_asked TEXT;"
    "ALTER TABLE outbox ADD COLUMN bounced_at REAL;"
    "ALTER TABLE outbox ADD COLUMN bounce_status TEXT;"
    "ALTER TABLE outbox ADD COLUMN bounce_diagnostic TEXT;"
    "CREATE INDEX IF NOT EXISTS outbox_mail_from ON outbox (mail_from);"
    "CREATE TABLE IF NOT EXISTS bounce ("
    " id INTEGER PRIMARY KEY, outbox_id TEXT NOT NULL, inbound_id TEXT NOT NULL, addr TEXT,"
    " status TEXT, diagnostic TEXT, hard INTEGER NOT NULL, at REAL NOT NULL);"
    "CREATE INDEX IF NOT EXISTS bounce_addr ON bounce (addr, at);"
    "CREATE INDEX IF NOT EXISTS bounce_outbox ON bounce (outbox_id);"
    "CREATE TABLE IF NOT EXISTS suppression ("
    " addr TEXT PRIMARY KEY, suppressed_at REAL, reason TEXT, cleared_at REAL) WITHOUT ROWID;",
    # 5: the relay's reply to a delivery in its own column (`last_error` holds only errors); how the
    # message's turn ended at the API (so `replay` knows to post a new turn after an errored one)
    "ALTER TABLE outbox ADD COLUMN relay_reply TEXT;"
    "ALTER TABLE inbound ADD COLUMN turn_status TEXT;"
    "UPDATE outbox SET relay_reply=last_error, last_error=NULL WHERE state='sent' AND last_error LIKE '2%';",
    # 6: retention (issue 11): when a finished message's raw bytes were pruned to its header block; the
    # messages of a raw message found without a scan; the raw messages not yet pruned, the same
    "ALTER TABLE raw_message ADD COLUMN pruned_at REAL;"
    "CREATE INDEX IF NOT EXISTS inbound_raw ON inbound (raw_id);"
    "CREATE INDEX IF NOT EXISTS raw_unpruned ON raw_message (id) WHERE pruned_at IS NULL;",
    # 7: the sender steers, the worker knows what it reads, loops and strangers are contained (issue 19):
    # how the sender was verified (the worker's envelope says so); when the sender of a held message was
    # told it waits; the senders an operator approved for good; every reply's recipients and send time
    # (the loop breaker's counts)
    "ALTER TABLE inbound ADD COLUMN verified TEXT;"
    "ALTER TABLE inbound ADD COLUMN told_at REAL;"
    "CREATE TABLE IF NOT EXISTS allowed_sender ("
    " addr TEXT PRIMARY KEY, added_at REAL NOT NULL, note TEXT) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS reply_log (addr TEXT NOT NULL, at REAL NOT NULL, outbox_id TEXT NOT NULL);"
    "CREATE INDEX IF NOT EXISTS reply_log_addr ON reply_log (addr, at);"
    "CREATE INDEX IF NOT EXISTS reply_log_at ON reply_log (at);",
)
VERSION = len(MIGRATIONS)


@dataclass
class InboundRow:
    """One inbound message for one recipient (the `inbound` table). See `turns.scheduler` for states."""

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
    in_reply_to: str | None = None  # space-separated Message-IDs
    refs: str | None = None  # References, space-separated, oldest first
    to_cc: str | None = None  # JSON list of the addresses on To and Cc
    sender_name: str | None = None  # the From display name
    started_at: float | None = None  # when the API took the turn (it answered 2xx)
    acked_at: float | None = None  # when the sender was told the turn is being worked on
    turn_status: str | None = None  # how the turn ended at the API (completed, error, ...); None: not yet
    verified: str | None = None  # how the sender was verified ("dmarc=pass ..."), for the worker's envelope
    told_at: float | None = None  # `held`: when the sender was told the message waits for approval

    @property
    def in_reply_to_ids(self) -> list[str]:
        return (self.in_reply_to or "").split()

    @property
    def reference_ids(self) -> list[str]:
        return (self.refs or "").split()

    @property
    def to_cc_addrs(self) -> list[str]:
        return list(json.loads(self.to_cc or "[]"))


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
    fallback: bytes | None = None  # the links-only version (see `replies.compose`), until it is used
    bounced_at: float | None = None  # a bounce (DSN) of this reply came back to its VERP address
    bounce_status: str | None = None  # "5.1.1"
    bounce_diagnostic: str | None = None  # "smtp; 550 5.1.1 no such user"
    relay_reply: str | None = None  # the relay's reply to the last delivery that it took ("250 2.0.0 ...")

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
    budget_asked: str | None = None  # the budget the address asked for (`alias+unlimited@`), if any


@dataclass
class BounceRow:
    """One bounce of one of our replies (the `bounce` table): which reply, which address, what status."""

    id: int
    outbox_id: str
    inbound_id: str  # the bounce message itself, recorded as `ignored`
    addr: str | None
    status: str | None
    diagnostic: str | None
    hard: int  # a permanent failure (5.x.x): counts towards MAILGATE_BOUNCE_LIMIT
    at: float


@dataclass
class SuppressionRow:
    """An address that gets no more notices (the `suppression` table; `suppressed_at` None: cleared)."""

    addr: str
    suppressed_at: float | None
    reason: str | None
    cleared_at: float | None


@dataclass
class AllowedSenderRow:
    """A sender the operator approved for good (`mailgate approve ID --always`; the `allowed_sender`
    table), allowed besides MAILGATE_ALLOWED_SENDERS."""

    addr: str
    added_at: float
    note: str | None


@dataclass
class TaskListing(TaskRow):
    """A task as the operator's `tasks` table shows it: its row, the state of its newest message (its
    status: `running`, `answered`, `failed`, ...) and when that message came."""

    status: str | None = None
    last_message_at: float | None = None


@dataclass(frozen=True)
class Problem:
    """Something that went wrong lately, for `mailgate status`: a failed message, a dead or retrying
    reply, a message waiting on a retry."""

    at: float
    table: str  # inbound or outbox
    id: str
    state: str
    error: str


def row_of(cls: type[Any], row: sqlite3.Row | None) -> Any:
    if row is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: row[k] for k in row.keys() if k in names})  # noqa: SIM118 (sqlite3.Row has no __iter__ of keys)


# --- new rows, as the stages hand them to the store --------------------------------------------------


@dataclass(frozen=True)
class NewMessage:
    """An inbound row as admission decides it (state `received`, or `ignored` with a reason)."""

    id: str
    raw_id: str
    received_at: float
    mail_from: str
    rcpt: str
    alias: str
    sender: str | None
    message_id: str | None
    subject: str
    dedupe_key: str
    state: str
    reason: str | None = None
    task_id: str | None = None
    new_task: int = 0
    note: str | None = None
    in_reply_to: str | None = None
    refs: str | None = None
    to_cc: str | None = None
    sender_name: str | None = None
    verified: str | None = None


@dataclass(frozen=True)
class NewTask:
    id: str
    alias: str
    worker_id: str
    owner: str
    budget: str
    subject: str
    created_at: float
    budget_asked: str | None = None


@dataclass(frozen=True)
class NewBounce:
    """A bounce of our reply `outbox_id`, as admission read it from the report that came back."""

    outbox_id: str
    addr: str | None  # the recipient that failed, when the report says
    status: str | None  # "5.1.1"
    diagnostic: str | None
    hard: bool  # a permanent failure (5.x.x)


@dataclass(frozen=True)
class Admitted:
    """Everything one accepted DATA commits at once: the raw bytes and the rows that refer to them."""

    raw_id: str
    sha256: str
    data: bytes  # what is stored: the whole message, or (ignored mail) its head
    messages: Sequence[NewMessage]
    tasks: Sequence[NewTask] = ()
    participants: Sequence[tuple[str, str]] = ()  # (task id, address)
    thread_ids: Sequence[tuple[str, str]] = ()  # (Message-ID, task id) of mail received for a task
    bounces: Sequence[tuple[str, NewBounce]] = ()  # (queue id of the report, the bounce it tells of)
    received_at: float = 0.0  # when the bounces came (their time)
    bounce_limit: int = 3  # hard bounces in 30 days after which an address gets no more notices
    size: int = 0  # the whole message's size, when `data` is only its head (0: `len(data)`)

    @property
    def full_size(self) -> int:
        return self.size or len(self.data)


@dataclass(frozen=True)
class Pruned:
    """What one `prune_raw` did: raw messages cut to their header block, and the bytes that freed."""

    messages: int = 0
    bytes: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(self.messages + other.messages, self.bytes + other.bytes)


# The window of a raw message searched for the end of its header block when it is pruned (a header block
# is at most MAILGATE_MAX_HEADER_SIZE: 100 KiB by default); a raw message is never cut shorter than it.
PRUNE_WINDOW = 1024 * 1024


@dataclass(frozen=True)
class NewReply:
    """An outbox row: a rendered answer or notice with its fixed Message-ID."""

    id: str
    inbound_id: str | None
    task_id: str | None
    kind: str  # "answer" or "notice"
    notice: str | None  # the notice kind
    message_id: str
    mail_from: str
    recipients: Sequence[str]
    data: bytes
    created_at: float
    fallback: bytes | None = None  # a smaller version with the same Message-ID, for a relay's 552
    next_attempt_at: float = 0.0  # not before (an answer held back by the per-address reply limit)


# --- statement builders (column names come from our own code, never from input) ----------------------


def insert(table: str, values: dict[str, Any], *, or_ignore: bool = False) -> Statement:
    cols = ",".join(values)
    marks = ",".join("?" * len(values))
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    return f"{verb} INTO {table} ({cols}) VALUES ({marks})", list(values.values())


def update(table: str, key: str, **values: Any) -> Statement:
    sets = ",".join(f"{col}=?" for col in values)
    return f"UPDATE {table} SET {sets} WHERE id=?", [*values.values(), key]  # noqa: S608


def insert_row(table: str, row: Any) -> Statement:
    return insert(table, asdict(row))


def api_hold_value(since: float, reason: str) -> str:
    """The `meta` value recording an API hold (`Store.set_api_hold`)."""
    return json.dumps({"since": since, "reason": reason[:500]})


def api_hold_of(value: str | None) -> dict[str, Any] | None:
    """An API hold read back from `meta` (`Store.api_hold`); None when there is none or it is garbled."""
    if value is None:
        return None
    try:
        hold = json.loads(value)
    except ValueError:
        return None
    return hold if isinstance(hold, dict) else None
