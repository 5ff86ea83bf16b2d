"""`json.loads` for big documents, with the event loop's turns in between: `await loads(raw)`.

`json.loads` is one C call that holds the interpreter (in a thread too) for as long as it runs: a
10 MB answer in `GET /api/tasks/{id}` held the runner's loop 20-60 ms (bench/loop_stall.py). What is
big in an API answer is a few long strings (a turn's text), so here the document is walked string by
string (`str.find`, which is C, a slice at a time), every string longer than `SLICE` characters is
replaced by a marker, the rest is parsed by `json.loads` at once (small now), and each long string is
decoded a slice at a time, cut where no escape sequence (nor surrogate pair) is split, and put back.

The result is exactly `json.loads(raw)`'s, errors included (`ValueError`): each slice is decoded by
`json.loads` itself, and a document this cannot walk (not UTF-8, a long string with an escape every
few characters) is parsed by `json.loads` whole. Documents under `SLICE` bytes always are.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import secrets
from typing import Any

SLICE = 256 * 1024  # characters (or bytes) handled per C call
_ESCAPE = 6  # the longest escape sequence: \uXXXX


async def loads(raw: bytes | str) -> Any:
    """`json.loads(raw)`, yielding to the event loop between slices of a big document."""
    if len(raw) <= SLICE:
        return json.loads(raw)
    if isinstance(raw, bytes):
        if json.detect_encoding(raw) != "utf-8":
            return json.loads(raw)
        text = await _decode(raw)
    else:
        text = raw
    long: list[tuple[int, int]] = []  # (start, end) of the long strings' contents, quotes excluded
    at = scanned = 0
    while (opening := text.find('"', at)) >= 0:
        closing = await _closing_quote(text, opening + 1)
        if closing < 0:  # unterminated: json.loads says where
            return json.loads(text)
        if closing - opening > SLICE:
            long.append((opening + 1, closing))
        at = closing + 1
        if at - scanned >= SLICE:
            scanned = at
            await asyncio.sleep(0)
    if not long:
        return json.loads(text)
    marker = f"mailgate-long-{secrets.token_hex(16)}-"
    pieces: list[str] = []
    at = 0
    for index, (start, end) in enumerate(long):
        pieces += (text[at:start], f"{marker}{index}")
        at = end
    pieces.append(text[at:])
    skeleton = json.loads("".join(pieces))
    values: dict[str, str] = {}
    for index, (start, end) in enumerate(long):
        value = await _decode_string(text, start, end)
        if value is None:
            return json.loads(text)
        values[f"{marker}{index}"] = value
    try:
        return _put_back(skeleton, values)
    except RecursionError:  # nested deeper than this stack allows: as `json.loads` does (or fails) it
        return json.loads(text)


async def _decode(raw: bytes) -> str:
    """UTF-8 bytes as text, a slice at a time, as `json.loads` decodes them (encoded surrogates pass;
    other bad bytes raise `UnicodeDecodeError`, a `ValueError`)."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
    parts = []
    for at in range(0, len(raw), SLICE):
        parts.append(decoder.decode(raw[at : at + SLICE], final=at + SLICE >= len(raw)))
        await asyncio.sleep(0)
    return "".join(parts)


async def _closing_quote(text: str, at: int) -> int:
    """Where the string whose contents start at `at` ends (its closing quote), or -1."""
    scanned = at
    while (quote := text.find('"', at)) >= 0:
        backslashes = 0
        while text[quote - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return quote
        at = quote + 1
        if at - scanned >= SLICE:
            scanned = at
            await asyncio.sleep(0)
    return -1


async def _decode_string(text: str, start: int, end: int) -> str | None:
    """The JSON string contents `text[start:end]` decoded a slice at a time; None when no cut that
    splits no escape can be found near where a slice should end."""
    parts = []
    at = start
    while at < end:
        cut = min(end, at + SLICE)
        if cut < end:
            cut = _safe_cut(text, at, cut)
            if cut < 0:
                return None
        parts.append(json.loads(f'"{text[at:cut]}"'))
        at = cut
        await asyncio.sleep(0)
    return "".join(parts)


def _safe_cut(text: str, low: int, cut: int) -> int:
    """A position at or before `cut` (and after `low`) with no backslash in the `_ESCAPE` characters
    before it: no escape sequence, nor the second half of a surrogate pair, starts there or runs over
    it. -1 when there is none in the last 4,096 characters."""
    floor = max(low + _ESCAPE, cut - 4096)
    while cut > floor:
        backslash = text.rfind("\\", cut - _ESCAPE, cut)
        if backslash < 0:
            return cut
        cut = backslash
    return -1


def _put_back(value: Any, values: dict[str, str]) -> Any:
    """`value` with each marker string (a value or a key) replaced by the long string it stands for."""
    if isinstance(value, str):
        return values.get(value, value)
    if isinstance(value, list):
        return [_put_back(v, values) for v in value]
    if isinstance(value, dict):
        return {values.get(k, k): _put_back(v, values) for k, v in value.items()}
    return value
