"""The Server-Sent Events answer of a streamed turn.

Framing: UTF-8, LF line endings, one `data: <json>` line per event, a blank line after each event,
`: ping` comment lines while the turn is quiet for `heartbeat` seconds, and `data: [DONE]` after the
last event. The stream replays the turn's events from the first one, so nothing is lost between the
POST and the first read. A backlog is written in slices of about 256 KiB, yielding between them.

A dropped client stops only the stream, never the turn. A cut stream (`[sandbox:cut]`, or a turn
aborted by shutdown) returns without completing the HTTP response, so uvicorn closes the connection
mid-body: the client sees an incomplete chunked body, as from a proxy that gave up. `QuietCut` keeps
uvicorn from logging that deliberate cut as an application error.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar

import anyio
import anyio.lowlevel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from mailgate.sandbox._state import SandboxTurn

_BATCH = 256 * 1024  # bytes of events per write when a backlog builds up
_CUT: ContextVar[bool] = ContextVar("mailgate_sandbox_cut", default=False)
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class QuietCut(logging.Filter):
    """Drops uvicorn's "returned without completing response" error for streams cut on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_CUT.get() and "without completing response" in record.getMessage())


class EventStream(Response):
    """Streams `turn`'s events; `cut` stops after the second text delta without finishing."""

    def __init__(self, turn: SandboxTurn, heartbeat: float, *, cut: bool = False) -> None:
        self.turn = turn
        self.heartbeat = heartbeat
        self.cut = cut
        self.status_code = 200
        self.background = None
        self.body = b""
        self.raw_headers = list(_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        outcome: list[bool] = []
        async with anyio.create_task_group() as group:

            async def pump() -> None:
                outcome.append(await self._pump(send))
                group.cancel_scope.cancel()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(pump)
            group.start_soon(watch)
        if not outcome:
            return  # the client left; the turn goes on without it
        if outcome[0]:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            _CUT.set(True)

    async def _pump(self, send: Send) -> bool:
        """Send events until the turn is done: True when it ended with `[DONE]`, False when cut."""
        turn = self.turn
        sent = deltas = 0
        while True:
            changed = turn.changed
            if sent < len(turn.events):
                out: list[bytes] = []
                pending = 0
                for event in turn.events[sent:]:
                    sent += 1
                    out.append(b"data: " + _dumps(event) + b"\n\n")
                    pending += len(out[-1])
                    if self.cut and event["type"] == "text-delta":
                        deltas += 1
                        if deltas >= 2:
                            await _body(send, b"".join(out))
                            return False
                    if pending >= _BATCH:  # a long answer: send it in slices, letting others run between
                        await _body(send, b"".join(out))
                        await anyio.lowlevel.checkpoint()
                        out, pending = [], 0
                if out:
                    await _body(send, b"".join(out))
            if turn.done.is_set():
                if turn.status == "aborted":
                    return False
                await _body(send, b"data: [DONE]\n\n")
                return True
            with anyio.move_on_after(self.heartbeat) as quiet:
                await changed.wait()
            if quiet.cancelled_caught:
                await _body(send, b": ping\n\n")


def _dumps(event: object) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})
