"""Big attachments as the bytes on the wire: encoded compactly, a slice at a time, and spliced into a
message the email package lays out. Pure: no I/O.

The email package encodes and flattens a payload in whole-string passes (a 10 MB attachment is a
regex split into 350,000 lines, several copies of the message, and single C calls that hold the GIL
for tens of milliseconds), which is what let a huge answer stall the gateway. Here a part's body is
encoded in slices of at most `SLICE` bytes (each C call holds the GIL for about a millisecond, so the
event loop keeps its turns while this runs in a worker thread), and the message is laid out by the
email package with a short marker as each big part's payload: `flatten` puts the encoded slices where
the markers are, in one final join.

Encodings, smallest first among those allowed (RFC 2045; lines end with CRLF on the wire):
- text whose lines all fit in 998 octets, with no NUL: `7bit` when it is ASCII, else `8bit` when the
  relay path takes 8-bit data (8BITMIME);
- otherwise the smaller of `quoted-printable` (mostly-ASCII text: ~1.0-1.1x) and `base64` (1.37x);
- files (any bytes): `base64`, which keeps them byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

SLICE = 256 * 1024  # characters or bytes handled per C call
MAX_LINE = 998  # octets per line, without the CRLF (RFC 5322 2.1.1)
_B64_LINE = 57  # input bytes per 76-character base64 line


@dataclass
class EncodedPart:
    """One attachment, encoded: `chunks` joined are its body on the wire (CRLF line ends)."""

    filename: str
    content_type: str  # "text/markdown", "application/pdf"
    cte: str  # Content-Transfer-Encoding
    chunks: list[bytes]
    charset: str | None = None  # "utf-8" for text encoded by `encode_text`
    marker: str = field(default_factory=lambda: f"mailgate-part-{secrets.token_hex(16)}")

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)


def base64_size(n: int) -> int:
    """Bytes on the wire for `n` bytes in base64: 76-character lines, each with its CRLF."""
    full, rest = divmod(n, _B64_LINE)
    return full * 78 + ((rest + 2) // 3 * 4 + 2 if rest else 0)


def utf8_size(text: str) -> int:
    """len(text.encode()), without holding a copy of the whole text (lone surrogates count as "?")."""
    return sum(len(text[i : i + SLICE].encode("utf-8", "replace")) for i in range(0, len(text), SLICE))


def encode_bytes(data: bytes) -> list[bytes]:
    """`data` in base64, 76-character lines ending in CRLF, a slice at a time."""
    step = _B64_LINE * (SLICE // _B64_LINE)
    return [base64.encodebytes(data[i : i + step]).replace(b"\n", b"\r\n") for i in range(0, len(data), step)]


def encode_text(text: str, *, eight_bit: bool) -> tuple[str, list[bytes]]:
    """`text` as UTF-8 with CRLF line ends, in the smallest encoding allowed: (cte, chunks).

    `eight_bit`: the relay path takes 8-bit data (the relay offers 8BITMIME, or a Maildir).
    """
    lines: list[bytes] = []  # the text as UTF-8 with LF line ends, split after a line end
    ascii_only, longest, nul = True, 0, False
    start = 0
    while start < len(text):
        end = min(len(text), start + SLICE)
        if end < len(text):  # end on a line end, unless one line is longer than a slice (too long anyway)
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline >= start else end + (text[end - 1] == "\r")
        raw = text[start:end].encode("utf-8", "replace").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = end
        ascii_only = ascii_only and raw.isascii()
        nul = nul or b"\0" in raw
        longest = max(longest, max(map(len, raw.split(b"\n"))))
        lines.append(raw)
    if longest <= MAX_LINE and not nul and (ascii_only or eight_bit):
        return ("7bit" if ascii_only else "8bit"), [raw.replace(b"\n", b"\r\n") for raw in lines]
    crlf_size = sum(len(raw) + raw.count(b"\n") for raw in lines)
    qp = _quoted_printable(lines)
    if sum(map(len, qp)) <= base64_size(crlf_size):
        return "quoted-printable", qp
    del qp
    whole = b"".join(raw.replace(b"\n", b"\r\n") for raw in lines)
    del lines
    return "base64", encode_bytes(whole)


def _quoted_printable(slices: Sequence[bytes]) -> list[bytes]:
    """Quoted-printable of LF-ended text slices; a slice that ends mid-line gets a soft line break."""
    out = []
    for n, raw in enumerate(slices):
        encoded = binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n")
        if n + 1 < len(slices) and not raw.endswith(b"\n"):
            encoded += b"=\r\n"
        out.append(encoded)
    return out


def wire_size(skeleton: bytes, parts: Sequence[EncodedPart]) -> int:
    """The size of `flatten(skeleton, parts)`, without building it."""
    return len(skeleton) + sum(p.size - len(p.marker) for p in parts)


def build(skeleton: bytes, parts: Sequence[tuple[EncodedPart, bytes | None]]) -> bytes:
    """The reply's bytes: each part given with its content (a file, a placeholder until now) encoded,
    then all spliced into `skeleton` by `flatten`."""
    for part, content in parts:
        if content is not None:
            part.chunks = encode_bytes(content)
    return flatten(skeleton, [part for part, _ in parts])


def flatten(skeleton: bytes, parts: Sequence[EncodedPart]) -> bytes:
    """`skeleton` (a flattened message whose big parts hold their marker as payload) with each marker
    replaced by its part's encoded body, in one join; the parts' chunks are released after it."""
    found = sorted(((skeleton.find(p.marker.encode("ascii")), p) for p in parts), key=lambda f: f[0])
    if found and found[0][0] < 0:
        raise ValueError(f"no marker for {found[0][1].filename!r} in the message")
    pieces: list[bytes] = []
    at = 0
    for position, part in found:
        pieces += (skeleton[at:position], *part.chunks)
        at = position + len(part.marker)
    pieces.append(skeleton[at:])
    data = b"".join(pieces)
    del pieces
    for part in parts:
        part.chunks.clear()
    return data
