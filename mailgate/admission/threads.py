"""Which task a message belongs to: reply tokens, Message-ID chains, and who may continue a task.

A reply from mailgate carries `Reply-To: alias+<token>@domain` (the token's formula: `mailgate.tokens`,
which the reply side uses to make it). A token that does not verify is never trusted.

Resolution, strongest first: a token in the recipient address; `In-Reply-To`; `References` newest first
(both matched against every Message-ID mailgate received or sent for a task of the same worker);
otherwise a new task. Only participants continue a task: anyone else starts a new one, with a note. So
does a reply in the thread of a task that was archived (`/archive` in the thread, or `mailgate archive`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ulid import ULID

from mailgate.errors import BadToken
from mailgate.models import BUDGETS, TaskRef
from mailgate.tokens import TASK_PREFIX, looks_like_token, task_id_of_token, verify_token

NOT_PARTICIPANT_NOTE = (
    "You wrote in a conversation that you are not part of, so this message started a new task of its own."
)


def new_task_id() -> str:
    """A caller-chosen task id: `tsk_` followed by a ULID (sorts by creation time)."""
    return TASK_PREFIX + str(ULID())


class Known(Protocol):
    """What the store knows that resolution needs, read before resolving (`store.AdmissionFacts`)."""

    @property
    def tasks(self) -> Mapping[str, TaskRef | None]: ...  # task id named by a reply token -> the task

    @property
    def by_chain(self) -> Mapping[str, TaskRef | None]: ...  # alias -> the task the Message-IDs name

    @property
    def participant(self) -> Mapping[str, bool]: ...  # task id -> the sender takes part in it


ARCHIVED_NOTE = "The earlier task of this conversation was archived, so this message started a new task."


@dataclass(frozen=True)
class Resolution:
    task: TaskRef | None  # None: start a new task
    note: str | None = None  # shown at the top of the answer
    budget_tag: str | None = None  # the +tag when it names a budget


def resolve(known: Known, secret: bytes, *, alias: str, tag: str | None, sender: str) -> Resolution:
    """Find the task a message from `sender` to `alias[+tag]` continues, or decide on a new one.

    Raises `BadToken` for a token that names no task of this alias or fails its MAC: such mail is refused
    rather than matched by its headers, so an altered token never reaches the task it imitates.
    """
    found: TaskRef | None = None
    if tag is not None and looks_like_token(tag):
        task_id = task_id_of_token(tag)
        ref = known.tasks.get(task_id) if task_id else None
        if ref is None or ref.alias != alias or not verify_token(secret, tag, ref.task_id, ref.owner):
            raise BadToken(tag)
        found = ref
    if found is None:
        found = known.by_chain.get(alias)
    budget_tag = tag if tag in BUDGETS else None
    if found is None:
        return Resolution(None, budget_tag=budget_tag)
    if found.archived:
        return Resolution(None, note=ARCHIVED_NOTE, budget_tag=budget_tag)
    if sender == found.owner or known.participant.get(found.task_id, False):
        return Resolution(found)
    return Resolution(None, note=NOT_PARTICIPANT_NOTE, budget_tag=budget_tag)
