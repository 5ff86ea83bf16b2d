"""The operator verbs: `messages`, `outbox`, `tasks`, `show`, `status`, `replay`, `archive`, `prune`,
and for held mail (MAILGATE_UNKNOWN_SENDERS=hold) `approve`, `deny` and `senders`.

They need only the database (`config.load_operator_settings`; `archive` also the API). Output is for a
terminal (tables with a header line, one screen for `status`) or, with `--json`, for a program: nested
values are JSON (lists, objects), times are ISO-8601 UTC with `Z` (null when unset), flags are
true/false, and nothing is cut short. In tables only the free text (subjects, reasons, the relay's
answer) is shortened; ids and URLs are whole.

Exit codes: 0 done, 1 not found or refused (no such message, not a failed one, not a held one, not
archived), 3 the store cannot be opened.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from mailgate import retention
from mailgate.config import OperatorSettings
from mailgate.errors import MailgateError
from mailgate.mail.headers import header_block
from mailgate.models import InboundState, OutboxState
from mailgate.store import InboundRow, OutboxRow, Store, holder

EXIT_OK, EXIT_NOT_FOUND = 0, 1
INBOUND_STATES = tuple(str(s) for s in InboundState)
OUTBOX_STATES = tuple(str(s) for s in OutboxState)
_JSON_COLUMNS = ("files", "skipped", "to_cc", "refused", "recipients")
_BOOL_COLUMNS = ("new_task", "archived")
_ID_LISTS = ("in_reply_to", "refs")
_FREE_TEXT = ("subject", "reason", "answer", "last_error", "relay_reply", "error")
CELL_MAX = 60


async def run(verb: str, args: Any, settings: OperatorSettings, store: Store) -> int:
    """Run one operator verb against `store`; print its output; return the exit code."""
    if verb == "messages":
        rows = await store.list_inbound(args.state, args.limit)
        print_rows([_message_line(r) for r in rows], _MESSAGE_COLS, [public(r) for r in rows], args.json)
    elif verb == "outbox":
        outbox = await store.list_outbox(args.state, args.limit)
        print_rows([_outbox_line(r) for r in outbox], _OUTBOX_COLS, [public(r) for r in outbox], args.json)
    elif verb == "tasks":
        tasks = await store.list_tasks(args.limit)
        print_rows([_task_line(public(t)) for t in tasks], _TASK_COLS, [public(t) for t in tasks], args.json)
    elif verb == "show":
        return await _show(store, args.id, as_json=args.json)
    elif verb == "status":
        found = await status(store, settings)
        if args.json:
            print(json.dumps(found))
        else:
            _print_status(found)
    elif verb == "replay":
        if await store.replay_inbound(args.id) or await store.replay_outbox(args.id):
            print(f"queued again: {args.id} (a running gateway picks it up within seconds)")
            return EXIT_OK
        row = await store.inbound(args.id)
        if row is not None and row.state in (InboundState.FAILED, InboundState.IGNORED):
            why = "its raw message is not all there (pruned after MAILGATE_RETENTION_DAYS, or ignored mail)"
        else:
            why = "is not a failed/ignored message or a dead outbox row"
        print(f"mailgate: {args.id} {why}", file=sys.stderr)
        return EXIT_NOT_FOUND
    elif verb == "prune":
        return await _prune(store, settings, args.days, as_json=args.json)
    elif verb == "archive":
        return await _archive(store, settings, args.task_id)
    elif verb in ("approve", "deny", "senders"):
        return await held_verb(verb, args, store)
    return EXIT_OK


async def _prune(store: Store, settings: OperatorSettings, days: float | None, *, as_json: bool) -> int:
    """`prune`: cut the raw bytes of messages finished more than `days` (MAILGATE_RETENTION_DAYS) ago to
    their header block, now; say how many and how much. Retention off (0) and no `--days`: nothing."""
    days = settings.retention_days if days is None else days
    before = time.time() - days * retention.DAY
    done = await retention.prune(store, before=before) if days > 0 else None
    found = {
        "messages": done.messages if done else 0,
        "bytes": done.bytes if done else 0,
        "retention_days": days,
        "before": iso(before) if done else None,
    }
    if as_json:
        print(json.dumps(found))
    elif done is None:
        print("retention is off (MAILGATE_RETENTION_DAYS=0): nothing pruned; --days N prunes once")
    else:
        print(
            f"pruned {done.messages} raw message(s), {_size(done.bytes)} freed: messages finished before "
            f"{found['before']} ({days:g} days) keep their header block"
        )
    return EXIT_OK


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


# --- rows as JSON -------------------------------------------------------------------------------------


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC with `Z` (`2024-05-01T12:00:00Z`); None for unset (None or 0)."""
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def public(row: Any) -> dict[str, Any]:
    """A store row as an operator reads it: no raw bytes, times as ISO, JSON columns and flags decoded."""
    data = asdict(row)
    data.pop("data", None)
    data.pop("fallback", None)  # the bytes of a links-only version of a reply
    for key, value in data.items():
        if key.endswith("_at"):
            data[key] = iso(value)
        elif key in _JSON_COLUMNS and isinstance(value, str):
            with contextlib.suppress(ValueError):  # written by us as JSON; an edited row shows as it is
                data[key] = json.loads(value)
        elif key in _BOOL_COLUMNS and value is not None:
            data[key] = bool(value)
        elif key in _ID_LISTS:
            data[key] = value.split() if isinstance(value, str) else []
    return data


