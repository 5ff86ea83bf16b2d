"""Our own addresses and the tokens in them: made where a reply is composed, verified at admission. Pure.

One formula for each token, used by both sides (`replies.compose` makes, `admission` verifies), so they
cannot drift apart:

- **Reply token** (`Reply-To: alias+<token>@domain`): the task's ULID (26 characters) followed by 13
  characters of an HMAC-SHA256 over the task id and its owner, all lower-case base32, so it survives MTAs
  that fold the case of local parts and fits a 64-octet local part with an alias of up to 24 characters.
  A token that does not verify is never trusted (`admission.threads`).
- **Return-path token** (VERP: `MAIL FROM:<alias+bounce-<token>@domain>`, one per reply): 26 characters
  of an HMAC-SHA256 over the outbox row's id, lower-case base32. It does not carry the id: the address is
  looked up among the replies sent (stored as the row's `mail_from`) and the HMAC recomputed over that
  row's id, so an address nobody was sent from, or an altered one, is refused at RCPT (`admission.admit`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from mailgate.models import BUDGETS

TASK_PREFIX = "tsk_"
BOUNCE_PREFIX = "bounce-"
_ULID_LEN = 26
_MAC_LEN = 13  # of the reply token
TOKEN_LEN = _ULID_LEN + _MAC_LEN  # a reply token
BOUNCE_TOKEN_LEN = 26  # 130 bits of the MAC
MAX_ALIAS_LEN = 64 - 1 - TOKEN_LEN  # "alias+token" must fit a 64-octet local part
_CROCKFORD = set("0123456789abcdefghjkmnpqrstvwxyz")
_BASE32 = set("abcdefghijklmnopqrstuvwxyz234567")


def split_recipient(addr: str, domain: str) -> tuple[str, str | None] | None:
    """`alias+tag@domain` -> (alias, tag); None when the address is not on `domain`."""
    local, at, dom = addr.lower().rpartition("@")
    if not at or dom.rstrip(".") != domain or not local:
        return None
    alias, plus, tag = local.partition("+")
    return alias, (tag if plus else None)


def _b32_mac(secret: bytes, message: str, length: int) -> str:
    digest = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:length]


# --- reply tokens ----------------------------------------------------------------------------------------


def _reply_mac(secret: bytes, task_id: str, owner: str) -> str:
    return _b32_mac(secret, f"{task_id}\x00{owner.lower()}", _MAC_LEN)


def reply_token(secret: bytes, task_id: str, owner: str) -> str:
    """The reply token for `task_id` owned by `owner`. Only for ids made by `threads.new_task_id`."""
    ulid = task_id.removeprefix(TASK_PREFIX).lower()
    if len(ulid) != _ULID_LEN or not set(ulid) <= _CROCKFORD:
        raise ValueError(f"not a mailgate task id: {task_id!r}")
    return ulid + _reply_mac(secret, task_id, owner)


def reply_to(secret: bytes, alias: str, domain: str, task_id: str, owner: str) -> str:
    """`alias+<token>@domain`: where a reply in the task's thread comes back to."""
    return f"{alias}+{reply_token(secret, task_id, owner)}@{domain}"


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
    """Constant-time check that `tag` is the reply token of `task_id` owned by `owner`."""
    if len(tag) != TOKEN_LEN:
        return False
    return hmac.compare_digest(tag[_ULID_LEN:].lower().encode(), _reply_mac(secret, task_id, owner).encode())


# --- return paths ----------------------------------------------------------------------------------------


def bounce_token(secret: bytes, outbox_id: str) -> str:
    """The token of the reply `outbox_id`'s return path."""
    return _b32_mac(secret, f"bounce\x00{outbox_id}", BOUNCE_TOKEN_LEN)


def return_path(secret: bytes, alias: str, domain: str, outbox_id: str) -> str:
    """`alias+bounce-<token>@domain`: the envelope sender of the reply `outbox_id`."""
    return f"{alias}+{BOUNCE_PREFIX}{bounce_token(secret, outbox_id)}@{domain}".lower()


def token_of_tag(tag: str) -> str | None:
    """The token of a `+bounce-<token>` tag, or None when the tag is not one (a reply token, a budget)."""
    if not tag.startswith(BOUNCE_PREFIX):
        return None
    token = tag[len(BOUNCE_PREFIX) :].lower()
    return token if len(token) == BOUNCE_TOKEN_LEN and set(token) <= _BASE32 else None


def verify_bounce_token(secret: bytes, token: str, outbox_id: str) -> bool:
    """Constant-time check that `token` is the return-path token of the reply `outbox_id`."""
    return hmac.compare_digest(token.lower().encode(), bounce_token(secret, outbox_id).encode())
