"""A streaming look at a message's shape while DATA arrives: bare CRs in its header block, MIME nesting.

Pure: fed the message's bytes block by block, already CRLF-normalized (`smtp.data.Normalizer`), it keeps
only a few flags, a stack of the open multiparts and at most one header section (`max_header` bytes).

- `bare_cr`: the message's own header block holds a CR not followed by LF. Mail readers disagree on
  where such a line ends (`X-A: b\\rFrom: alice@...` is one field to Postfix and OpenDMARC, two to a
  parser that splits on CR), so the From mailgate would read may not be the one that was checked.
- `depth`: the deepest MIME nesting seen: each multipart and each `message/*` part inside it is one
  level, as Postfix's `mime_nesting_limit` counts them. Python's email parser recurses once per level
  (1,000 levels end in RecursionError), so deeper mail is refused before anything parses it.
- `parts`: the header sections seen (the message's own, each part's, each enclosed message's): the
  parser builds an object for each, so mail with more than `max_parts` is refused too.

The work per block is a few C-level searches (`bytes.find`) and Python code per MIME part and per
body line that starts with `--`, never per line: a 40 MB base64 attachment costs one search per
block. Content-Type is read as Python's email package reads it (the first field; a part of a
multipart/digest without one is message/rfc822; a multipart without a boundary is a leaf).
"""

from __future__ import annotations

import re
from email.message import Message

__all__ = ["MimeScan"]

