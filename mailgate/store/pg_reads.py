"""The reads of the PostgreSQL store that take several queries: what one DATA decision asks (the same
`AdmissionFacts` SQLite's `reads` answers) and a task's Message-ID chain, each on one connection, with
one query per kind of question rather than one per item."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailgate.models import TaskRef
from mailgate.store.reads import AdmissionFacts


async def _rows(conn: Any, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    cur = await conn.execute(sql, params)
    return list(await cur.fetchall())


async def admission_facts(
    conn: Any,
    keys: Sequence[str],
    *,
    token_task_ids: Sequence[str],
    chain: Sequence[str],
    aliases: Sequence[str],
    sender: str | None,
    since: float,
    max_turns: int,
    max_new_tasks: int,
) -> AdmissionFacts:
    """As `reads.admission_facts`: duplicates, tasks by token, the task of a Message-ID chain per alias
    (the first id of the chain that names one; the newest task on ties), and the sender's counts, each
    count stopping at its limit."""
    found = await _rows(conn, "SELECT dedupe_key, id FROM inbound WHERE dedupe_key = ANY(%s::text[])", [keys])
    by_key = {r["dedupe_key"]: str(r["id"]) for r in found}
    facts = AdmissionFacts(duplicates={key: by_key.get(key) for key in keys})
    if sender is None:
        return facts
    facts.sender = sender
    if token_task_ids:
        rows = await _rows(
            conn, "SELECT id, alias, owner FROM task WHERE id = ANY(%s::text[])", [token_task_ids]
        )
        known = {r["id"]: TaskRef(r["id"], r["alias"], r["owner"]) for r in rows}
        facts.tasks = {task_id: known.get(task_id) for task_id in token_task_ids}
    facts.chain = list(chain)
    if chain:
        ids = list(chain[:50])
        rows = await _rows(
            conn,
            "SELECT m.message_id, t.id, t.alias, t.owner "
            "FROM thread_message m JOIN task t ON t.id = m.task_id "
            "WHERE m.message_id = ANY(%s::text[]) AND t.alias = ANY(%s::text[]) ORDER BY t.created_at DESC",
            [ids, list(aliases)],
        )
        for alias in aliases:
            facts.by_chain[alias] = None
            for message_id in ids:
                hit = next((r for r in rows if r["message_id"] == message_id and r["alias"] == alias), None)
                if hit is not None:
                    facts.by_chain[alias] = TaskRef(hit["id"], hit["alias"], hit["owner"])
                    break
    for ref in (*facts.tasks.values(), *facts.by_chain.values()):
        if ref is not None and ref.task_id not in facts.turns:
            part = await _rows(
                conn, "SELECT 1 FROM participant WHERE task_id = %s AND addr = %s", [ref.task_id, sender]
            )
            facts.participant[ref.task_id] = bool(part)
            facts.turns[ref.task_id] = await _capped_count(
                conn, "inbound WHERE task_id = %s AND received_at >= %s", [ref.task_id, since], max_turns
            )
    facts.new_tasks = await _capped_count(
        conn, "task WHERE owner = %s AND created_at >= %s", [sender, since], max_new_tasks
    )
    return facts


async def _capped_count(conn: Any, where: str, params: Sequence[Any], limit: int | None) -> int:
    # stops at `limit`: the caller only asks "at the limit yet?" (see reads.count_new_tasks)
    sql = f"SELECT count(*) AS n FROM (SELECT 1 FROM {where} LIMIT %s) capped"  # noqa: S608
    rows = await _rows(conn, sql, [*params, limit])
    return int(rows[0]["n"])


async def thread_chain(conn: Any, task_id: str, before: str, *, limit: int) -> list[str]:
    """As `SqliteStore.thread_chain`: the Message-IDs of a task's messages older than `before`, oldest
    first (the first and the newest `limit - 1`), each followed by the replies mailgate sent to it."""
    rows = await _rows(
        conn,
        "SELECT id, message_id FROM inbound WHERE task_id = %s AND id < %s ORDER BY id",
        [task_id, before],
    )
    if len(rows) > limit:  # the first, then the newest `limit - 1` (none of them when limit is 1)
        rows = [rows[0], *rows[len(rows) - limit + 1 :]]
    sent = await _rows(
        conn,
        "SELECT inbound_id, message_id FROM outbox WHERE inbound_id = ANY(%s::text[]) ORDER BY id",
        [[r["id"] for r in rows]],
    )
    chain: list[str] = []
    for row in rows:
        if row["message_id"]:
            chain.append(str(row["message_id"]))
        chain += [str(s["message_id"]) for s in sent if s["inbound_id"] == row["id"]]
    return chain
