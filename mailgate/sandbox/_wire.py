"""The JSON shapes on the wire. camelCase everywhere except the worker-run object (snake_case),
exactly as the official `handinger` SDK models (`Task`, `Turn`, `Worker`) expect them.

`json_body` and `text_body` encode long texts (a 10 MB answer) a slice at a time, yielding to the
event loop between slices: one `json.dumps` of 10 MB holds the loop (and the GIL, so a thread would
not help) for about 100 ms, and the sandbox often shares its loop with the gateway under test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Mapping

from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from mailgate.sandbox._state import SandboxTask, SandboxTurn


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Every error body is `{"error": "<human-readable reason>"}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def retry_headers(retry_after: float | None) -> dict[str, str]:
    """`Retry-After` in whole seconds (rounded up) and `retry-after-ms`, or nothing."""
    if retry_after is None:
        return {}
    return {"Retry-After": str(int(-(-retry_after // 1))), "retry-after-ms": str(int(retry_after * 1000))}


def task_json(task: SandboxTask) -> dict[str, object]:
    return {
        "id": task.id,
        "workerId": task.worker_id,
        "organizationId": "org_sandbox",
        "status": task.status,
        "title": task.title,
        "triggeredBy": task.triggered_by,
        "url": task.url,
        "createdAt": task.created_at,
        "completedAt": task.completed_at,
        "createdByUserId": None,
        "archived": task.archived,
        "totals": {
            "credits": sum(t.credits for t in task.turns),
            "durationMs": sum(t.duration_ms for t in task.turns),
            "turnCount": len(task.turns),
        },
    }


def turn_json(turn: SandboxTurn) -> dict[str, object]:
    return {
        "id": turn.id,
        "taskId": turn.task_id,
        "seq": turn.seq,
        "role": "user",
        "status": turn.status,
        "input": turn.input,
        "outputText": turn.output_text,
        "structuredOutput": None,
        "startedAt": turn.started_at,
        "completedAt": turn.completed_at,
        "credits": turn.credits,
        "durationMs": turn.duration_ms,
        "inputTokens": turn.input_tokens,
        "outputTokens": turn.output_tokens,
        "files": list(turn.files),
    }


def worker_run_json(task: SandboxTask, turn: SandboxTurn) -> dict[str, object]:
    """The worker-run object for `turn` (its `id` is the run id, never the task id)."""
    return {
        "id": turn.run_id,
        "object": "worker",
        "status": "running" if turn.running else "completed",
        "running": turn.running,
        "output_text": turn.output_text,
        "output": [
            {
                "id": f"msg_{turn.run_id[4:]}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": turn.output_text}],
            }
        ],
        "sources": list(turn.sources),
        "files": list(turn.files),
        "structured_output": None,
        "url": task.url,
        "usage": {"credits": turn.credits, "durationMs": turn.duration_ms},
        "created_at": turn.created_at,
        "metadata": {},
        "messages": [],
        "error": None,
        "incomplete_details": None,
    }


_LONG = 256 * 1024  # characters: a string this long is encoded in slices of this size


async def json_body(payload: object, status: int = 200) -> Response:
    """The same bytes as `JSONResponse(payload)`, made without holding the loop for long strings."""
    long: list[str] = []
    marker = f"\x00long-{secrets.token_hex(8)}-"

    def swap(value: object) -> object:
        if isinstance(value, str) and len(value) > _LONG:
            long.append(value)
            return f"{marker}{len(long) - 1}"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    skeleton = swap(payload)
    if not long:
        return JSONResponse(payload, status_code=status)
    text = _dumps(skeleton)
    parts: list[bytes] = []
    for index, value in enumerate(long):
        before, _, text = text.partition(_dumps(f"{marker}{index}"))
        parts.append(before.encode())
        parts.append(b'"')
        for start in range(0, len(value), _LONG):
            parts.append(_dumps(value[start : start + _LONG])[1:-1].encode())
            await asyncio.sleep(0)
        parts.append(b'"')
    parts.append(text.encode())
    return _slices(parts, status, "application/json")


async def text_body(text: str) -> Response:
    """`PlainTextResponse(text)`, encoded a slice at a time when long."""
    if len(text) <= _LONG:
        return PlainTextResponse(text)
    parts: list[bytes] = []
    for start in range(0, len(text), _LONG):
        parts.append(text[start : start + _LONG].encode())
        await asyncio.sleep(0)
    return _slices(parts, 200, "text/plain")


def _slices(parts: list[bytes], status: int, media_type: str) -> Response:
    """A body sent slice by slice with its Content-Length (never joined into one 10 MB copy)."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    length = str(sum(len(p) for p in parts))
    return StreamingResponse(body(), status, {"content-length": length}, media_type)


def _dumps(value: object) -> str:
    """As starlette's JSONResponse renders (compact, UTF-8 kept, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
