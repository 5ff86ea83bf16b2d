"""Which task a message belongs to: reply tokens, Message-ID chains, and who may continue a task.

A reply from mailgate carries `Reply-To: alias+<token>@domain`. The token is the task's ULID (26
characters) followed by 13 characters of an HMAC-SHA256 over the task id and its owner, all lower-case
base32, so it survives MTAs that fold the case of local parts and fits a 64-octet local part with an
alias of up to 24 characters. A token that does not verify is never trusted.

Resolution, strongest first: a token in the recipient address; `In-Reply-To`; `References` newest first
(both matched against every Message-ID mailgate received or sent for a task of the same worker);
otherwise a new task. Only participants continue a task: anyone else starts a new one, with a note. So
does a reply in the thread of a task that was archived (`/archive` in the thread, or `mailgate archive`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ulid import ULID

from mailgate.errors import BadToken
from mailgate.models import BUDGETS, TaskRef

TASK_PREFIX = "tsk_"
_ULID_LEN = 26
_MAC_LEN = 13
TOKEN_LEN = _ULID_LEN + _MAC_LEN
MAX_ALIAS_LEN = 64 - 1 - TOKEN_LEN  # "alias+token" must fit a 64-octet local part
_CROCKFORD = set("0123456789abcdefghjkmnpqrstvwxyz")

NOT_PARTICIPANT_NOTE = (
    "You wrote in a conversation that you are not part of, so this message started a new task of its own."
)


def new_task_id() -> str:
    """A caller-chosen task id: `tsk_` followed by a ULID (sorts by creation time)."""
    return TASK_PREFIX + str(ULID())


def _mac(secret: bytes, task_id: str, owner: str) -> str:
    digest = hmac.new(secret, f"{task_id}\x00{owner.lower()}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:_MAC_LEN]


def make_token(secret: bytes, task_id: str, owner: str) -> str:
    """The reply token for `task_id` owned by `owner`. Only for ids made by `new_task_id`."""
    ulid = task_id.removeprefix(TASK_PREFIX).lower()
    if len(ulid) != _ULID_LEN or not set(ulid) <= _CROCKFORD:
        raise ValueError(f"not a mailgate task id: {task_id!r}")
    return ulid + _mac(secret, task_id, owner)


def looks_like_token(tag: str) -> bool:
    """True when a `+tag` has the shape of a reply token (as opposed to a budget word)."""
    return len(tag) == TOKEN_LEN and tag not in BUDGETS


def task_id_of_token(tag: str) -> str | None:
    """The task id a token names, without checking the MAC (for the look-up of the task's owner)."""
    ulid = tag[:_ULID_LEN].lower()
    if len(tag) != TOKEN_LEN or not set(ulid) <= _CROCKFORD:
        return None
    return TASK_PREFIX + ulid.upper()


def verify_token(secret: bytes, tag: str, task_id: str, owner: str) -> bool:
    """Constant-time check that `tag` is the token of `task_id` owned by `owner`."""
    if len(tag) != TOKEN_LEN:
        return False
    return hmac.compare_digest(tag[_ULID_LEN:].lower().encode(), _mac(secret, task_id, owner).encode())


def split_recipient(addr: str, domain: str) -> tuple[str, str | None] | None:
    """`alias+tag@domain` -> (alias, tag); None when the address is not on `domain`."""
    local, at, dom = addr.lower().rpartition("@")
    if not at or dom.rstrip(".") != domain or not local:
        return None
    alias, plus, tag = local.partition("+")
    return alias, (tag if plus else None)


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
