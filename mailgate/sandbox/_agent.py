"""The deterministic echo agent and the `[sandbox:...]` directives that steer it. Pure: no I/O.

A directive is `[sandbox:` + space-separated `key` or `key=value` tokens + `]`, anywhere in the input:

- `status=CODE` (400..599): refuse the POST with that status before anything is recorded;
  `times=N` limits it to the first N POSTs carrying the same directive for the same task;
  `retry-after=SECONDS` adds `Retry-After` / `retry-after-ms` headers.
- `cut`: a streamed answer stops after two text deltas, without `finish` or `[DONE]`.
- `slow=SECONDS`: the turn works that long (instead of `SandboxOptions.turn_seconds`).
- `error`: the turn ends with status `error`.
- `json`: answer with the blocking JSON body even if a stream was asked for.

Several directives may appear in one input; later tokens override earlier ones. An unknown key or a bad
value raises `ValueError` with a message fit for a 400 answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIRECTIVE = re.compile(r"\[sandbox:([^\]]*)\]")
_CHUNKS = 4


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


@dataclass(frozen=True)
class FileInfo:
    """A file the agent received: shown in the echo answer."""

    filename: str
    size: int
    sha256: str


def parse_directives(text: str) -> Directives:
    """Read every `[sandbox:...]` directive in `text`. Raises `ValueError` naming the bad token."""
    status: int | None = None
    times: int | None = None
    retry_after: float | None = None
    status_key = ""
    cut = error = json = False
    slow: float | None = None
    for match in _DIRECTIVE.finditer(text):
        for token in match.group(1).split():
            key, _, value = token.partition("=")
            key = key.lower()
            try:
                if key == "status":
                    status = int(value)
                    if not 400 <= status <= 599:
                        raise ValueError
                    status_key = match.group(0)
                elif key == "times":
                    times = int(value)
                    if times < 1:
                        raise ValueError
                elif key == "retry-after":
                    retry_after = float(value)
                    if retry_after < 0:
                        raise ValueError
                elif key == "slow":
                    slow = float(value)
                    if not 0 <= slow < 3600:
                        raise ValueError
                elif key == "cut" and not value:
                    cut = True
                elif key == "error" and not value:
                    error = True
                elif key == "json" and not value:
                    json = True
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad sandbox directive {match.group(0)!r}: cannot use {token!r}") from None
    return Directives(status, times, retry_after, status_key, cut, slow, error, json)


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


def chunks(answer: str, count: int = _CHUNKS) -> list[str]:
    """Split `answer` into at most `count` non-empty pieces whose concatenation is `answer`."""
    size = max(1, -(-len(answer) // count))
    return [answer[i : i + size] for i in range(0, len(answer), size)] or [""]


def title_of(text: str, limit: int = 80) -> str:
    """The task title: the first non-blank line of the first input, cut to `limit` characters."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return "Untitled task"
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def count_tokens(text: str) -> int:
    """A stable stand-in for a token count: about four characters per token."""
    return max(1, len(text) // 4) if text else 0