MAX_PARTIAL = 1000  # a line longer than this is no boundary line; its start is not carried over
_CONTENT_TYPE = re.compile(rb"(?im)^content-type[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_BOUNDARY = re.compile(rb'(?i)(?:^|;)[ \t]*boundary[ \t]*=[ \t]*(?:"([^"]*)"|([^;\s]+))')
_BARE_CR = re.compile(rb"\r(?!\n)")
_FOLD = re.compile(rb"\r\n[ \t]")


class MimeScan:
    """Feed normalized blocks with `feed`, then `close()`; read `bare_cr`, `depth`, `too_deep`, `parts`
    and `too_many_parts`."""

    def __init__(self, *, max_depth: int = 100, max_parts: int = 1000, max_header: int = 1024 * 1024) -> None:
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.max_header = max_header
        self.bare_cr = False
        self.depth = 0
        self.parts = 0
        self._stack: list[tuple[bytes | None, bool]] = []  # (boundary, is digest); None: a message/*
        self._in_header = True
        self._top = True  # the header section being read is the message's own
        self._section = bytearray()
        self._section_end = b""  # over `max_header`: the last bytes read, to find the blank line
        self._overflow = False
        self._tail = b""  # in a body: the unfinished last line, from the LF before it ("" mid-line)

    @property
    def too_deep(self) -> bool:
        return self.depth > self.max_depth

    @property
    def too_many_parts(self) -> bool:
        return self.parts > self.max_parts

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and not self.too_deep and not self.too_many_parts:
            pos = self._header(data, pos) if self._in_header else self._body(data, pos)

    def close(self) -> None:
        """The message ended: a header section without its blank line is judged as it is."""
        if self._in_header and (self._section or self._top):
            self._end_section(bytes(self._section))

    # --- header sections ---------------------------------------------------------------------------

    def _header(self, data: bytes, pos: int) -> int:
        """Read a header section up to its blank line; return where its part's body starts."""
        if self._overflow:
            carried = self._section_end
            seen = carried + data[pos:]
            found = seen.find(b"\r\n\r\n")
            if found < 0:
                self._section_end = seen[-3:]
                return len(data)
            self._overflow = False
            self._end_section(bytes(self._section))
            return pos + found + 4 - len(carried)
        if not self._section:  # a section that starts here: copy only its own bytes
            found = pos if data.startswith(b"\r\n", pos) else data.find(b"\r\n\r\n", pos)
            if found >= 0:
                end = found + (2 if found == pos else 4)
                self._end_section(data[pos:end])
                return end
        start = len(self._section)
        self._section += data[pos:]
        section = self._section
        if section[:2] == b"\r\n":
            end = 2
        else:
            found = section.find(b"\r\n\r\n", max(0, start - 3))
            end = found + 4 if found >= 0 else -1
        if end < 0:
            if len(section) > self.max_header:
                self._section_end = bytes(section[-3:])
                del section[self.max_header :]
                self._overflow = True
            return len(data)
        self._end_section(bytes(section[:end]))
        return pos + end - start

    def _end_section(self, section: bytes) -> None:
        self._section = bytearray()
        self.parts += 1
        if self._top:
            self._top = False
            self.bare_cr = _BARE_CR.search(section) is not None
        ctype, boundary = _content_type(section)
        if not ctype:
            parent = self._stack[-1] if self._stack else None
            ctype = b"message/rfc822" if parent is not None and parent[1] else b"text/plain"
        if ctype.startswith(b"multipart/") and boundary:
            self._push((boundary, ctype == b"multipart/digest"))
            self._in_header, self._tail = False, b"\n"
        elif ctype.startswith(b"message/") and ctype != b"message/delivery-status":
            self._push((None, False))  # the body is a message: its header section comes next
            self._in_header = True
        else:
            self._in_header, self._tail = False, b"\n"

    def _push(self, entry: tuple[bytes | None, bool]) -> None:
        self._stack.append(entry)
        self.depth = max(self.depth, len(self._stack))

    # --- bodies --------------------------------------------------------------------------------------

    def _body(self, data: bytes, pos: int) -> int:
        """Look for a delimiter line of an open multipart; return where the next section starts.

        `_tail` says where `pos` is: b"\\n" at a line start; the LF and the start of a line begun in an
        earlier block; b"" inside a line that cannot be a delimiter (too long, or not `--`)."""
        open_ = {b for b, _ in self._stack if b is not None}
        if not open_:
            return len(data)  # nothing can end this body but the end of the message
        tail, start = self._tail, pos
        if tail != b"\n" or data.startswith(b"-", pos):  # first, the line `pos` is in
            lf = data.find(b"\n", pos)
            line = (tail or b"\n ") + data[pos : lf if lf >= 0 else len(data)]
            if lf < 0:
                maybe = line.startswith(b"\n--") or line == b"\n-"
                self._tail = line if maybe and len(line) <= MAX_PARTIAL else b""
                return len(data)
            if line.startswith(b"\n--") and (found := _delimiter_of(line[3:], open_)) is not None:
                return self._delimiter(*found, lf + 1)
            start = lf
        at = data.find(b"\n--", start)
        while at >= 0:
            eol = data.find(b"\n", at + 3)
            if eol < 0:
                break
            if (found := _delimiter_of(data[at + 3 : eol], open_)) is not None:
                return self._delimiter(*found, eol + 1)
            at = data.find(b"\n--", eol)
        last = data.rfind(b"\n", start)
        self._tail = data[last:] if last >= 0 and len(data) - last <= MAX_PARTIAL else b""
        return len(data)

    def _delimiter(self, boundary: bytes, closing: bool, end: int) -> int:
        """A delimiter line of `boundary` ended at `end`: close what it ends, start the next part."""
        level = max(i for i, (b, _) in enumerate(self._stack) if b == boundary)
        del self._stack[level + (0 if closing else 1) :]
        if closing:
            self._tail = b"\n"
        else:
            self._in_header = True
        return end


def _delimiter_of(line: bytes, open_: set[bytes]) -> tuple[bytes, bool] | None:
    """(boundary, closing) when `line` (after its `--`, without the LF) delimits an open multipart."""
    line = line.rstrip(b"\r").rstrip(b" \t")
    if line in open_:
        return line, False
    if line.endswith(b"--") and line[:-2] in open_:
        return line[:-2], True
    return None


def _content_type(section: bytes) -> tuple[bytes, bytes | None]:
    """The content type (lower case, b"" if none or invalid) and the boundary a header section gives."""
    found = _CONTENT_TYPE.search(section)
    if found is None:
        return b"", None
    value = _FOLD.sub(b" ", found.group(1)).strip()
    ctype = value.split(b";", 1)[0].strip().lower()
    if ctype.count(b"/") != 1:
        return b"", None
    if b"*" in value:  # RFC 2231 parameters (boundary*0=...): let the email package read them
        message = Message()
        message["Content-Type"] = value.decode("ascii", "replace")
        name = message.get_boundary()
        return ctype, name.encode("utf-8", "replace") if name else None
    param = _BOUNDARY.search(value)
    if param is None:
        return ctype, None
    boundary = (param.group(1) if param.group(1) is not None else param.group(2)).rstrip()
    return ctype, boundary or None
