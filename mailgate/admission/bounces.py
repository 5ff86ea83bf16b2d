"""The return path of our replies (VERP): one envelope sender per reply, so a bounce names the reply.

Every reply and notice goes out with `MAIL FROM:<alias+bounce-<token>@domain>`. The token is 26
characters of an HMAC-SHA256 over the outbox row's id (lower-case base32: MTAs that fold the case of
local parts keep it), so `alias+bounce-<token>` fits a 64-octet local part with an alias of up to 24
characters. The token does not carry the id: the address is looked up among the replies sent (it is
stored as the row's `mail_from`) and the HMAC recomputed over that row's id, so an address nobody
was sent from, or an altered one, is refused at RCPT. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

BOUNCE_PREFIX = "bounce-"
TOKEN_LEN = 26  # 130 bits of the MAC
_BASE32 = set("abcdefghijklmnopqrstuvwxyz234567")


def bounce_token(secret: bytes, outbox_id: str) -> str:
    """The token of the reply `outbox_id`'s return path."""
    digest = hmac.new(secret, f"bounce\x00{outbox_id}".encode(), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:TOKEN_LEN]


def bounce_address(secret: bytes, alias: str, domain: str, outbox_id: str) -> str:
    """`alias+bounce-<token>@domain`: the envelope sender of the reply `outbox_id`."""
    return f"{alias}+{BOUNCE_PREFIX}{bounce_token(secret, outbox_id)}@{domain}".lower()


def token_of_tag(tag: str) -> str | None:
    """The token of a `+bounce-<token>` tag, or None when the tag is not one (a reply token, a budget)."""
    if not tag.startswith(BOUNCE_PREFIX):
        return None
    token = tag[len(BOUNCE_PREFIX) :].lower()
    return token if len(token) == TOKEN_LEN and set(token) <= _BASE32 else None


def verify_bounce_token(secret: bytes, token: str, outbox_id: str) -> bool:
    """Constant-time check that `token` is the return-path token of the reply `outbox_id`."""
    return hmac.compare_digest(token.lower().encode(), bounce_token(secret, outbox_id).encode())
