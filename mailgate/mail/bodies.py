"""Large base64 bodies kept out of the email parser's way. Pure: no I/O.

Python's email parser keeps every line of a body as its own string (about 50 bytes of overhead on 76
characters) and joins them again when the body is read: a 40 MB message with big attachments peaks at
about 8x its size. `LargeBodies` finds each run of base64-looking lines that starts right after a blank
line (where a part's body starts) and is at least `LARGE` bytes long, and hands the parser a skeleton in
which each run is one marker line. The runs stay where they are, in the raw bytes:

- a part whose whole body is one marker is decoded from the raw bytes when it is read, one part at a
  time, with the same leniency as the email package (missing padding is added, a broken length is
  reported as broken); a file's run (`content`) is even decoded a chunk at a time whenever it is read
  (`DecodedRun`: its size and SHA-256 are known up front, the spool writes it chunk by chunk), so the
  decoded file never sits in memory beside the raw message;
- anywhere else (a marker inside a text body, or in a message attached as .eml) the original text is put
  back before the part is used, so the skeleton never changes what the parser would have seen.

The marker carries a random token, so a sender cannot forge one.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import secrets
from collections.abc import Iterator
from email.message import Message

__all__ = ["LARGE", "DecodedRun", "LargeBodies"]

LARGE = 64 * 1024
_BLANK_LINE = re.compile(rb"\n\r?\n")
# a character class repeated: the regex engine keeps no state per line, however long the run
_RUN = re.compile(rb"[A-Za-z0-9+/=][A-Za-z0-9+/=\r\n]*")
_PADDING = re.compile(rb"[=\r\n]*")
CHUNK = 1 << 20  # raw bytes decoded at a time


class LargeBodies:
    """The big base64 runs of one raw message, and the skeleton the parser reads instead."""

    def __init__(self, raw: bytes, *, large: int | None = None) -> None:
        large = LARGE if large is None else large
        self.raw = raw
        self.spans: list[tuple[int, int]] = []
        self._token = f"mailgate-body-{secrets.token_hex(8)}-"
        self._marker = re.compile(re.escape(self._token) + r"(\d+)")
        pieces: list[bytes] = []
        done = 0
        for blank in _BLANK_LINE.finditer(raw):
            start = blank.end()
            if start < done:
                continue
            run = _RUN.match(raw, start)
            if run is None or run.end() - start < large:
                continue
            end = raw.rfind(b"\n", start, run.end()) + 1  # whole lines only
            if end - start < large:
                continue
            newline = b"\r\n" if raw[end - 2 : end] == b"\r\n" else b"\n"
            pieces += [raw[done:start], f"{self._token}{len(self.spans)}".encode(), newline]
            self.spans.append((start, end))
            done = end
        if self.spans:
            pieces.append(raw[done:])
            self.skeleton = b"".join(pieces)
        else:
            self.skeleton = raw

    def index(self, part: Message) -> int | None:
        """The run that is the whole body of `part`, if it is exactly one marker."""
        if not self.spans:
            return None
        payload = _raw_payload(part)
        if not isinstance(payload, str):
            return None
        found = self._marker.fullmatch(payload.strip())
        return int(found.group(1)) if found and int(found.group(1)) < len(self.spans) else None

    def decode(self, index: int) -> bytes | None:
        """Run `index` decoded from base64 (lenient, like the email package); None when it is broken."""
        start, end = self.spans[index]
        view = memoryview(self.raw)[start:end]
        try:
            return binascii.a2b_base64(view)
        except binascii.Error:
            pass
        try:  # padding left off: the email package adds it, with a defect, and decodes
            return binascii.a2b_base64(bytes(view) + b"==")
        except binascii.Error:
            return None

    def content(self, index: int) -> DecodedRun | bytes | None:
        """Run `index` decoded, as `decode` gives it: a `DecodedRun` (read a chunk at a time) when the
        run is plain base64 with padding at its end only (what every encoder writes), else the bytes."""
        start, end = self.spans[index]
        pad = self.raw.find(b"=", start, end)
        stop = end if pad < 0 else pad
        if pad >= 0 and _PADDING.match(self.raw, pad, end).end() != end:  # type: ignore[union-attr]
            return self.decode(index)  # "=" inside the run: decoding stops there, leave it to binascii
        run = DecodedRun(self.raw, start, stop)
        return None if run.broken else run

    def text(self, index: int) -> str:
        """Run `index` as the text the parser would have held."""
        start, end = self.spans[index]
        return self.raw[start:end].decode("ascii")

    def restore(self, part: Message) -> None:
        """Put the original text back wherever a marker stands in `part`'s body (and its sub-parts)."""
        if not self.spans:
            return
        for name in ("preamble", "epilogue"):
            value = getattr(part, name, None)
            if isinstance(value, str) and self._token in value:
                setattr(part, name, self._marker.sub(self._replacement, value))
        payload = _raw_payload(part)
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    self.restore(child)
        elif isinstance(payload, Message):
            self.restore(payload)
        elif isinstance(payload, str) and self._token in payload:
            part.set_payload(self._marker.sub(self._replacement, payload))

    def _replacement(self, found: re.Match[str]) -> str:
        # the skeleton kept the run's last line ending after the marker: leave it out here
        index = int(found.group(1))
        if index >= len(self.spans):
            return found.group(0)
        text = self.text(index)
        return text[:-2] if text.endswith("\r\n") else text[:-1]


def _raw_payload(part: Message) -> object:
    """The body as the parser stored it: `get_payload()` would decode 8-bit text with the charset."""
    return part.__dict__.get("_payload")


class DecodedRun:
    """The bytes of a base64 run `raw[start:stop]` (only base64 letters and line ends, the padding left
    out), decoded a chunk at a time: exactly what `binascii.a2b_base64` gives for the whole run with its
    padding (or with the padding the email package adds). The SHA-256 is taken once, chunk by chunk."""

    def __init__(self, raw: bytes, start: int, stop: int) -> None:
        self._raw = raw
        self._start = start
        self._stop = stop
        letters = self._letters(start, stop)
        self.broken = letters % 4 == 1  # a length no padding can mend
        self.size = letters // 4 * 3 + (0, 0, 1, 2)[letters % 4]
        digest = hashlib.sha256()
        if not self.broken:
            for chunk in self.chunks():
                digest.update(chunk)
        self.sha256 = digest.hexdigest()

    def _letters(self, start: int, stop: int) -> int:
        raw = self._raw
        return stop - start - raw.count(b"\n", start, stop) - raw.count(b"\r", start, stop)

    def chunks(self) -> Iterator[bytes]:
        """The decoded bytes, about `CHUNK` * 3/4 at a time, each from whole groups of 4 letters."""
        raw, stop = self._raw, self._stop
        view = memoryview(raw)
        pos = self._start
        while pos < stop:
            end = min(pos + CHUNK, stop)
            need = -self._letters(pos, end) % 4
            while need and end < stop:  # up to the end of the group of 4 letters
                if raw[end] not in b"\r\n":
                    need -= 1
                end += 1
            piece = view[pos:end]
            if end == stop and self._letters(pos, end) % 4:  # the last group, its padding left off
                yield binascii.a2b_base64(bytes(piece) + b"==")
            else:
                yield binascii.a2b_base64(piece)
            pos = end
