"""The JSON shapes on the wire. camelCase everywhere except the worker-run object (snake_case),
exactly as the official `handinger` SDK models (`Task`, `Turn`, `Worker`) expect them."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

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
