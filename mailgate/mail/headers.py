"""Reading a message's header block: one detector for where it ends, lenient and length-capped value reads.

Pure: no I/O, and nothing here raises on malformed mail. Every stage that needs a header reads it through
`Headers` (built once per message, at the end of DATA); what later stages need is extracted once into
`HeaderFacts` (`read_facts`) and kept on the message's row, so no stage parses the header block again.

- `header_block(raw)`: the header block and its blank line (CRLF, bare LF, or CR-only line endings).
- `Headers.parse(raw)`: the fields, unfolded, in order. `values(name)` gives raw values (RFC 2047 words
  left alone, undecodable bytes as surrogates: what Authentication-Results and DKIM checks need);
  `text(name)` decodes RFC 2047 and folds whitespace; `addresses(name)` reads mailboxes; `msgids(name)`
  reads Message-ID lists.
- `from_mailboxes(value)`: the addresses of a From value, judged by the address alone (a broken display
  name does not make the address unusable; an ambiguous or malformed address does).

Every read is bounded, whatever the header holds (the header block itself is at most
MAILGATE_MAX_HEADER_SIZE): a value is decoded from its first `MAX_TEXT` characters, an address list is
read from its first `MAX_ADDRESS_LIST` characters and `MAX_ADDRESSES` mailboxes, each mailbox parsed
on its own; the email package's parser (pure Python, some of it quadratic in the length of what it is
given) never sees more than one mailbox or `MAX_TEXT` characters at a time. The cost of reading a
message's header is then linear in its size and small; admission still runs it in a worker thread.
"""

from __future__ import annotations

import email.policy
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.headerregistry import BaseHeader, MessageIDHeader, UnstructuredHeader
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any

from mailgate.models import Address, HeaderFacts, HeaderSignals

__all__ = [
    "BIDI",
    "MAX_ADDRESSES",
    "MAX_ADDRESS_LIST",
    "MAX_TEXT",
    "Headers",
    "clean_text",
    "cut",
    "fix_surrogates",
    "from_addresses",
    "from_mailboxes",
    "header_block",
    "header_text",
    "msgid_list",
    "read_facts",
    "read_signals",
]

MAX_TEXT = 8192  # characters of a header value worth decoding (subjects, names, one mailbox)
MAX_ADDRESS_LIST = 16384  # characters of an address list header (To, Cc, From...) worth reading
MAX_ADDRESSES = 200  # mailboxes read from the fields of one name (the row keeps 100 of To and Cc)
MAX_ID_LIST = 65536  # characters of an In-Reply-To/References value searched for Message-IDs
MAX_SUBJECT = 500  # characters of a subject kept on the row
MAX_IDS = 200  # Message-IDs kept from one In-Reply-To/References header

