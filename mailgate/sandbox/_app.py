"""The sandbox's HTTP surface: the Handinger API subset mailgate uses, plus `/_sandbox/` controls.

Every `/api` and `/files` request first meets `_Gate`: a queued global fault answers it, then a wrong
or missing bearer key gets 401 (only when `SandboxOptions.api_key` is set). `/_sandbox/` needs no key
and meets no fault; the `/dashboard/` pages meet faults but need no key (see `_dashboard`).
Checks on POST /api/tasks, in order: body (400/413), `input` (400), `budget` (422), `stream` in the new
era (400), ids (400), `triggeredBy` (422), directives (400, or the status they ask for), then the task
and worker (404 unknown worker or archived task, 403 another worker's task, 409 a turn still running).
Nothing is recorded unless every check passes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from ulid import ULID

from mailgate.models import BUDGETS
from mailgate.sandbox._agent import parse_directives, title_of
from mailgate.sandbox._body import Body, drain, read_body
from mailgate.sandbox._bulk import served_file_chunks
from mailgate.sandbox._dashboard import missing_page, task_page
from mailgate.sandbox._sse import EventStream
from mailgate.sandbox._state import RecordedRequest, SandboxState, SandboxTask
from mailgate.sandbox._wire import (
    error,
    json_body,
    retry_headers,
    task_json,
    text_body,
    turn_json,
    worker_run_json,
)

TRIGGERS = ("api", "ui", "email", "schedule")


def create_app(state: SandboxState) -> Starlette:
    """The ASGI app over `state`. Serve it with `run_sandbox`, or any ASGI server."""
    api = _Api(state)
    routes = [
        Route("/api/tasks", api.create_task, methods=["POST"]),
        Route("/api/tasks/{task_id}", api.get_task, methods=["GET"]),
        Route("/api/tasks/{task_id}", api.delete_task, methods=["DELETE"]),
        Route("/api/tasks/{task_id}/turns", api.get_turns, methods=["GET"]),
        Route("/api/workers/{worker_id}", api.get_worker, methods=["GET"]),
        Route("/files/redirect", api.redirect, methods=["GET"]),
        Route("/files/{task_id}/{seq:int}/{name}", api.get_file, methods=["GET"]),
        Route("/dashboard/tasks/{task_id}", api.dashboard, methods=["GET"]),
        Route("/_sandbox/faults", api.push_fault, methods=["POST"]),
        Route("/_sandbox/faults", api.clear_faults, methods=["DELETE"]),
        Route("/_sandbox/requests", api.list_requests, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    app.add_middleware(_Gate, state=state)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # starlette routes only HTTPException here
        raise exc
    return error(exc.status_code, str(exc.detail), exc.headers)


class _Gate:
    """Global faults, then the bearer key, for everything outside `/_sandbox/`."""

    def __init__(self, app: ASGIApp, state: SandboxState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sandbox/"):
            await self.app(scope, receive, send)
            return
        answer: Response | None = None
        fault = self.state.faults.take(scope["method"], scope["path"])
        key = self.state.options.api_key
        if fault is not None:
            answer = error(
                fault.status, f"sandbox fault: HTTP {fault.status}", retry_headers(fault.retry_after)
            )
        elif key is not None and not scope["path"].startswith("/dashboard/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode()):
                answer = error(401, "missing or invalid API key")
        if answer is None:
            await self.app(scope, receive, send)
            return
        await drain(receive)
        await answer(scope, receive, send)


class _Api:
    def __init__(self, state: SandboxState) -> None:
        self.state = state

    def _worker_exists(self, worker_id: str) -> bool:
        known = self.state.options.workers
        return worker_id.startswith("wrk_") if known is None else worker_id in known

    async def create_task(self, request: Request) -> Response:
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        fields = body.fields
        text = fields.get("input")
        if not isinstance(text, str) or not text.strip():
            return error(400, "input is required")
        budget = fields.get("budget") or "standard"
        if budget not in BUDGETS:
            return error(422, f"budget must be one of {', '.join(BUDGETS)}")
        stream = _flag(fields.get("stream"))
        if stream is None:
            return error(400, "stream must be a boolean")
        if stream and self.state.options.era == "new":
            return error(400, "stream is not supported: the task runs on; poll GET /api/tasks/{taskId}")
        worker_id, task_id, trigger = (_text(fields.get(k)) for k in ("workerId", "taskId", "triggeredBy"))
        if "" in (worker_id, task_id, trigger) or len(task_id or "") > 100:
            return error(400, "workerId, taskId and triggeredBy must be non-empty strings (taskId <= 100)")
        if trigger is not None and trigger not in TRIGGERS:
            return error(422, f"triggeredBy must be one of {', '.join(TRIGGERS)}")
        try:
            directives = parse_directives(text)
        except ValueError as exc:
            return error(400, str(exc))
        scope = task_id or "input:" + hashlib.sha256(text.encode()).hexdigest()
        if self.state.directive_fires(scope, directives):
            status = directives.status or 500
            return error(status, f"sandbox directive: HTTP {status}", retry_headers(directives.retry_after))
        # From here on nothing awaits until the turn is started: the checks cannot race.
        task = self.state.tasks.get(task_id) if task_id else None
        if task is None:
            if worker_id is None:
                return error(400, "workerId is required to start a task")
            if not self._worker_exists(worker_id):
                return error(404, f"worker {worker_id} not found")
            task = SandboxTask(
                id=task_id or f"tsk_{ULID()}",
                worker_id=worker_id,
                title=title_of(text),
                triggered_by=trigger or "api",
                base_url=str(request.base_url).rstrip("/"),
            )
            self.state.tasks[task.id] = task
        elif worker_id is not None and worker_id != task.worker_id:
            return error(403, f"task {task.id} belongs to another worker")
        elif task.archived:
            return error(404, f"task {task.id} is archived")
        elif task.turns and task.turns[-1].running:
            return error(409, f"task {task.id} is still running its previous turn")
        turn = self.state.start_turn(task, text, directives, body.files)
        options = self.state.options
        wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
        self.state.requests.append(
            _record(body, task.id, worker_id, text, str(budget), trigger, wants_stream, turn.seq)
        )
        if wants_stream and options.era == "seed" and not directives.json:
            return EventStream(turn, options.heartbeat_seconds, cut=directives.cut)
        await turn.done.wait()
        if turn.status == "completed":
            return await json_body(worker_run_json(task, turn))
        return error(503 if turn.status == "aborted" else 500, turn.error or "the turn failed")

    def _task(self, request: Request) -> SandboxTask:
        task = self.state.tasks.get(request.path_params["task_id"])
        if task is None:
            raise HTTPException(404, "task not found")
        return task

    async def get_task(self, request: Request) -> Response:
        task = self._task(request)
        if self.state.options.era == "new":
            return JSONResponse({"task": task_json(task)})
        return await json_body({"task": task_json(task), "turns": [turn_json(t) for t in task.turns]})

    async def get_turns(self, request: Request) -> Response:
        if self.state.options.era != "new":
            return error(404, "not found (turns have their own endpoint only in the new era)")
        task = self._task(request)
        return await json_body({"items": [turn_json(t) for t in task.turns], "taskId": task.id})

    async def delete_task(self, request: Request) -> Response:
        self._task(request).archived = True
        return JSONResponse({"archived": True})

    async def get_worker(self, request: Request) -> Response:
        worker_id = request.path_params["worker_id"]
        if not self._worker_exists(worker_id):
            return error(404, f"worker {worker_id} not found")
        wanted = request.query_params.get("taskId")
        tasks = [t for t in reversed(self.state.tasks.values()) if t.worker_id == worker_id and t.turns]
        task = next((t for t in tasks if wanted is None or t.id == wanted), None)
        if task is None:
            return error(404, "task not found" if wanted else f"no task has run on worker {worker_id}")
        return await json_body(worker_run_json(task, task.turns[-1]))

    async def get_file(self, request: Request) -> Response:
        """An output file the sandbox serves: echo.txt (the answer) or a `file-bytes` file."""
        task = self._task(request)
        seq: int = request.path_params["seq"]
        name: str = request.path_params["name"]
        turn = task.turns[seq] if 0 <= seq < len(task.turns) else None
        if turn is None or name not in turn.served:
            return error(404, "file not found")
        served = turn.served[name]
        if served is None:
            return await text_body(turn.output_text)
        size, kind = served
        return StreamingResponse(
            _aiter(served_file_chunks(name, size)), media_type=kind, headers={"content-length": str(size)}
        )

    async def redirect(self, request: Request) -> Response:
        """`?to=URL` answered with a redirect there (302, or `status=` 301/303/307/308), URL as given."""
        to = request.query_params.get("to", "")
        status = request.query_params.get("status", "302")
        if not to or status not in ("301", "302", "303", "307", "308"):
            return error(400, "give ?to=<url> and optionally status=301|302|303|307|308")
        return Response(status_code=int(status), headers={"location": to})

    async def dashboard(self, request: Request) -> Response:
        task = self.state.tasks.get(request.path_params["task_id"])
        return missing_page(request.path_params["task_id"]) if task is None else task_page(task)

    async def push_fault(self, request: Request) -> Response:
        try:
            data = await request.json()
            fault = self.state.faults.push(
                status=int(data.get("status", 503)),
                times=int(data.get("times", 1)),
                retry_after=None if data.get("retryAfter") is None else float(data["retryAfter"]),
                path=str(data.get("path", "POST /api/tasks")),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            return error(400, f"bad fault: {exc}")
        return JSONResponse({**asdict(fault), "pending": len(self.state.faults)}, status_code=201)

    async def clear_faults(self, request: Request) -> Response:
        cleared = len(self.state.faults)
        self.state.faults.clear()
        return JSONResponse({"cleared": cleared})

    async def list_requests(self, request: Request) -> Response:
        return JSONResponse({"items": [asdict(r) for r in self.state.requests]})


async def _aiter(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """An async view of a cheap iterator (starlette would run a plain one in a thread per chunk)."""
    for chunk in chunks:
        yield chunk


def _flag(value: object) -> bool | None:
    """A JSON bool or a form's "true"/"false" (absent is False); None for anything else."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    return None


def _text(value: object) -> str | None:
    """A string field: None when absent, "" when present but empty or not a string (a 400)."""
    if value is None:
        return None
    return value if isinstance(value, str) and value else ""


def _record(
    body: Body,
    task_id: str,
    worker_id: str | None,
    text: str,
    budget: str,
    trigger: str | None,
    stream: bool,
    seq: int,
) -> RecordedRequest:
    return RecordedRequest(
        task_id=task_id,
        worker_id=worker_id,
        input=text,
        budget=budget,
        triggered_by=trigger,
        stream=stream,
        multipart=body.multipart,
        files_field=body.files_field,
        files=list(body.files),
        seq=seq,
    )