# --- tables ---------------------------------------------------------------------------------------------

_MESSAGE_COLS = ("received", "id", "state", "sender", "rcpt", "task", "attempts", "subject", "reason")
_OUTBOX_COLS = ("created", "id", "state", "kind", "recipients", "attempts", "answer")
_TASK_COLS = ("created", "id", "alias", "owner", "status", "turns", "archived", "subject", "url")


def _message_line(row: InboundRow) -> dict[str, Any]:
    return {
        "received": iso(row.received_at),
        "id": row.id,
        "state": row.state,
        "sender": row.sender or row.mail_from or "<>",
        "rcpt": row.rcpt,
        "task": row.task_id,
        "attempts": row.attempts,
        "subject": row.subject,
        "reason": row.reason or row.last_error,
    }


def _outbox_line(row: OutboxRow) -> dict[str, Any]:
    return {
        "created": iso(row.created_at),
        "id": row.id,
        "state": row.state,
        "kind": row.notice or row.kind,
        "recipients": ", ".join(row.recipient_list),
        "attempts": row.attempts,
        "answer": row.last_error or row.relay_reply,  # the relay's last answer, or what went wrong
    }


def _task_line(task: dict[str, Any]) -> dict[str, Any]:
    line = {key: task.get(key) for key in _TASK_COLS}
    line |= {"created": task["created_at"], "archived": "yes" if task["archived"] else "no"}
    return line