_HEADER_END = (b"\n\n", b"\n\r\n", b"\r\r")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Bidirectional controls: embeddings, overrides, isolates and marks ("invoice\u202efdp.exe" shows as
# "invoiceexe.pdf"). Stripped from file names; escaped in logs.
BIDI = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_MSGID = re.compile(r"<([^<>]+)>")
_PLAIN_MSGID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")
# Plain values the email package would parse without a defect, read here without it (its header
# parser is pure Python and the most expensive step at DATA time). Anything else takes the full parser.
_LOCAL = r"[A-Za-z0-9_+=-]+(?:\.[A-Za-z0-9_+=-]+)*"
_HOST = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_MAILBOX = re.compile(
    rf"(?:([A-Za-z0-9_'+-]+(?: [A-Za-z0-9_'+-]+)*) ?)?<({_LOCAL})@({_HOST})>|({_LOCAL})@({_HOST})"
)
# A quoted display name the email package reads as its text between the quotes (no escapes, no
# encoded words), before a plain angle-addr: `"Doe, John (Sales)" <j.doe@example.org>`.
_QUOTED_MAILBOX = re.compile(rf'"((?:(?!=\?)[^"\\])*)" ?<({_LOCAL})@({_HOST})>')
# A display name of encoded words only, before a plain angle-addr: `=?UTF-8?Q?P=C3=A9rson?= <p@x.org>`,
# its words decoded as unstructured text (what the email package's address parser makes of them, at a
# tenth of its cost).
_ENCODED_MAILBOX = re.compile(rf"((?:=\?[^?\s\"]+\?[QqBb]\?[^?\s]*\?=[ \t]*)+)<({_LOCAL})@({_HOST})>")


_TOKEN = re.compile(r'\\.|["()<>,;:@]|[^"\\()<>,;:@]+', re.S)
_ATOM = r"[^\s\"(),.:;<>@\[\\\]\x00-\x1f\x7f]+"
_LOCAL_PART = re.compile(rf'{_ATOM}(?:\.{_ATOM})*|"(?:[^"\\\s]|\\\S)+"')
_AT_SPACE = re.compile(r"\s*@\s*")
_LABEL = r"(?!-)[^\s@.()<>\[\]\\,;:\"\x00-\x1f\x7f]{1,63}(?<!-)"
_MAIL_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def cut(value: str, limit: int) -> str:
    """At most `limit` characters of `value`, cut at a space or tab in its second half when there is
    one (so an encoded word or a mailbox is not split in the middle)."""
    if len(value) <= limit:
        return value
    space = max(value.rfind(" ", 0, limit + 1), value.rfind("\t", 0, limit + 1))
    return value[:space] if space > limit // 2 else value[:limit]


@dataclass
class _Piece:
    """One comma-separated item of an address list: where it is in the value, its angle-addrs, and its
    text outside comments and angle brackets."""

    start: int
    end: int = -1
    angles: list[str] = field(default_factory=list)
    bare: list[str] = field(default_factory=list)
    unquoted_at: bool = False  # an "@" outside quotes, comments and angle brackets
    broken: bool = False  # an angle bracket left open, or one inside another


def _pieces(value: str) -> list[_Piece]:
    """The items of an address list (RFC 5322 3.4), split at the commas (and group ends) that are
    outside quotes, comments and angle brackets; a group's name is dropped. Linear in `value`."""
    pieces: list[_Piece] = []
    piece = _Piece(0)
    depth = 0  # comment nesting
    quoted = False
    angle: list[str] | None = None
    for m in _TOKEN.finditer(value):
        tok = m.group()
        sink = piece.bare if angle is None else angle
        if quoted:
            sink.append(tok)
            quoted = tok != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(tok, 0)
        elif tok == '"':
            sink.append(tok)
            quoted = True
        elif tok == "(":
            depth = 1
            sink.append(" ")
        elif angle is not None:
            if tok == ">":
                piece.angles.append("".join(angle))
                angle = None
            else:
                piece.broken |= tok == "<"
                angle.append(tok)
        elif tok == "<":
            angle = []
        elif tok in ",;":
            piece.end = m.start()
            pieces.append(piece)
            piece = _Piece(m.end())
        elif tok == ":":  # a group's name ("Team: a@x, b@y;"): what follows are its mailboxes
            piece = _Piece(m.end())
        else:
            piece.unquoted_at |= tok == "@"
            piece.bare.append(tok)
    piece.broken |= angle is not None
    piece.end = len(value)
    pieces.append(piece)
    return [p for p in pieces if p.angles or p.broken or "".join(p.bare).strip()]


def _addr_spec(addr: str) -> tuple[str, str] | None:
    """(local part, domain) of an addr-spec when it has both and the domain is well-formed, else None.
    UTF-8 (RFC 6532) is allowed in both, control and bidi characters in neither; a domain literal
    (`[192.0.2.1]`) is not a usable domain.
    Folding whitespace (or a comment, left as a space) beside the "@" is the obsolete syntax's, dropped:
    `<pete(his account)@silly.test>`."""
    local, at, domain = _AT_SPACE.sub("@", addr.strip()).rpartition("@")
    domain = domain.rstrip(".")
    if CONTROL.search(local + domain) or BIDI.search(local + domain):
        return None  # a control or bidi character (even quoted) would reach replies, rows and RCPT TO
    if not at or not _LOCAL_PART.fullmatch(local) or not _MAIL_DOMAIN.fullmatch(domain):
        return None
    return local, domain


def from_mailboxes(value: str) -> list[tuple[str, str]] | None:
    """(local part, domain) of each mailbox of a From value, judged by its address alone; None when
    there is none or one of them has no usable address.

    A display name that the email package finds defects in (an encoded word inside quotes, 8-bit text,
    an unquoted comma: `Doe, John <j@example.org>`) does not matter: an item without any address is
    part of a display name. What does matter: an address without a local part or a well-formed domain,
    an angle bracket left open, two angle-addrs in one mailbox, or an unquoted "@" in a display name
    beside an angle-addr (`a@evil.example <b@example.org>`: which one is meant depends on the reader).
    """
    value = fix_surrogates(value)
    found: list[tuple[str, str]] = []
    for piece in _pieces(value):
        if piece.broken or len(piece.angles) > 1 or (piece.angles and piece.unquoted_at):
            return None
        if piece.angles:
            addr = piece.angles[0]
        elif piece.unquoted_at:
            addr = "".join(piece.bare)
        else:
            continue  # no address here: a piece of a display name
        pair = _addr_spec(addr)
        if pair is None:
            return None
        found.append(pair)
    return found or None


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
        self._texts: dict[tuple[str, int], str] = {}

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
        characters of the raw value at most (decoded once: later calls are answered from memory)."""
        key = (name.lower(), limit)
        if key not in self._texts:
            self._texts[key] = self._text(name, limit)
        return self._texts[key]

    def _text(self, name: str, limit: int) -> str:
        raw = fix_surrogates(cut(self.first(name), limit))
        try:
            decoded = header_text(name, raw)
        except Exception:  # undecodable encoded-words: the raw text instead
            decoded = raw
        return clean_text(decoded)

    def msgids(self, name: str) -> tuple[str, ...]:
        """The Message-IDs in the first `name` value (at most `MAX_IDS`)."""
        return msgid_list(cut(self.first(name), MAX_ID_LIST))[:MAX_IDS]

    def addresses(self, name: str, limit: int = MAX_ADDRESSES) -> tuple[Address, ...]:
        """The mailboxes in every `name` field: lower-cased addr-spec, decoded display name. The first
        `limit`, from at most `MAX_ADDRESSES` items of the first `MAX_ADDRESS_LIST` characters of each
        field."""
        result: dict[str, Address] = {}
        seen = 0
        for value in self.values(name):
            value = fix_surrogates(cut(value, MAX_ADDRESS_LIST))
            for piece in _pieces(value):
                if seen >= MAX_ADDRESSES or len(result) >= limit:
                    return tuple(result.values())
                seen += 1
                for display, addr in _read_mailbox(name, value[piece.start : piece.end].strip(), piece):
                    addr = CONTROL.sub("", addr).strip().strip("<>").lower()
                    if "@" not in addr or " " in addr or BIDI.search(addr):
                        continue  # a bidi control would reach a reply's Cc and the participants
                    result.setdefault(addr, Address(addr, clean_text(display).strip('"')))
        return tuple(result.values())


def _read_mailbox(name: str, text: str, piece: _Piece) -> list[tuple[str, str]]:
    """(display name, addr-spec) of one item of an address list: plain ones read here, others by the
    email package (one mailbox at a time, at most `MAX_TEXT` characters), garbage the lenient old way."""
    printable = text.isascii() and text.isprintable()
    plain = _PLAIN_MAILBOX.fullmatch(text) if printable else None
    if plain is not None:
        display, local, domain, bare_local, bare_domain = plain.groups()
        return [(display or "", f"{local or bare_local}@{domain or bare_domain}")]
    quoted = _QUOTED_MAILBOX.fullmatch(text) if printable else None
    if quoted is not None:
        return [(quoted[1], f"{quoted[2]}@{quoted[3]}")]
    encoded = _ENCODED_MAILBOX.fullmatch(text) if printable else None
    if encoded is not None:
        try:
            return [(header_text("Subject", encoded[1].strip()), f"{encoded[2]}@{encoded[3]}")]
        except Exception:  # noqa: S110 (undecodable words: the full parser below says what it makes of them)
            pass
    if len(text) > MAX_TEXT:  # a name no one writes: keep the address only
        return [("", piece.angles[0])] if piece.angles else []
    try:
        header: Any = _header_class(name.lower())(name, text)
        return [(a.display_name, a.addr_spec) for a in header.addresses]
    except Exception:  # unparsable: read it the lenient old way
        return getaddresses([text])


def read_facts(headers: Headers) -> HeaderFacts:
    """What the stages after DATA need from `headers` (kept on the message's row)."""
    from_ = headers.addresses("from", limit=1)
    return HeaderFacts(
        message_id=next(iter(headers.msgids("message-id")), None),
        in_reply_to=headers.msgids("in-reply-to"),
        references=headers.msgids("references"),
        subject=headers.text("subject").replace("\x00", " ")[:MAX_SUBJECT],
        from_=from_[0] if from_ else None,
        to=headers.addresses("to"),
        cc=headers.addresses("cc"),
    )


def from_addresses(headers: Headers) -> tuple[str, ...] | None:
    """The addr-specs in the From header(s), lower-cased; None when any of them is unusable.

    Unusable: no From header, a From longer than `MAX_TEXT` characters, or an address without a local
    part or a well-formed domain (see `from_mailboxes`; a defect in the display name does not count).
    Several From headers are returned together.
    """
    values = headers.values("From")
    if not values:
        return None
    found: list[str] = []
    for value in values:
        mailboxes = from_mailboxes(value) if len(value) <= MAX_TEXT else None
        if mailboxes is None:
            return None
        found += [f"{local}@{domain}".lower() for local, domain in mailboxes]
    return tuple(found)


_TRACE = ("received", "authentication-results")


def read_signals(headers: Headers) -> HeaderSignals:
    """What admission decides on (automatic mail, who sent it), read from `headers` once, as plain values."""
    return HeaderSignals(
        fields=headers.index(),
        from_text=cut(" ".join(headers.values("From")), MAX_TEXT),
        subject=headers.text("subject"),
        from_addresses=from_addresses(headers),
        trace=tuple((lower, value) for lower, _, value in headers._items if lower in _TRACE),
    )
