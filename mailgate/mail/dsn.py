"""Reading a bounce: which recipients failed, with what status and diagnostic. Pure: no I/O.

`read_report(raw, ours)` reads a delivery report about a message we sent to the addresses `ours`:

- A DSN (RFC 3464: `multipart/report; report-type=delivery-status`, or RFC 6533's
  `message/global-delivery-status`): one `RecipientStatus` per per-recipient block, with its `Action`,
  `Status` (the enhanced code, "5.1.1") and `Diagnostic-Code` ("smtp; 550 5.1.1 ...").
- Anything else is read as a plain-text bounce: the first text of the message (not of the original it
  may carry), at most `MAX_TEXT` characters, is searched for an SMTP reply with an enhanced status
  ("550 5.1.1 ..."), then a bare enhanced status starting 4 or 5, then a bare reply code ("550 User
  unknown", read as "5.0.0"). The status is None when none is there.

The recipient of each status is resolved against `ours`: the DSN's Final- or Original-Recipient when it
is one of them, else the one of `ours` a plain text mentions, else the only one of `ours`, else None.
A status is a failure when the report says `failed` (or a DSN block says nothing but a 5.x.x status), or,
for plain text, unless its status says 2 or 4 (a delivery or a delay warning). It is hard when its
status is 5.x.x. Malformed input never raises: it reads as a plain-text bounce without a status.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.parser import BytesParser, HeaderParser

from mailgate.mail.bodies import LargeBodies
from mailgate.mail.headers import guess_decode

MAX_TEXT = 64 * 1024
_REPORT_TYPES = ("message/delivery-status", "message/global-delivery-status")
_STATUS = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_REPLY_WITH_STATUS = re.compile(r"(?<!\d)([45]\d\d)[ -]+([45]\.\d{1,3}\.\d{1,3})(?![\d.])")
_BARE_STATUS = re.compile(r"(?<![\d.])([45]\.\d{1,3}\.\d{1,3})(?![\d.])")
_BARE_REPLY = re.compile(r"(?<![\d.])([45][0-5]\d)[ -]+[A-Za-z<#]")
_SUCCESS = re.compile(r"(?<!\d)2\d\d[ -]+(2\.\d{1,3}\.\d{1,3})(?![\d.])")  # a delivery notification
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class RecipientStatus:
    """What a report says of one recipient of our message."""

    addr: str | None  # one of `ours`, lower-case, when the report can be tied to it
    action: str | None  # failed, delayed, delivered, relayed, expanded (None: plain text)
    status: str | None  # the enhanced status code, "5.1.1"
    diagnostic: str | None  # the diagnostic, one line, capped

    @property
    def failed(self) -> bool:
        if self.action is not None:
            return self.action == "failed" or (self.action == "" and self.hard)
        return self.status is None or self.status.startswith("5")

    @property
    def hard(self) -> bool:
        return self.status is not None and self.status.startswith("5")


@dataclass(frozen=True)
class Report:
    kind: str  # "dsn" or "text"
    recipients: tuple[RecipientStatus, ...]

    @property
    def failures(self) -> tuple[RecipientStatus, ...]:
        return tuple(r for r in self.recipients if r.failed)


def read_report(raw: bytes, ours: Sequence[str]) -> Report:
    """The delivery report in `raw` about our message to `ours` (see the module docstring)."""
    ours = [a.lower() for a in ours]
    if b"\n" not in raw[:4096] and b"\r" in raw[:4096]:  # old Mac line endings: CR alone
        raw = raw.replace(b"\r", b"\n")
    try:
        message = BytesParser(policy=policy.compat32).parsebytes(LargeBodies(raw).skeleton)
        blocks = _status_blocks(message)
        if blocks:
            return Report("dsn", tuple(_from_block(block, ours) for block in blocks))
        text = _first_text(message)
    except Exception:  # a report is a hint; a broken one is read as a bounce without a status
        text = ""
    return Report("text", (_from_text(text, ours),))


def _status_blocks(message: Message) -> list[Message]:
    """The per-recipient blocks of every delivery-status part (those with a recipient or a status)."""
    blocks: list[Message] = []
    for part in message.walk():
        if part.get_content_type() not in _REPORT_TYPES:
            continue
        payload = part.get_payload()
        found: list[Message] = []
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, Message):
                found.append(item)
                rest = item.get_payload()
                if isinstance(rest, str) and rest.strip():  # a type the parser does not split into blocks
                    found += _parse_blocks(rest)
            elif isinstance(item, str):
                found += _parse_blocks(item)
        blocks += [b for b in found if any(b.get(name) for name in ("final-recipient", "action", "status"))]
    return blocks


def _parse_blocks(text: str) -> list[Message]:
    parser = HeaderParser(policy=policy.compat32)
    return [
        parser.parsestr(chunk.strip() + "\n") for chunk in re.split(r"\r?\n\s*\r?\n", text) if chunk.strip()
    ]


def _from_block(block: Message, ours: list[str]) -> RecipientStatus:
    final = _address(_field(block, "final-recipient"))
    original = _address(_field(block, "original-recipient"))
    status_match = _STATUS.search(_field(block, "status"))
    status = status_match.group(1) if status_match else None
    diagnostic = _line(_field(block, "diagnostic-code")) or None
    if diagnostic and (status is None or status.endswith(".0.0")):
        # Status left out, or only its class given ("5.0.0"): the quoted reply often says more
        quoted = _status_in(diagnostic)
        if quoted and (status is None or (quoted[0] == status[0] and not quoted.endswith(".0.0"))):
            status = quoted
    addr = next((a for a in (final, original) if a and a in ours), None)
    if addr is None and len(ours) == 1:
        addr = ours[0]
    return RecipientStatus(addr, _field(block, "action").lower().strip(), status, diagnostic)


def _from_text(text: str, ours: list[str]) -> RecipientStatus:
    text = text[:MAX_TEXT]
    status, diagnostic = None, None
    for pattern in (_REPLY_WITH_STATUS, _BARE_STATUS, _BARE_REPLY, _SUCCESS):
        found = pattern.search(text)
        if found:
            code = found.group(found.lastindex or 1)
            status = code if "." in code else f"{code[0]}.0.0"
            start = text.rfind("\n", 0, found.start()) + 1
            end = text.find("\n", found.end())
            diagnostic = _line(text[start : end if end >= 0 else len(text)])
            break
    lowered = text.lower()
    mentioned = [a for a in ours if a in lowered]
    addr = mentioned[0] if len(mentioned) == 1 else (ours[0] if len(ours) == 1 else None)
    return RecipientStatus(addr, None, status, diagnostic or None)


def _status_in(text: str) -> str | None:
    found = _REPLY_WITH_STATUS.search(text) or _BARE_STATUS.search(text)
    if found:
        return found.group(found.lastindex or 1)
    reply = _BARE_REPLY.search(text)
    return f"{reply.group(1)[0]}.0.0" if reply else None


def _first_text(message: Message) -> str:
    """The first text/plain body outside any attached message (the report, not the original)."""
    stack = [message]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if part.is_multipart():
            payload = part.get_payload()
            if ctype.startswith("multipart/") and isinstance(payload, list):
                stack[:0] = [p for p in payload if isinstance(p, Message)]
            continue
        if ctype == "text/plain" or part is message:  # a multipart without its boundaries is text too
            data = part.get_payload(decode=True)
            if isinstance(data, bytes):
                return _decode(data, part.get_content_charset())
    return ""


def _decode(data: bytes, charset: str | None) -> str:
    try:
        return data[: MAX_TEXT * 4].decode(charset or "ascii")
    except (LookupError, UnicodeError):
        return guess_decode(data[: MAX_TEXT * 4])


def _field(block: Message, name: str) -> str:
    value = block.get(name)
    return str(value) if value is not None else ""


def _address(value: str) -> str | None:
    """`rfc822; <user@example.org>` -> "user@example.org"."""
    addr = value.partition(";")[2] if ";" in value else value
    addr = addr.strip().strip("<>").strip().lower()
    return addr if "@" in addr else None


def _line(value: str, limit: int = 500) -> str:
    value = _SPACES.sub(" ", value).strip()
    return value if len(value) <= limit else value[: limit - 1] + "…"
