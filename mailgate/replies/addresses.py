"""Our addresses on a reply, made where the reply is composed: its Reply-To (`alias+<token>@domain`,
which names the task and its owner) and its return path (`alias+bounce-<token>@domain`, which names the
outbox row). Pure: no I/O.

Admission reads them back: `admission.threads` verifies a reply token (its format and why: that
module's docstring), `admission.bounces` a return-path token. The two sides must make and check the same
HMACs; tests/test_threads.py and tests/test_bounces.py make an address here and verify it there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

TASK_PREFIX = "tsk_"
BOUNCE_PREFIX = "bounce-"
_ULID_LEN = 26
_MAC_LEN = 13  # of the reply token
_BOUNCE_LEN = 26  # of the return-path token
_CROCKFORD = set("0123456789abcdefghjkmnpqrstvwxyz")


def _b32_mac(secret: bytes, message: str, length: int) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:length]


def reply_token(secret: bytes, task_id: str, owner: str) -> str:
    """The reply token for `task_id` owned by `owner`: the task's ULID and 13 characters of an HMAC
    over the task id and its owner, lower-case. Only for ids made by `threads.new_task_id`."""
    ulid = task_id.removeprefix(TASK_PREFIX).lower()
    if len(ulid) != _ULID_LEN or not set(ulid) <= _CROCKFORD:
        raise ValueError(f"not a mailgate task id: {task_id!r}")
    return ulid + _b32_mac(secret, f"{task_id}\x00{owner.lower()}", _MAC_LEN)


def reply_to(secret: bytes, alias: str, domain: str, task_id: str, owner: str) -> str:
    """`alias+<token>@domain`: where a reply in the task's thread comes back to."""
    return f"{alias}+{reply_token(secret, task_id, owner)}@{domain}"


def return_path(secret: bytes, alias: str, domain: str, outbox_id: str) -> str:
    """`alias+bounce-<token>@domain`: the envelope sender of the reply `outbox_id`."""
    token = _b32_mac(secret, f"bounce\x00{outbox_id}", _BOUNCE_LEN)
    return f"{alias}+{BOUNCE_PREFIX}{token}@{domain}".lower()
