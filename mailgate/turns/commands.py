"""Commands a sender gives in the thread: `/status`, `/archive`, `/help`.

A command is a line of its own at the very start of the sender's new text: the reply's own words, after
quoted history, attributions and signatures are trimmed (`mail.trimming`), so a `/archive` in quoted
material, or further down, is never one. Case does not matter; nothing else may share the line. A
message that starts with a command is answered by the gateway alone (a notice in the thread, counted
against the notice limits), without a turn of the worker; the rest of its text is not sent anywhere.

- `/status`: where the task stands, from the API's view of it (`GET /api/tasks/{id}`): its status, its
  turns, its usage (credits, time), its link; and the messages still waiting here for their turn.
- `/archive`: archives the task at the API (`DELETE /api/tasks/{id}`) and in the store; a later message
  in the thread starts a new task (`admission.threads`).
- `/help`: the list of commands.

`find_command` and `status_lines` are pure; `answer_command` asks the store and the API what the answer
needs (an API that cannot be reached raises as for a turn: the message is tried again later).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailgate.api import HandingerClient
from mailgate.errors import ApiRejected
from mailgate.models import InboundState, TaskSnapshot
from mailgate.store import InboundRow, Store

log = logging.getLogger("mailgate.turns")

#: command -> the notice kind that answers it
COMMANDS = {"/status": "status", "/archive": "archived", "/help": "help"}


@dataclass(frozen=True)
class Command:
    """The message is a command: the gateway answers it with the notice `kind` (its `detail`, its
    `details` lines and the task's link), no turn runs, and the message is `answered`."""

    command: str
    kind: str
    detail: str | None = None
    details: tuple[tuple[str, str], ...] = ()
    task_url: str | None = None
    api_ok: bool = False


def find_command(new_text: str) -> str | None:
    """The command the first non-blank line of `new_text` (the sender's own words) is, or None."""
    for line in new_text.splitlines():
        if line.strip():
            word = line.strip().lower()
            return word if word in COMMANDS else None
    return None


def status_lines(snapshot: TaskSnapshot | None, waiting: int) -> list[tuple[str, str]]:
    """The lines of the answer to `/status`: (label, value)."""
    lines: list[tuple[str, str]] = []
    if snapshot is None:
        lines.append(("Status", "no task at Handinger yet (nothing was sent to the worker so far)"))
    else:
        lines.append(("Status", snapshot.status))
        turns = len(snapshot.turns)
        running = sum(1 for t in snapshot.turns if t.status.lower() in ("running", "pending"))
        lines.append(("Turns", f"{turns}" + (f" ({running} running)" if running else "")))
        usage = []
        if snapshot.credits is not None:
            usage.append(f"{snapshot.credits:g} credits")
        if snapshot.duration_ms is not None:
            usage.append(_duration(snapshot.duration_ms))
        lines.append(("Usage", ", ".join(usage) or "not reported"))
    if waiting:
        lines.append(("Waiting here", f"{waiting} message(s) not yet sent to the worker"))
    return lines


def _duration(ms: int) -> str:
    seconds = ms // 1000
    if seconds < 120:
        return f"{seconds} s of work"
    if seconds < 7200:
        return f"{seconds // 60} min of work"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min of work"


async def answer_command(row: InboundRow, command: str, store: Store, api: HandingerClient) -> Command:
    """What answers `command`, sent in the message `row` (a task the API never saw has no snapshot)."""
    assert row.task_id is not None
    kind = COMMANDS[command]
    log.info("command", extra={"inbound": row.id, "task": row.task_id, "command": command})
    if command == "/help":
        return Command(command, kind)
    task = await store.task_row(row.task_id)
    snapshot = None
    if task is not None and (task.turns or not row.new_task):
        snapshot = await api.get_task(row.task_id)
    url = (snapshot.url if snapshot else None) or (task.url if task else None)
    if command == "/status":
        waiting = [
            m
            for m in await store.messages_of_task(row.task_id)
            if m.id != row.id and m.state in (InboundState.RECEIVED, InboundState.QUEUED)
        ]
        lines = tuple(status_lines(snapshot, len(waiting)))
        return Command(command, kind, details=lines, task_url=url, api_ok=snapshot is not None)
    if snapshot is None:
        return Command(command, kind, detail="there is no task at Handinger yet", task_url=url)
    try:
        archived = await api.delete_task(row.task_id)
    except ApiRejected as exc:
        why = f"Handinger refused: {exc.reason}"
        return Command(command, kind, detail=why, task_url=url, api_ok=True)
    if not archived:
        return Command(command, kind, detail="Handinger did not archive it", task_url=url, api_ok=True)
    await store.archive_task(row.task_id)
    log.info("task_archived", extra={"inbound": row.id, "task": row.task_id, "by": "sender"})
    return Command(command, kind, task_url=url, api_ok=True)
