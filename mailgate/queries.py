"""The database's shape and the plain (synchronous) SQL on it: schema, row types, statement
builders, and the reads that run on the store's reader thread. `store.Store` is the async face."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mailgate.models import InboundState
from mailgate.threads import TaskRef

Statement = tuple[str, Sequence[Any]]
ACTIVE = (InboundState.RECEIVED, InboundState.QUEUED, InboundState.SUBMITTING, InboundState.RUNNING)
ACTIVE_SQL = ",".join(f"'{s.value}'" for s in ACTIVE)


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


def row_of(cls: type[Any], row: sqlite3.Row | None) -> Any:
    if row is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: row[k] for k in row.keys() if k in names})  # noqa: SIM118 (sqlite3.Row has no __iter__ of keys)


# --- reads, run on the reader's thread (each steps its statement to the end: see Store._one) ------------


def duplicate_of(db: sqlite3.Connection, dedupe_key: str) -> str | None:
    rows = db.execute("SELECT id FROM inbound WHERE dedupe_key=?", (dedupe_key,)).fetchall()
    return str(rows[0][0]) if rows else None


def task(db: sqlite3.Connection, task_id: str) -> TaskRef | None:
    rows = db.execute("SELECT id, alias, owner FROM task WHERE id=?", (task_id,)).fetchall()
    return TaskRef(rows[0][0], rows[0][1], rows[0][2]) if rows else None


def task_for_message_ids(db: sqlite3.Connection, message_ids: Sequence[str], alias: str) -> TaskRef | None:
    for message_id in message_ids[:50]:
        rows = db.execute(
            "SELECT t.id, t.alias, t.owner FROM thread_message m JOIN task t ON t.id = m.task_id "
            "WHERE m.message_id=? AND t.alias=? ORDER BY t.created_at DESC LIMIT 1",
            (message_id, alias),
        ).fetchall()
        if rows:
            return TaskRef(rows[0][0], rows[0][1], rows[0][2])
    return None


def is_participant(db: sqlite3.Connection, task_id: str, addr: str) -> bool:
    rows = db.execute("SELECT 1 FROM participant WHERE task_id=? AND addr=?", (task_id, addr)).fetchall()
    return bool(rows)


def count_new_tasks(db: sqlite3.Connection, owner: str, since: float, limit: int | None) -> int:
    # Counting stops at `limit`: the caller only asks "at the limit yet?", and the count would grow with
    # the sender's history (one index entry per task of the last hour).
    rows = db.execute(
        "SELECT count(*) FROM (SELECT 1 FROM task WHERE owner=? AND created_at>=? LIMIT ?)",
        (owner, since, -1 if limit is None else limit),
    ).fetchall()
    return int(rows[0][0])


def count_turns(db: sqlite3.Connection, task_id: str, since: float, limit: int | None) -> int:
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


def intake_facts(
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
    facts = IntakeFacts(duplicates={key: duplicate_of(db, key) for key in keys})
    if sender is None:
        return facts
    facts.sender = sender
    facts.tasks = {task_id: task(db, task_id) for task_id in token_task_ids}
    facts.chain = list(chain)
    if chain:
        facts.by_chain = {alias: task_for_message_ids(db, chain, alias) for alias in aliases}
    for ref in (*facts.tasks.values(), *facts.by_chain.values()):
        if ref is not None and ref.task_id not in facts.turns:
            facts.participant[ref.task_id] = is_participant(db, ref.task_id, sender)
            facts.turns[ref.task_id] = count_turns(db, ref.task_id, since, max_turns)
    facts.new_tasks = count_new_tasks(db, sender, since, max_new_tasks)
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