def print_rows(
    lines: list[dict[str, Any]], cols: Sequence[str], rows: list[dict[str, Any]], as_json: bool
) -> None:
    """A table with a header line (or `(none)`), or with `as_json` one JSON object per row and line."""
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    if not lines:
        print("(none)")
        return
    table = [[_cell(col, line.get(col)) for col in cols] for line in lines]
    widths = [max(len(col), *(len(r[i]) for r in table)) for i, col in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(col: str, value: Any) -> str:
    text = "-" if value is None or value == "" else " ".join(str(value).split())
    if col in _FREE_TEXT and len(text) > CELL_MAX:
        return text[: CELL_MAX - 3] + "..."
    return text


# --- show -------------------------------------------------------------------------------------------------


async def _show(store: Store, wanted: str, *, as_json: bool) -> int:
    found = await find(store, wanted)
    if found is None:
        print(
            f"mailgate: no message, outbox row, task or Message-ID {wanted} in this database",
            file=sys.stderr,
        )
        return EXIT_NOT_FOUND
    if as_json:
        print(json.dumps(found))
    else:
        _print_found(found)
    return EXIT_OK


async def find(store: Store, wanted: str) -> dict[str, Any] | None:
    """What `show` prints for `wanted` (with the bounces of the replies in it)."""
    found = await _find(store, wanted)
    if found is not None:
        found |= await _bounces(store, found)
    return found


async def _bounces(store: Store, found: dict[str, Any]) -> dict[str, Any]:
    """The bounces of the replies shown, and those a bounce message reported."""
    outbox = found.get("outbox")
    rows = [outbox] if isinstance(outbox, dict) else outbox if isinstance(outbox, list) else []
    bounces = await store.bounces_of([r["id"] for r in rows if isinstance(r, dict) and "id" in r])
    if isinstance(found.get("inbound"), dict):
        bounces += await store.bounce_reported_by(found["inbound"]["id"])
    shown = [public(b) | {"hard": bool(b.hard)} for b in bounces]
    return {"bounces": shown} if shown else {}


async def _find(store: Store, wanted: str) -> dict[str, Any] | None:
    """A queue id, an outbox id, a task id, or a Message-ID (of a message received or a reply sent)."""
    if (row := await store.inbound(wanted)) is not None:
        return await _inbound_view(store, row)
    if (out := await store.outbox_row(wanted)) is not None:
        return await _outbox_view(store, out)
    if (task := await store.task_row(wanted)) is not None:
        return {
            "task": public(task),
            "participants": await store.participants(task.id),
            "messages": [public(m) for m in await store.messages_of_task(task.id)],
        }
    if "@" in wanted:
        inbound, outbox = await store.find_message_id(wanted)
        if inbound:
            view = await _inbound_view(store, inbound[0])
            if len(inbound) > 1:  # one row per recipient of the same message
                view["same_message"] = [r.id for r in inbound[1:]]
            return view
        if outbox:
            return await _outbox_view(store, outbox[0])
    return None


async def _inbound_view(store: Store, row: InboundRow) -> dict[str, Any]:
    head = header_block(await store.raw_head(row.raw_id)).decode("utf-8", "replace").rstrip()
    task = await store.task_row(row.task_id) if row.task_id else None
    return {
        "inbound": public(row),
        "task": {"id": task.id, "url": task.url, "turns": task.turns, "archived": bool(task.archived)}
        if task
        else None,
        "headers": head,
        "outbox": [public(o) for o in await store.outbox_for(row.id)],
    }


async def _outbox_view(store: Store, row: OutboxRow) -> dict[str, Any]:
    message = await store.inbound(row.inbound_id) if row.inbound_id else None
    return {
        "outbox": public(row),
        "inbound": {
            "id": message.id,
            "state": message.state,
            "sender": message.sender,
            "subject": message.subject,
            "message_id": message.message_id,
        }
        if message
        else None,
    }


_SHOW_COLS = {
    "outbox": ("created", "id", "state", "kind", "recipients", "attempts", "answer"),
    "messages": ("received", "id", "state", "sender", "attempts", "subject", "reason"),
}


def _print_found(found: dict[str, Any]) -> None:
    """`show` for a terminal: one section per part, `key  value` lines, tables for lists of rows."""
    for section, value in found.items():
        if value is None:
            continue
        print(f"== {section}")
        if isinstance(value, dict):
            width = max(map(len, value), default=0)
            for key, item in value.items():
                if item is not None and item != "" and item != []:
                    shown = json.dumps(item) if isinstance(item, dict | list) else item
                    print(f"  {key.ljust(width)}  {_text(shown)}")
        elif isinstance(value, str):
            print("\n".join("  " + line for line in value.splitlines()))
        elif value and isinstance(value[0], dict):
            lines = [_row_line(section, v) for v in value]
            print_rows(lines, _SHOW_COLS.get(section, tuple(value[0])), value, as_json=False)
        else:
            print("\n".join(f"  {item}" for item in value) or "  (none)")
        print()


def _row_line(section: str, row: dict[str, Any]) -> dict[str, Any]:
    if section == "outbox":
        return row | {
            "created": row.get("created_at"),
            "kind": row.get("notice") or row.get("kind"),
            "recipients": ", ".join(row.get("recipients") or []),
            "answer": row.get("last_error") or row.get("relay_reply"),
        }
    return row | {"received": row.get("received_at"), "reason": row.get("reason") or row.get("last_error")}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# --- status ----------------------------------------------------------------------------------------------


async def status(store: Store, settings: OperatorSettings, *, problems: int = 5) -> dict[str, Any]:
    """What `mailgate status` shows, as data: like Postfix's `postqueue -p`, in one screen."""
    now = time.time()
    # one gateway per SQLite store holds its lock file; gateways sharing PostgreSQL hold no such file
    shared = settings.database_url is not None
    pid = None if shared else holder(settings.database)
    counts = await store.count_by_state()
    oldest = await store.oldest_waiting()
    running = await store.list_inbound(InboundState.RUNNING, 5)
    hold = await store.api_hold()
    return {
        "database": settings.store_label,
        "gateway": {"running": None if shared else pid is not None, "pid": pid or None},
        "inbound": {s: counts["inbound"].get(s, 0) for s in INBOUND_STATES},
        "outbox": {s: counts["outbox"].get(s, 0) for s in OUTBOX_STATES},
        "oldest_waiting": {
            "id": oldest.id,
            "state": oldest.state,
            "received_at": iso(oldest.received_at),
            "age_seconds": round(now - oldest.received_at, 1),
            "sender": oldest.sender,
            "subject": oldest.subject,
            "last_error": oldest.last_error,
        }
        if oldest
        else None,
        "running_turns": counts["inbound"].get(InboundState.RUNNING, 0),
        "running": [
            {
                "id": r.id,
                "task_id": r.task_id,
                "since": iso(r.updated_at),
                "seconds": round(now - r.updated_at, 1),
            }
            for r in running
        ],
        "api_hold": {"since": iso(hold.get("since")), "reason": hold.get("reason")} if hold else None,
        "problems": [
            {"at": iso(p.at), "table": p.table, "id": p.id, "state": p.state, "error": p.error}
            for p in await store.recent_problems(problems)
        ],
    }


def _print_status(found: dict[str, Any]) -> None:
    gateway = found["gateway"]
    running = (
        "(a shared store: see each host)"
        if gateway["running"] is None
        else f"running (pid {gateway['pid']})"
        if gateway["running"]
        else "not running"
    )
    print(f"database  {found['database']}   gateway {running}")
    for table in ("inbound", "outbox"):
        print(f"{table:<9} " + "  ".join(f"{state} {n}" for state, n in found[table].items()))
    oldest = found["oldest_waiting"]
    if oldest:
        why = f"; {_short(oldest['last_error'])}" if oldest["last_error"] else ""
        print(
            f"oldest    {oldest['id']} {oldest['state']} for {_age(oldest['age_seconds'])} "
            f"({oldest['sender'] or '-'}: {_short(oldest['subject'], 40)}){why}"
        )
    else:
        print("oldest    nothing waiting")
    turns = ", ".join(f"{r['id']} ({_age(r['seconds'])})" for r in found["running"])
    print(f"running   {found['running_turns']} turn(s){': ' + turns if turns else ''}")
    hold = found["api_hold"]
    print(f"api hold  since {hold['since']}: {_short(hold['reason'], 80)}" if hold else "api hold  none")
    print("problems" + ("" if found["problems"] else "  none"))
    for p in found["problems"]:
        print(f"  {p['at']}  {p['table']:<7} {p['id']}  {p['state']:<8} {_short(p['error'], 70)}")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def _short(text: str | None, limit: int = CELL_MAX) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- archive ---------------------------------------------------------------------------------------------


async def _archive(store: Store, settings: OperatorSettings, task_id: str) -> int:
    from mailgate.service import make_api_client  # the gateway's wiring, loaded only for `archive`

    api = make_api_client(settings)
    try:
        archived = await api.delete_task(task_id)
    except MailgateError as exc:
        print(f"mailgate: could not archive {task_id}: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    finally:
        await api.aclose()
    if not archived:
        known = await store.task_row(task_id) is not None
        where = "the API did not archive it" if known else "no such task here or at the API"
        print(f"mailgate: {task_id}: not archived ({where})", file=sys.stderr)
        return EXIT_NOT_FOUND
    await store.archive_task(task_id)
    print(f"{task_id}: archived")
    return EXIT_OK


# --- held mail: approve, deny, senders ------------------------------------------------------------------


async def held_verb(verb: str, args: Any, store: Store) -> int:
    """`approve ID [--always]`: held -> received (and the sender on the stored allow list); `deny ID`:
    held -> ignored; `senders`: the stored allow list. Exit 1 when ID is not a held message."""
    if verb == "senders":
        rows = [public(r) for r in await store.allowed_senders()]
        print_rows(rows, ("addr", "added_at", "note"), rows, args.json)
        return EXIT_OK
    if verb == "deny":
        if not await store.deny_held(args.id):
            print(f"mailgate: {args.id} is not a held message", file=sys.stderr)
            return EXIT_NOT_FOUND
        print(f"denied: {args.id} (never run)")
        return EXIT_OK
    row = await store.approve_held(args.id)
    if row is None:
        print(f"mailgate: {args.id} is not a held message", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(f"approved: {args.id} (a running gateway runs it within seconds)")
    if args.always and row.sender:
        added = await store.allow_sender(row.sender, f"approve --always {args.id}")
        print(f"{row.sender}: allowed from now on" if added else f"{row.sender}: allowed already")
    return EXIT_OK
