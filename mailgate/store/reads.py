"""The reads that run on the store's reader thread: plain synchronous SQL, each stepped to its end.

`sqlite.Store` calls these through one hop to the reader's thread; `admission_facts` answers every
question one DATA decision asks in a single hop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailgate.models import TaskRef
from mailgate.store.schema import FINISHED_SQL

# --- reads, run on the reader's thread (each steps its statement to the end: see Store._one) ------------


def duplicate_of(
    db: sqlite3.Connection, dedupe_key: str, legacy_key: str | None = None, who: str = ""
) -> str | None:
    """The row recorded under `dedupe_key`, or under `legacy_key` (the key of rows recorded before
    senders counted) by the same sender: `who` is `coalesce(sender, 'env:' || mail_from)`."""
    rows = db.execute("SELECT id FROM inbound WHERE dedupe_key=?", (dedupe_key,)).fetchall()
    if not rows and legacy_key is not None:
        rows = db.execute(
            "SELECT id FROM inbound WHERE dedupe_key=? AND coalesce(sender, 'env:' || mail_from)=?",
            (legacy_key, who),
        ).fetchall()
    return str(rows[0][0]) if rows else None


def task(db: sqlite3.Connection, task_id: str) -> TaskRef | None:
    rows = db.execute("SELECT id, alias, owner, archived FROM task WHERE id=?", (task_id,)).fetchall()
    return TaskRef(rows[0][0], rows[0][1], rows[0][2], bool(rows[0][3])) if rows else None


def task_for_message_ids(db: sqlite3.Connection, message_ids: Sequence[str], alias: str) -> TaskRef | None:
    for message_id in message_ids[:50]:
        rows = db.execute(
            "SELECT t.id, t.alias, t.owner, t.archived FROM thread_message m JOIN task t ON t.id = m.task_id "
            "WHERE m.message_id=? AND t.alias=? ORDER BY t.created_at DESC LIMIT 1",
            (message_id, alias),
        ).fetchall()
        if rows:
            return TaskRef(rows[0][0], rows[0][1], rows[0][2], bool(rows[0][3]))
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


# A raw message may be pruned when every message of it is finished and none changed since `before`.
PRUNABLE = f"""
r.pruned_at IS NULL AND NOT EXISTS (SELECT 1 FROM inbound i WHERE i.raw_id = r.id
    AND (i.state NOT IN ({FINISHED_SQL}) OR i.updated_at >= ?))"""  # noqa: S608 (constants); ? is `before`


def prune_candidates(
    db: sqlite3.Connection, before: float, limit: int, window: int
) -> list[tuple[str, int, int]]:
    """(raw id, bytes stored, length of its header block) of up to `limit` raw messages to prune. The
    header block ends at the first blank line (CRLF or bare LF) in the first `window` bytes."""
    rows = db.execute(
        f"""WITH c AS (SELECT r.id, length(r.data) AS stored, substr(r.data, 1, ?) AS win
            FROM raw_message r WHERE {PRUNABLE} ORDER BY r.id LIMIT ?)
        SELECT id, stored, min(stored,
            coalesce(nullif(instr(win, X'0D0A0D0A'), 0) + 3, length(win)),
            coalesce(nullif(instr(win, X'0A0A'), 0) + 1, length(win))) AS head FROM c""",  # noqa: S608
        (window, before, limit),
    ).fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


@dataclass
class AdmissionFacts:
    """Everything admission reads at the end of DATA, read in one hop to the reader's thread.

    Asked for: the dedupe keys (with the legacy key of each and who sent the message, see
    `duplicate_of`); the task ids named by reply tokens; one Message-ID chain and the aliases it is looked
    up for; a sender, the start of the rate window and the limits.
    """

    duplicates: dict[str, str | None] = field(default_factory=dict)  # dedupe key -> queue id
    tasks: dict[str, TaskRef | None] = field(default_factory=dict)  # token task id -> task
    chain: list[str] = field(default_factory=list)
    by_chain: dict[str, TaskRef | None] = field(default_factory=dict)  # alias -> task of the chain
    sender: str = ""
    participant: dict[str, bool] = field(default_factory=dict)  # task id -> sender takes part
    turns: dict[str, int] = field(default_factory=dict)  # task id -> turns since (capped)
    new_tasks: int | None = None  # the sender's new tasks since (capped)


def admission_facts(
    db: sqlite3.Connection,
    keys: Sequence[str],
    token_task_ids: Sequence[str],
    chain: Sequence[str],
    aliases: Sequence[str],
    sender: str | None,
    since: float,
    max_turns: int,
    max_new_tasks: int,
    legacy_keys: Sequence[str] = (),
    who: str = "",
) -> AdmissionFacts:
    legacy: list[str | None] = [*legacy_keys] or [None] * len(keys)
    facts = AdmissionFacts(
        duplicates={key: duplicate_of(db, key, old, who) for key, old in zip(keys, legacy, strict=True)}
    )
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
