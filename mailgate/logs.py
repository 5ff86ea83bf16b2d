"""Logging: one event per line on stderr, with fields, as logfmt (the default) or JSON.

`log.info("smtp_reject", extra={"client": "192.0.2.1:4711", "rcpt": "x@y", ...})` becomes

    ts=2024-05-01T12:00:00.123Z level=info logger=mailgate.smtp event=smtp_reject client=192.0.2.1:4711 ...

or, with MAILGATE_LOG_FORMAT=json, `{"ts": "...", "level": "info", ..., "client": "192.0.2.1:4711"}`.

Invariants an administrator's `grep`, `awk` and log shipper rely on:
- one event is one line: a traceback is folded into the event's `exc` field (escaped in logfmt, a string
  in JSON), and control characters in any value are escaped (`\\n`, `\\r`, `\\t`, `\\x00`, `\\x1b`),
  never written raw; so are the invisible characters that reorder or hide text on a terminal (bidi
  controls such as U+202E, zero-width characters: `\\u202e`), so a peer cannot make a line read
  differently from what it holds (JSON escapes everything outside ASCII anyway);
- aiosmtpd's own warnings (logger `mail.log`) go through the same formatter, so a peer's bytes in
  them are escaped too;
- a field that is None or empty is left out (`reason=None` never appears);
- values are written as a person reads them, never as Python reprs: a peer address is `ip:port` (see
  `client`), a list is comma-separated in logfmt and a JSON array in JSON, booleans are true/false.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("logfmt", "json")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_CONTROL = re.compile(
    r"[\x00-\x1f\x7f\x80-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def client(peer: Any, sockname: Any = None) -> str:
    """An SMTP/LMTP peer as an administrator reads it: `192.0.2.1:4711`, `[2001:db8::1]:4711`, or, for
    a unix socket (whose peer has no address), `unix:` and the socket's path."""
    if isinstance(peer, tuple | list) and len(peer) >= 2:
        host, port = str(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if peer:
        return f"unix:{peer}" if isinstance(peer, str) else str(peer)
    if isinstance(sockname, str) and sockname:
        return f"unix:{sockname}"
    return ""


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's extra fields, empty ones left out."""
    return {
        k: v
        for k, v in vars(record).items()
        if k not in _STANDARD and v is not None and v != "" and v != () and v != []
    }


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class LogfmtFormatter(logging.Formatter):
    """`ts=... level=info logger=mailgate.turns event=turn_answered inbound=01H... task=tsk_...`"""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_quote(record.getMessage())}",
        ]
        parts += [f"{k}={_quote(_text(v))}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts`, `level`, `logger`, `event`, the fields, and `exc` (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _fields(record).items():
            event.setdefault(key, _json_value(value))
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        # ensure_ascii: every control character (and anything else unusual) is a \u escape
        return json.dumps(event, ensure_ascii=True)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return ",".join(f"{k}:{_text(v)}" for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        return [_json_value(v) for v in value]
    return str(value)


def escape_controls(value: str) -> str:
    """`value` with every control character escaped (`\\n`, `\\t`, `\\x1b`), so it stays on its line."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group()) or _code(ord(m.group())), value)


def _code(point: int) -> str:
    return f"\\x{point:02x}" if point <= 0xFF else f"\\u{point:04x}"


def _quote(value: str) -> str:
    if value and not any(c in value for c in ' "=\\') and not _CONTROL.search(value):
        return value
    return '"' + escape_controls(value.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def setup(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Send mailgate's events to stderr, one a line, in `fmt` (`logfmt` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger("mailgate")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd's own logger: its warnings (a peer's unknown command, written as the peer sent it, NUL
    # bytes and all) come through the same formatter, escaped; its per-command INFO lines stay out.
    library = logging.getLogger("mail.log")
    library.handlers[:] = [handler]
    library.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    library.propagate = False
