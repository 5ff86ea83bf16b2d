"""The deterministic echo agent and the `[sandbox:...]` directives that steer it. Pure: no I/O.

A directive is `[sandbox:` + space-separated `key` or `key=value` tokens + `]`, anywhere in the input
(a value may hold one level of brackets, as in `http://[::1]:8080/x`):

- `status=CODE` (400..599): refuse the POST with that status before anything is recorded;
  `times=N` limits it to the first N POSTs carrying the same directive for the same task;
  `retry-after=SECONDS` adds `Retry-After` / `retry-after-ms` headers.
- `cut`: a streamed answer stops after two text deltas, without `finish` or `[DONE]`.
- `slow=SECONDS`: the turn works that long (instead of `SandboxOptions.turn_seconds`).
- `error`: the turn ends with status `error`.
- `json`: answer with the blocking JSON body even if a stream was asked for.
- `answer-bytes=N`: the answer is exactly N bytes (UTF-8) of generated Markdown instead of the echo.
- `file-url=URL` (repeatable): one more output file whose `url` is exactly URL (nothing is fetched).
- `file-bytes=N` (repeatable): one more output file of N bytes, served by the sandbox itself.
- `name=NAME`, `size=N`, `type=MEDIA`: the filename (percent-decoded), declared size and media type
  of the output file named just before (a `file-url` or `file-bytes` token); an error without one.
- `no-echo-file`: leave out the usual `echo.txt` output file.
- `credits=N`: the turn costs N credits (default 1).

Several directives may appear in one input; later tokens override earlier ones (output files add up,
in order). An unknown key or a bad value raises `ValueError` with a message fit for a 400 answer.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

_DIRECTIVE = re.compile(r"\[sandbox:((?:[^\[\]]|\[[^\[\]]*\])*)\]")
CHUNKS = 4
_BIG_DELTA = 64 * 1024  # characters per text delta once an answer has more than CHUNKS of them
MAX_ANSWER_BYTES = 128 * 1024 * 1024  # held in memory (twice: the text and its deltas)
MAX_FILE_BYTES = 4 * 1024**3  # generated while served, never held
_N = TypeVar("_N", int, float)
_TYPES = mimetypes.MimeTypes()  # the built-in table only: the same guesses on every machine


@dataclass(frozen=True)
class OutputSpec:
    """An output file asked for by `file-url` (`url` set) or `file-bytes` (`served` set)."""

    url: str | None = None  # reported exactly as given; the sandbox does not serve it
    served: int | None = None  # bytes the sandbox serves at /files/{task}/{seq}/{name}
    name: str | None = None  # `filename` on the wire (None: null for file-url, file-K.bin otherwise)
    size: int | None = None  # declared `size` (None: the served size, or no size for file-url)
    media_type: str | None = None  # None: guessed from the name or URL, else application/octet-stream

    def guessed_type(self) -> str:
        if self.media_type:
            return self.media_type
        path = self.name or (urlsplit(self.url).path if self.url else "")
        guessed = _TYPES.guess_type("x/" + path.rpartition("/")[2], strict=False)[0]
        return guessed or "application/octet-stream"


@dataclass(frozen=True)
class Directives:
    """What the `[sandbox:...]` directives of one input ask for (all off by default)."""

    status: int | None = None
    times: int | None = None  # None: every POST carrying the directive fails
    retry_after: float | None = None
    status_key: str = ""  # the directive's own text: `times` is counted per (task, status_key)
    cut: bool = False
    slow: float | None = None
    error: bool = False
    json: bool = False
    answer_bytes: int | None = None
    outputs: tuple[OutputSpec, ...] = ()
    echo_file: bool = True
    credits: int = 1


@dataclass(frozen=True)
class FileInfo:
    """A file the agent received: shown in the echo answer."""

    filename: str
    size: int
    sha256: str


@dataclass
class _Reading:
    """The directives read so far (mutable while parsing, frozen into `Directives` at the end)."""

    values: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputSpec] = field(default_factory=list)

    def token(self, key: str, value: str, whole: str) -> None:
        """Apply one `key=value` token; `ValueError` (without a message) when it cannot be used."""
        flags = {"cut": "cut", "error": "error", "json": "json"}
        if key in flags and not value:
            self.values[flags[key]] = True
        elif key == "no-echo-file" and not value:
            self.values["echo_file"] = False
        elif key == "status":
            self.values["status"] = _bounded(int(value), 400, 599)
            self.values["status_key"] = whole
        elif key == "times":
            self.values["times"] = _bounded(int(value), 1, None)
        elif key == "retry-after":
            self.values["retry_after"] = _bounded(float(value), 0, None)
        elif key == "slow":
            slow = float(value)
            if not 0 <= slow < 3600:
                raise ValueError
            self.values["slow"] = slow
        elif key == "answer-bytes":
            self.values["answer_bytes"] = _bounded(int(value), 0, MAX_ANSWER_BYTES)
        elif key == "credits":
            self.values["credits"] = _bounded(int(value), 0, 1_000_000)
        elif key == "file-url" and value:
            self.outputs.append(OutputSpec(url=value))
        elif key == "file-bytes":
            self.outputs.append(OutputSpec(served=_bounded(int(value), 0, MAX_FILE_BYTES)))
        elif key in ("name", "size", "type") and self.outputs:
            self.outputs[-1] = replace(self.outputs[-1], **{_MODIFIERS[key]: _modifier(key, value)})
        else:
            raise ValueError

    def frozen(self) -> Directives:
        return replace(Directives(outputs=_named(self.outputs)), **self.values)


_MODIFIERS = {"name": "name", "size": "size", "type": "media_type"}


def _modifier(key: str, value: str) -> Any:
    if key == "size":
        return _bounded(int(value), 0, None)
    text = unquote(value) if key == "name" else value
    if not text or len(text) > 255:
        raise ValueError
    return text


def _bounded(number: _N, low: int, high: int | None) -> _N:
    if number < low or (high is not None and number > high):
        raise ValueError
    return number


def _named(outputs: list[OutputSpec]) -> tuple[OutputSpec, ...]:
    """Give served files their default names and check they can be served: one path segment, unique."""
    named: list[OutputSpec] = []
    taken = {"echo.txt"}
    for index, spec in enumerate(outputs, 1):
        if spec.served is not None:
            name = spec.name or f"file-{index}.bin"
            if "/" in name or name in (".", "..") or name in taken:
                raise ValueError(f"file-bytes name {name!r}: use a unique name without '/' (not echo.txt)")
            taken.add(name)
            spec = replace(spec, name=name)
        named.append(spec)
    return tuple(named)


def parse_directives(text: str) -> Directives:
    """Read every `[sandbox:...]` directive in `text`. Raises `ValueError` naming the bad token."""
    reading = _Reading()
    for match in _DIRECTIVE.finditer(text):
        for token in match.group(1).split():
            key, _, value = token.partition("=")
            try:
                reading.token(key.lower(), value, match.group(0))
            except ValueError:
                raise ValueError(f"bad sandbox directive {match.group(0)!r}: cannot use {token!r}") from None
    try:
        return reading.frozen()
    except ValueError as exc:
        raise ValueError(f"bad sandbox directive: {exc}") from None


def echo_answer(task_id: str, seq: int, text: str, files: list[FileInfo]) -> str:
    """The Markdown answer for turn `seq` (0-based; shown 1-based) of `task_id`.

    The input is quoted line by line (blank lines become a bare `>`); received files are listed as
    `name — size bytes — sha256 <hex>`, in the order they were sent.
    """
    lines = [f"Echo from the sandbox (turn {seq + 1} of task {task_id}).", ""]
    lines += [f"> {line}" if line.strip() else ">" for line in text.splitlines() or [""]]
    if files:
        lines += ["", "Files received:", ""]
        lines += [f"- {f.filename} — {f.size} bytes — sha256 {f.sha256}" for f in files]
    return "\n".join(lines) + "\n"


def delta_starts(length: int) -> range:
    """Where the text deltas of an answer of `length` characters start (each runs to the next, the
    last to the end): `CHUNKS` deltas, or 64 KiB each when that makes more; one empty delta for "".
    Slicing each delta when it is sent keeps a 10 MB answer from being copied all at once."""
    size = max(1, -(-length // max(CHUNKS, -(-length // _BIG_DELTA))))
    return range(0, max(length, 1), size)


def title_of(text: str, limit: int = 80) -> str:
    """The task title: the first non-blank line of the first input, cut to `limit` characters."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return "Untitled task"
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def count_tokens(text: str) -> int:
    """A stable stand-in for a token count: about four characters per token."""
    return max(1, len(text) // 4) if text else 0
