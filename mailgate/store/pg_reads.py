"""The reads of the PostgreSQL store that ask several questions at once: what one DATA decision asks (the
same `AdmissionFacts` SQLite's `reads` answers, in one round trip for a new mail), a task's Message-ID
chain, and the operator's reads (`status`: rows per state, recent problems; `show`: both tables by
Message-ID); one query per kind of question rather than one per item."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailgate.models import TaskRef
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import ACTIVE_SQL, Problem


async def _rows(conn: Any, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[dict[str, Any]]:
    cur = await conn.execute(sql, params)
    return list(await cur.fetchall())


FACTS = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(dedupe_key, id)), '[]') FROM inbound
    WHERE dedupe_key = ANY(%(keys)s::text[])
       OR (dedupe_key = ANY(%(legacy)s::text[]) AND coalesce(sender, 'env:' || mail_from) = %(who)s))
    AS duplicates,
  (SELECT coalesce(json_agg(json_build_array(id, alias, owner)), '[]') FROM task
    WHERE id = ANY(%(tokens)s::text[])) AS tokens,
  (SELECT coalesce(
      json_agg(json_build_array(m.message_id, t.id, t.alias, t.owner) ORDER BY t.created_at DESC), '[]')
    FROM thread_message m JOIN task t ON t.id = m.task_id
    WHERE m.message_id = ANY(%(chain)s::text[]) AND t.alias = ANY(%(aliases)s::text[])) AS chain,
  (SELECT count(*) FROM (SELECT 1 FROM task WHERE owner = %(sender)s AND created_at >= %(since)s
    LIMIT %(max_new_tasks)s) capped) AS new_tasks
"""

# per task a message names: does the sender take part, and its turns since (counted up to the limit)
TASK_FACTS = """
SELECT t.id,
  EXISTS (SELECT 1 FROM participant p WHERE p.task_id = t.id AND p.addr = %(sender)s) AS participant,
  (SELECT count(*) FROM (SELECT 1 FROM inbound i WHERE i.task_id = t.id AND i.received_at >= %(since)s
    LIMIT %(max_turns)s) capped) AS turns
FROM unnest(%(ids)s::text[]) AS t(id)
"""


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
    legacy_keys: Sequence[str] = (),
    who: str = "",
) -> AdmissionFacts:
    """As `reads.admission_facts`, in one round trip (two when the mail names a task): duplicates,
    tasks by token, the task of a Message-ID chain per alias (the first id of the chain that names one;
    the newest task on ties), and the counts, each stopping at its limit."""
    ids = list(chain[:50]) if sender is not None else []
    [row] = await _rows(
        conn,
        FACTS,
        {
            "keys": list(keys),
            "legacy": list(legacy_keys),
            "who": who,
            "tokens": list(token_task_ids) if sender is not None else [],
            "chain": ids,
            "aliases": list(aliases),
            "sender": sender,
            "since": since,
            "max_new_tasks": max_new_tasks,
        },
    )
    found = dict(row["duplicates"])
    legacy = [*legacy_keys] or [key for key in keys]
    facts = AdmissionFacts(
        duplicates={key: found.get(key) or found.get(old) for key, old in zip(keys, legacy, strict=True)}
    )
    if sender is None:
        return facts
    facts.sender = sender
    known = {task_id: TaskRef(task_id, alias, owner) for task_id, alias, owner in row["tokens"]}
    facts.tasks = {task_id: known.get(task_id) for task_id in token_task_ids}
    facts.chain = list(chain)
    if chain:
        for alias in aliases:
            facts.by_chain[alias] = None
            for message_id in ids:
                hit = next((r for r in row["chain"] if r[0] == message_id and r[2] == alias), None)
                if hit is not None:
                    facts.by_chain[alias] = TaskRef(hit[1], hit[2], hit[3])
                    break
    named = list(
        dict.fromkeys(ref.task_id for ref in (*facts.tasks.values(), *facts.by_chain.values()) if ref)
    )
    if named:
        params = {"ids": named, "sender": sender, "since": since, "max_turns": max_turns}
        for r in await _rows(conn, TASK_FACTS, params):
            facts.participant[r["id"]] = bool(r["participant"])
            facts.turns[r["id"]] = int(r["turns"])
    facts.new_tasks = int(row["new_tasks"])
    return facts


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


async def by_message_id(conn: Any, wanted: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inbound rows and the outbox rows carrying Message-ID `wanted` (with its angle brackets)."""
    inbound = await _rows(conn, "SELECT * FROM inbound WHERE message_id = %s ORDER BY id", [wanted])
    outbox = await _rows(conn, "SELECT * FROM outbox WHERE message_id = %s ORDER BY id", [wanted])
    return inbound, outbox


async def count_by_state(conn: Any) -> dict[str, dict[str, int]]:
    """As `SqliteStore.count_by_state`, in one query: `{"inbound": {state: n}, "outbox": {state: n}}`."""
    rows = await _rows(
        conn,
        "SELECT 'inbound' AS tbl, state, count(*) AS n FROM inbound GROUP BY state "
        "UNION ALL SELECT 'outbox', state, count(*) FROM outbox GROUP BY state",
        [],
    )
    counts: dict[str, dict[str, int]] = {"inbound": {}, "outbox": {}}
    for r in rows:
        counts[str(r["tbl"])][str(r["state"])] = int(r["n"])
    return counts


RECENT_PROBLEMS = f"""
SELECT * FROM (
  SELECT updated_at AS at, 'inbound' AS tbl, id, state, coalesce(reason, last_error) AS error FROM inbound
  WHERE state = 'failed' OR (last_error IS NOT NULL AND state IN ({ACTIVE_SQL}))
  UNION ALL
  SELECT updated_at, 'outbox', id, state, last_error FROM outbox
  WHERE state IN ('dead', 'retry') AND last_error IS NOT NULL
) problems ORDER BY at DESC, id DESC LIMIT %s
"""  # noqa: S608 (constants only)


async def recent_problems(conn: Any, limit: int) -> list[Problem]:
    """As `SqliteStore.recent_problems`: the newest troubles of both tables, newest first."""
    rows = await _rows(conn, RECENT_PROBLEMS, [limit])
    return [
        Problem(float(r["at"]), str(r["tbl"]), str(r["id"]), str(r["state"]), str(r["error"] or ""))
        for r in rows
    ]
