"""Reading a message's header block: one detector for where it ends, lenient and length-capped value reads.

Pure: no I/O, and nothing here raises on malformed mail. Every stage that needs a header reads it through
`Headers` (built once per message, at the end of DATA); what later stages need is extracted once into
`HeaderFacts` (`read_facts`) and kept on the message's row, so no stage parses the header block again.

- `header_block(raw)`: the header block and its blank line (CRLF, bare LF, or CR-only line endings).
- `Headers.parse(raw)`: the fields, unfolded, in order. `values(name)` gives raw values (RFC 2047 words
  left alone, undecodable bytes as surrogates: what Authentication-Results and DKIM checks need);
  `text(name)` decodes RFC 2047 and folds whitespace; `addresses(name)` reads mailboxes; `msgids(name)`
  reads Message-ID lists. Each read is capped (`MAX_TEXT`, `MAX_ADDRESS_LIST`): a 200 KB header costs no
  more than its cap.
"""

from __future__ import annotations

import email.policy
import functools
import re
from collections.abc import Iterable, Iterator
from email.headerregistry import BaseHeader, MessageIDHeader, UnstructuredHeader
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

from mailgate.models import Address, HeaderFacts

__all__ = [
    "MAX_ADDRESS_LIST",
    "MAX_TEXT",
    "Headers",
    "clean_text",
    "fix_surrogates",
    "header_block",
    "header_text",
    "msgid_list",
    "plain_mailboxes",
    "read_facts",
]

MAX_TEXT = 8192  # characters of a header value worth decoding (subjects, names)
MAX_ADDRESS_LIST = 65536  # characters of an address list worth reading
MAX_SUBJECT = 500  # characters of a subject kept on the row
MAX_IDS = 200  # Message-IDs kept from one In-Reply-To/References header

_HEADER_END = (b"\n\n", b"\n\r\n", b"\r\r")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MSGID = re.compile(r"<([^<>]+)>")
_PLAIN_MSGID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")
# Plain values the email package would parse without a defect, read here without it (its header
# parser is pure Python and the most expensive step at DATA time). Anything else takes the full parser.
_LOCAL = r"[A-Za-z0-9_+=-]+(?:\.[A-Za-z0-9_+=-]+)*"
_HOST = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_MAILBOX = re.compile(
    rf"(?:([A-Za-z0-9_'+-]+(?: [A-Za-z0-9_'+-]+)*) ?)?<({_LOCAL})@({_HOST})>|({_LOCAL})@({_HOST})"
)
_PLAIN_MAX = 4096  # longer address headers take the full parser (cut at MAX_ADDRESS_LIST)


def header_block(raw: bytes) -> bytes:
    """The header block of `raw` and its blank line: what a header-only parse needs to see."""
    ends = [found + len(sep) for sep in _HEADER_END if (found := raw.find(sep)) >= 0]
    return raw[: min(ends)] if ends else raw


def header_size(raw: bytes, limit: int) -> int:
    """The size of `raw`'s header block, looking no further than `limit` bytes (more: `limit + 1`)."""
    window = raw[: limit + 4]
    ends = [found for sep in _HEADER_END if (found := window.find(sep)) >= 0]
    size = min(ends) if ends else len(raw)
    return size if size <= limit else limit + 1


def fix_surrogates(text: str) -> str:
    """Turn raw 8-bit bytes the parser smuggled in as surrogates into text (UTF-8, else cp1252)."""
    if not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    return guess_decode(text.encode("utf-8", "surrogateescape"))


def guess_decode(data: bytes) -> str:
    """UTF-8 when the bytes mostly are (a truncated name still is), else cp1252."""
    text = data.decode("utf-8", "replace")
    if text.count("\ufffd") * 8 <= sum(b > 0x7F for b in data) // 2:
        return text
    return data.decode("cp1252", "replace")


def clean_text(value: str) -> str:
    """One line of text: surrogates decoded, control characters made spaces, whitespace folded."""
    return " ".join(CONTROL.sub(" ", fix_surrogates(value)).split())


@functools.cache
def _header_class(name: str) -> type[BaseHeader]:
    """policy.default's class for header `name` (its registry builds a new class on every call)."""
    registry: Any = email.policy.default.header_factory
    cls: type[BaseHeader] = registry[name]
    return cls


def header_class(name: str) -> type[BaseHeader]:
    return _header_class(name.lower())


def header_text(name: str, value: str) -> str:
    """`str(email.policy.default.header_factory(name, value))` (RFC 2047 decoded), cheaper when plain.

    May raise as the email package does on some garbage.
    """
    cls = _header_class(name.lower())
    plain = value.isascii() and value.isprintable() and "=?" not in value
    if plain and (
        issubclass(cls, UnstructuredHeader)
        or (issubclass(cls, MessageIDHeader) and _PLAIN_MSGID.fullmatch(value))
    ):
        return value  # what the parser gives back for such values
    return str(cls(name, value))


def plain_mailboxes(value: str) -> list[tuple[str, str, str]] | None:
    """(display name, local part, domain) of each mailbox in a plain address list, as the email package
    reads them; None when the value is not plain (quoted names, comments, encoded words, groups, 8-bit...).
    """
    if not value.isascii() or not value.isprintable():
        return None
    found = []
    for piece in value.split(","):
        m = _PLAIN_MAILBOX.fullmatch(piece.strip(" "))
        if m is None:
            return None
        name, local, domain, bare_local, bare_domain = m.groups()
        found.append((name or "", local or bare_local, domain or bare_domain))
    return found


def msgid_list(value: str | None) -> tuple[str, ...]:
    """Message ids ("<id>") found in an In-Reply-To/References value, in order, without duplicates."""
    if not value:
        return ()
    value = fix_surrogates(str(value))
    found = ["".join(m.split()) for m in _MSGID.findall(value)]
    if not found:  # some clients drop the brackets
        found = [tok.strip("<>,;\"'()") for tok in value.split() if "@" in tok]
    ids: dict[str, None] = {}
    for item in found:
        if "@" in item or len(item) > 3:
            ids.setdefault(f"<{CONTROL.sub('', item)}>", None)
    return tuple(ids)


class Headers:
    """The fields of one header block, unfolded, in order. Build with `parse` or `from_message`."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(name.lower(), name, value) for name, value in items]
        self._index: dict[str, list[str]] | None = None

    @classmethod
    def parse(cls, raw: bytes) -> Headers:
        """The header block of `raw` (a whole message, or its head)."""
        try:
            msg = BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_block(raw))
        except Exception:  # pragma: no cover (the parser is lenient: this is belt and braces)
            return cls(())
        return cls.from_message(msg)

    @classmethod
    def from_message(cls, msg: Message) -> Headers:
        try:
            items = [
                (k, v if isinstance(v, str) else str(v)) for k, v in msg.raw_items() if isinstance(k, str)
            ]
        except Exception:  # a broken message object is "no headers", never a crash
            items = []
        return cls(items)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(name as written, raw value) for every field."""
        return ((name, value) for _, name, value in self._items)

    def values(self, name: str) -> list[str]:
        """Every value of `name`, top to bottom, unfolded (CR/LF made spaces), stripped, raw."""
        return self.index().get(name.lower(), [])

    def first(self, name: str) -> str:
        values = self.values(name)
        return values[0] if values else ""

    def index(self) -> dict[str, list[str]]:
        """Lower-cased name -> `values(name)`, for every field at once."""
        if self._index is None:
            index: dict[str, list[str]] = {}
            for lower, _, value in self._items:
                text = _FOLD.sub("", value).replace("\r", " ").replace("\n", " ").strip()
                index.setdefault(lower, []).append(text)
            self._index = index
        return self._index

    def text(self, name: str, limit: int = MAX_TEXT) -> str:
        """The first `name` value, RFC 2047 decoded, as one clean line ("" when absent). Reads `limit`
        characters of the raw value at most."""
        raw = fix_surrogates(self.first(name)[:limit])
        try:
            decoded = header_text(name, raw)
        except Exception:  # undecodable encoded-words: the raw text instead
            decoded = raw
        return clean_text(decoded)

    def msgids(self, name: str) -> tuple[str, ...]:
        """The Message-IDs in the first `name` value (at most `MAX_IDS`)."""
        return msgid_list(self.first(name)[:MAX_ADDRESS_LIST])[:MAX_IDS]

    def addresses(self, name: str) -> tuple[Address, ...]:
        """The mailboxes in every `name` field: lower-cased addr-spec, decoded display name."""
        result: dict[str, Address] = {}
        for value in self.values(name):
            value = fix_surrogates(value[:MAX_ADDRESS_LIST])
            pairs: list[tuple[str, str]]
            plain = plain_mailboxes(value) if len(value) <= _PLAIN_MAX else None
            if plain is not None:
                pairs = [(display, f"{local}@{domain}") for display, local, domain in plain]
            else:
                try:
                    header: Any = _header_class(name.lower())(name, value)
                    pairs = [(a.display_name, a.addr_spec) for a in header.addresses]
                except Exception:  # unparsable: read it the lenient old way
                    pairs = getaddresses([value])
            for display, addr in pairs:
                addr = CONTROL.sub("", fix_surrogates(addr)).strip().strip("<>").lower()
                if "@" not in addr or " " in addr:
                    continue
                result.setdefault(addr, Address(addr, clean_text(display).strip('"')))
        return tuple(result.values())


def read_facts(headers: Headers) -> HeaderFacts:
    """What the stages after DATA need from `headers` (kept on the message's row)."""
    from_ = headers.addresses("from")
    return HeaderFacts(
        message_id=next(iter(headers.msgids("message-id")), None),
        in_reply_to=headers.msgids("in-reply-to"),
        references=headers.msgids("references"),
        subject=headers.text("subject").replace("\x00", " ")[:MAX_SUBJECT],
        from_=from_[0] if from_ else None,
        to=headers.addresses("to"),
        cc=headers.addresses("cc"),
    )
