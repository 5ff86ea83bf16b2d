"""HandingerClient against small real HTTP servers on 127.0.0.1:0, in the test's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

import mailgate.api as api_module
from mailgate import __version__
from mailgate.api import HandingerClient
from mailgate.config import OutputHost
from mailgate.errors import ApiRejected, ApiUnauthorized, ApiUnavailable, DownloadRefused, TooLarge
from mailgate.models import OutputFile, RunResult, Source, UploadFile

pytestmark = pytest.mark.anyio

Handler = Callable[[Request], Awaitable[Response]]
WORKER_RUN = {
    "id": "run_1",
    "object": "worker",
    "status": "completed",
    "running": False,
    "output_text": "The answer.",
    "sources": [{"id": "s1", "title": "Example", "type": "url", "url": "https://example.org/a"}],
    "files": [
        {"filename": "report.csv", "mediaType": "text/csv", "url": "https://cdn.example/r.csv", "size": 12}
    ],
    "url": "https://handinger.com/tasks/tsk_1",
    "error": None,
}


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test runner owns the signals
        yield


@contextlib.asynccontextmanager
async def serve(*routes: tuple[str, Handler, list[str]]) -> AsyncIterator[str]:
    """Serve a starlette app with `routes` (path, handler, methods) on 127.0.0.1:0; yield its base URL."""
    app = Starlette(routes=[Route(path, handler, methods=methods) for path, handler, methods in routes])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", log_config=None, timeout_graceful_shutdown=2
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def raw_server(answer: bytes, *, close: bool = True) -> AsyncIterator[str]:
    """A raw HTTP server: reads one request, writes `answer` verbatim, then drops the connection."""
    tasks: set[asyncio.Task[None]] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def client_for(base_url: str, **kwargs: Any) -> AsyncIterator[HandingerClient]:
    client = HandingerClient(base_url, kwargs.pop("api_key", "hk_test"), **kwargs)
    try:
        yield client
    finally:
        await client.aclose()


Seen = list[tuple[dict[str, str], Any]]


def sse(seen: Seen, *frames: str, newline: str = "\n") -> Handler:
    """A handler that records (headers, JSON body) and answers with the SSE `frames`, verbatim."""

    async def handler(request: Request) -> Response:
        seen.append((dict(request.headers), await request.json()))

        async def body() -> AsyncIterator[bytes]:
            for frame in frames:
                yield frame.replace("\n", newline).encode()

        return StreamingResponse(body(), media_type="text/event-stream")

    return handler


def answer(seen: Seen, response: Callable[[], Response]) -> Handler:
    """A handler that records (headers, JSON body or None) and answers `response()`."""

    async def handler(request: Request) -> Response:
        raw = await request.body()
        seen.append((dict(request.headers) | {"query": request.url.query}, json.loads(raw) if raw else None))
        return response()

    return handler


async def create(client: HandingerClient, **kwargs: Any) -> RunResult:
    args: dict[str, Any] = {"task_id": "tsk_1", "worker_id": "wrk_1", "input": "Hello", "budget": "standard"}
    return await client.create_turn(**(args | kwargs))


STREAM_FRAMES = (
    ": keep-alive comment\n\n",
    'data: {"type":"start"}\n\n',
    'data: {"type":"text-delta","delta":"Hel"}\n\n',
    'data: {"type":"text-delta",\ndata: "delta":"lo"}\n\n',  # one JSON value over two data lines
    "data: {not json\n\n",
    'data: {"type":"tool-call","toolName":"search"}\n\n',
    'data: {"type":"source-url","url":"https://example.org/a","title":"Example"}\n\n',
    'data: {"type":"file","url":"https://cdn.example/r.csv","mediaType":"text/csv","filename":"r.csv"}\n\n',
    'data: {"type":"finish"}\n\n',
    "data: [DONE]\n\n",
)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
async def test_stream_is_parsed_into_a_result(newline: str) -> None:
    """Comments, multi-line data, CRLF, unknown events and bad JSON: the known events become the result."""
    seen: Seen = []
    progress: list[RunResult] = []
    route = ("/api/tasks", sse(seen, *STREAM_FRAMES, newline=newline), ["POST"])
    async with serve(route) as url, client_for(url) as client:
        result = await create(client, on_progress=progress.append)
    assert result.done
    assert result.text == "Hello"
    assert result.sources == [Source("https://example.org/a", "Example")]
    assert result.files == [OutputFile("https://cdn.example/r.csv", "r.csv", "text/csv")]
    assert progress[-1] == result
    headers, body = seen[0]
    assert body == {
        "input": "Hello",
        "workerId": "wrk_1",
        "taskId": "tsk_1",
        "budget": "standard",
        "triggeredBy": "email",
        "stream": True,
    }
    assert headers["authorization"] == "Bearer hk_test"
    assert headers["accept"] == "text/event-stream"
    assert headers["user-agent"] == f"mailgate/{__version__}"


async def test_stream_ending_without_done_marker_is_not_done() -> None:
    """A stream that ends cleanly before the done marker returns what it got, with done=False."""
    frames = STREAM_FRAMES[:4]
    async with serve(("/api/tasks", sse([], *frames), ["POST"])) as url, client_for(url) as client:
        result = await create(client)
    assert (result.done, result.text) == (False, "Hello")


async def test_stream_cut_mid_body_returns_partial_result() -> None:
    """A connection dropped in the middle of an accepted stream is no error: done=False, partial text."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'data: {"type":"text-delta","delta":"partial"}\n\n'
    async with raw_server(head + b"%x\r\n%s\r\n" % (len(event), event)) as url, client_for(url) as client:
        result = await create(client)
    assert (result.done, result.text) == (False, "partial")


async def test_stream_stalling_after_acceptance_returns_partial_result() -> None:
    """A read timeout in the middle of an accepted stream is no error either: done=False."""
    release = asyncio.Event()

    async def stalls(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"type":"text-delta","delta":"thinking"}\n\n'
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await release.wait()

        return StreamingResponse(body(), media_type="text/event-stream")

    async with serve(("/api/tasks", stalls, ["POST"])) as url:
        try:
            async with client_for(url, timeout=0.3) as client:
                result = await create(client)
        finally:
            release.set()
    assert (result.done, result.text) == (False, "thinking")


async def test_stream_error_event_is_recorded() -> None:
    """An error event's text is kept in the result."""
    frames = ('data: {"type":"error","errorText":"worker crashed"}\n\n', "data: [DONE]\n\n")
    async with serve(("/api/tasks", sse([], *frames), ["POST"])) as url, client_for(url) as client:
        result = await create(client)
    assert (result.done, result.error) == (True, "worker crashed")


async def test_json_answer_is_the_blocking_form() -> None:
    """A server that ignores `stream` and answers the worker-run object gives a complete result."""
    async with (
        serve(("/api/tasks", answer([], lambda: JSONResponse(WORKER_RUN)), ["POST"])) as url,
        client_for(url) as client,
    ):
        result = await create(client)
    assert result == RunResult(
        text="The answer.",
        done=True,
        status="completed",
        url="https://handinger.com/tasks/tsk_1",
        sources=[Source("https://example.org/a", "Example")],
        files=[OutputFile("https://cdn.example/r.csv", "report.csv", "text/csv", 12)],
    )


async def test_progress_callback_failure_does_not_lose_the_turn() -> None:
    """A callback that raises is logged; the result still comes back."""

    def broken(_: RunResult) -> None:
        raise RuntimeError("bug in the caller")

    async with serve(("/api/tasks", sse([], *STREAM_FRAMES), ["POST"])) as url, client_for(url) as client:
        result = await create(client, on_progress=broken)
    assert result.done


async def test_refused_stream_is_retried_once_without_it_and_remembered() -> None:
    """400 naming `stream`: the same turn is posted again without it, and later calls never send it."""
    seen: Seen = []

    async def handler(request: Request) -> Response:
        body = await request.json()
        seen.append((dict(request.headers), body))
        if "stream" in body:
            return JSONResponse({"error": "Unrecognized key(s) in object: 'stream'"}, status_code=400)
        return JSONResponse(WORKER_RUN)

    async with serve(("/api/tasks", handler, ["POST"])) as url, client_for(url) as client:
        first = await create(client)
        second = await create(client, input="Again")
    assert first.done
    assert second.done
    assert ["stream" in body for _, body in seen] == [True, False, False]
    assert [headers["accept"] for headers, _ in seen] == [
        "text/event-stream",
        "application/json",
        "application/json",
    ]


async def test_a_refused_stream_is_asked_for_again_after_a_while(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After the retry time (an hour; none here) a stream is asked for again; the warning comes once."""
    monkeypatch.setattr(api_module, "STREAM_RETRY_AFTER", 0.0)
    seen: Seen = []

    async def handler(request: Request) -> Response:
        body = await request.json()
        seen.append((dict(request.headers), body))
        if "stream" in body:
            return JSONResponse({"error": "Unrecognized key(s) in object: 'stream'"}, status_code=400)
        return JSONResponse(WORKER_RUN)

    async with serve(("/api/tasks", handler, ["POST"])) as url, client_for(url) as client:
        for n in range(3):
            assert (await create(client, input=f"Turn {n}")).done
    assert ["stream" in body for _, body in seen] == [True, False] * 3
    assert [r.getMessage() for r in caplog.records].count(
        "api.stream_refused: the API does not stream; using the blocking form"
    ) == 1


async def test_optional_fields_can_be_switched_off() -> None:
    """send_triggered_by=False and stream=False leave those fields out."""
    seen: Seen = []
    async with (
        serve(("/api/tasks", answer(seen, lambda: JSONResponse(WORKER_RUN)), ["POST"])) as url,
        client_for(url, send_triggered_by=False, stream=False, api_key=None) as client,
    ):
        await create(client)
    headers, body = seen[0]
    assert set(body) == {"input", "workerId", "taskId", "budget"}
    assert "authorization" not in headers


def _in_a_minute() -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "retry_after", "maybe_sent"),
    [
        (401, {"error": "Invalid API key"}, {}, ApiUnauthorized, None, None),
        (429, {"error": "Slow down"}, {"Retry-After": "7"}, ApiUnavailable, 7.0, False),
        (
            429,
            {"error": "Slow down"},
            {"retry-after-ms": "1500", "Retry-After": "9"},
            ApiUnavailable,
            1.5,
            False,
        ),
        (429, {"error": "Slow down"}, {"Retry-After": "soon"}, ApiUnavailable, None, False),
        (409, {"error": "A turn is running"}, {}, ApiUnavailable, None, False),
        (503, {"error": "Maintenance"}, {"Retry-After": "3"}, ApiUnavailable, 3.0, True),
        (502, "<html>Bad gateway</html>", {}, ApiUnavailable, None, True),
    ],
)
async def test_transient_statuses(
    status: int,
    body: Any,
    headers: dict[str, str],
    kind: type[ApiUnavailable],
    retry_after: Any,
    maybe_sent: Any,
) -> None:
    """401, 429, 409 and 5xx are transient, with the server's Retry-After and whether anything was done."""

    def respond() -> Response:
        if isinstance(body, str):
            return Response(body, status_code=status, headers=headers, media_type="text/html")
        return JSONResponse(body, status_code=status, headers=headers)

    async with serve(("/api/tasks", answer([], respond), ["POST"])) as url, client_for(url) as client:
        with pytest.raises(kind) as caught:
            await create(client)
    assert type(caught.value) is kind
    assert caught.value.retry_after == retry_after
    if maybe_sent is not None:
        assert isinstance(caught.value, ApiUnavailable)
        assert caught.value.maybe_sent is maybe_sent


async def test_retry_after_http_date() -> None:
    """Retry-After as an HTTP-date becomes the seconds until then."""
    respond = lambda: JSONResponse({"error": "x"}, status_code=429, headers={"Retry-After": _in_a_minute()})  # noqa: E731
    async with serve(("/api/tasks", answer([], respond), ["POST"])) as url, client_for(url) as client:
        with pytest.raises(ApiUnavailable) as caught:
            await create(client)
    assert caught.value.retry_after is not None
    assert 50 <= caught.value.retry_after <= 61


@pytest.mark.parametrize(
    ("status", "respond", "reason"),
    [
        (400, lambda: JSONResponse({"error": "input must not be empty"}, 400), "input must not be empty"),
        (402, lambda: JSONResponse({"error": "Out of credits"}, 402), "Out of credits"),
        (
            403,
            lambda: JSONResponse({"message": "Task belongs to another worker"}, 403),
            "Task belongs to another worker",
        ),
        (404, lambda: JSONResponse({"error": {"message": "Unknown worker"}}, 404), "Unknown worker"),
        (422, lambda: PlainTextResponse("bad budget\nmore detail", 422), "bad budget"),
        (410, lambda: PlainTextResponse("Traceback (most recent call last):\n  File x", 410), "Gone"),
        (400, lambda: JSONResponse({"error": "x" * 1000}, 400), "x" * 297 + "..."),
    ],
)
async def test_rejections_carry_the_api_reason(
    status: int, respond: Callable[[], Response], reason: str
) -> None:
    """Other 4xx are permanent, with a short reason in the API's words and never a stack trace."""
    async with serve(("/api/tasks", answer([], respond), ["POST"])) as url, client_for(url) as client:
        with pytest.raises(ApiRejected) as caught:
            await create(client)
    assert (caught.value.status, caught.value.reason) == (status, reason)


async def test_read_timeout_may_have_been_sent() -> None:
    """A server that never answers: ApiUnavailable with maybe_sent=True (reconcile before a re-POST)."""
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await request.body()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await release.wait()
        return JSONResponse(WORKER_RUN)

    async with serve(("/api/tasks", slow, ["POST"])) as url:
        try:
            async with client_for(url, timeout=0.3) as client:
                with pytest.raises(ApiUnavailable) as caught:
                    await create(client)
        finally:
            release.set()
    assert caught.value.maybe_sent is True


async def test_connection_refused_was_not_sent() -> None:
    """Nothing listening: ApiUnavailable with maybe_sent=False."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with client_for(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(ApiUnavailable) as caught:
            await create(client)
    assert caught.value.maybe_sent is False


async def test_connection_dropped_before_an_answer_may_have_been_sent() -> None:
    """The server reads the request and hangs up: maybe_sent=True."""
    async with raw_server(b"") as url, client_for(url) as client:
        with pytest.raises(ApiUnavailable) as caught:
            await create(client)
    assert caught.value.maybe_sent is True


async def test_redirect_is_not_followed() -> None:
    """A redirect on the API is a configuration problem: transient, not sent, and not followed."""
    respond = lambda: RedirectResponse("https://elsewhere.example/api/tasks", status_code=308)  # noqa: E731
    async with serve(("/api/tasks", answer([], respond), ["POST"])) as url, client_for(url) as client:
        with pytest.raises(ApiUnavailable) as caught:
            await create(client)
    assert caught.value.maybe_sent is False
    assert "elsewhere.example" in str(caught.value)


TASK = {"id": "tsk_1", "workerId": "wrk_1", "status": "completed", "url": "https://handinger.com/t/tsk_1"}
TURNS = [
    {"id": "trn_b", "taskId": "tsk_1", "seq": 1, "status": "completed", "input": "More", "outputText": "Two",
     "files": [{"filename": None, "mediaType": "image/png", "url": "https://cdn.example/p.png"}]},
    {"id": "trn_a", "taskId": "tsk_1", "seq": 0, "status": "completed", "input": "Hello",
     "outputText": "One"},
]  # fmt: skip


@pytest.mark.parametrize("era", ["seed", "newest"])
async def test_get_task_in_both_eras(era: str) -> None:
    """{task, turns} and {task} + /turns give the same snapshot, turns sorted by seq."""
    seen: Seen = []
    if era == "seed":
        routes = [
            ("/api/tasks/{id}", answer(seen, lambda: JSONResponse({"task": TASK, "turns": TURNS})), ["GET"])
        ]
    else:
        routes = [
            ("/api/tasks/{id}", answer(seen, lambda: JSONResponse({"task": TASK})), ["GET"]),
            (
                "/api/tasks/{id}/turns",
                answer(seen, lambda: JSONResponse({"items": TURNS, "taskId": "tsk_1"})),
                ["GET"],
            ),
        ]
    async with serve(*routes) as url, client_for(url) as client:
        snapshot = await client.get_task("tsk_1")
    assert snapshot is not None
    assert (snapshot.task_id, snapshot.worker_id, snapshot.status, snapshot.finished) == (
        "tsk_1", "wrk_1", "completed", True
    )  # fmt: skip
    assert [(t.seq, t.input, t.output_text) for t in snapshot.turns] == [
        (0, "Hello", "One"),
        (1, "More", "Two"),
    ]
    assert snapshot.turns[1].files == (OutputFile("https://cdn.example/p.png", None, "image/png"),)
    assert all(headers["authorization"] == "Bearer hk_test" for headers, _ in seen)


async def test_get_task_totals_out_of_range_are_not_reported() -> None:
    """Totals that are infinite (`1e400`), negative or not numbers are None, not a crash."""
    task = TASK | {"totals": {"credits": -1, "durationMs": 1e400}}
    body = json.dumps({"task": task, "turns": TURNS}).replace("Infinity", "1e400")
    async with (
        serve(
            ("/api/tasks/{id}", answer([], lambda: Response(body, media_type="application/json")), ["GET"])
        ) as url,
        client_for(url) as client,
    ):
        snapshot = await client.get_task("tsk_1")
    assert snapshot is not None
    assert (snapshot.credits, snapshot.duration_ms) == (None, None)


async def test_get_task_unknown_is_none() -> None:
    """404 on GET /api/tasks/{id} means no such task: None."""
    async with (
        serve(
            ("/api/tasks/{id}", answer([], lambda: JSONResponse({"error": "Not found"}, 404)), ["GET"])
        ) as url,
        client_for(url) as client,
    ):
        assert await client.get_task("tsk_missing") is None


async def test_get_task_garbage_is_transient() -> None:
    """A 200 that is not a JSON object (a proxy page) is transient, not a crash."""
    async with (
        serve(("/api/tasks/{id}", answer([], lambda: PlainTextResponse("<html>")), ["GET"])) as url,
        client_for(url) as client,
    ):
        with pytest.raises(ApiUnavailable):
            await client.get_task("tsk_1")


async def test_delete_task_archives() -> None:
    """DELETE answers {archived}; an unknown task is False."""
    seen: Seen = []
    async with (
        serve(("/api/tasks/{id}", answer(seen, lambda: JSONResponse({"archived": True})), ["DELETE"])) as url,
        client_for(url) as client,
    ):
        assert await client.delete_task("tsk_1") is True
    async with (
        serve(("/api/tasks/{id}", answer([], lambda: JSONResponse({"error": "no"}, 404)), ["DELETE"])) as url,
        client_for(url) as client,
    ):
        assert await client.delete_task("tsk_1") is False
    assert len(seen) == 1


async def test_worker_run_recovers_sources_and_files() -> None:
    """GET /api/workers/{id}?taskId= parses the worker-run object; 404 is None."""
    seen: Seen = []
    async with (
        serve(("/api/workers/wrk_1", answer(seen, lambda: JSONResponse(WORKER_RUN)), ["GET"])) as url,
        client_for(url) as client,
    ):
        run = await client.worker_run("wrk_1", "tsk_1")
        assert await client.worker_run("wrk_2", "tsk_1") is None
    assert run is not None
    assert run.done
    assert run.sources == [Source("https://example.org/a", "Example")]
    assert seen[0][0]["query"] == "taskId=tsk_1"


def _open_files_under(directory: Path) -> list[str]:
    """The paths under `directory` this process still has open (Linux /proc)."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [p for p in paths if p.startswith(str(directory))]


@pytest.mark.parametrize("field", ["files", "files[]"])
async def test_multipart_upload(tmp_path: Path, field: str) -> None:
    """Files go as multipart parts named `files_field`, byte for byte, with the fields as strings."""
    small = tmp_path / "notes.txt"
    small.write_bytes(b"some notes\n")
    big = tmp_path / "scan.bin"
    big.write_bytes(os.urandom(1024) * (12 * 1024))
    uploads = [
        UploadFile(p.name, ctype, p, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p, ctype in ((small, "text/plain"), (big, "application/octet-stream"))
    ]
    received: dict[str, Any] = {}

    async def handler(request: Request) -> Response:
        async with request.form(max_part_size=1024 * 1024) as form:
            received["fields"] = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            received["files"] = [
                (key, v.filename, v.content_type, hashlib.sha256(await v.read()).hexdigest())
                for key, v in form.multi_items()
                if not isinstance(v, str)
            ]
        return JSONResponse(WORKER_RUN)

    async with serve(("/api/tasks", handler, ["POST"])) as url, client_for(url, files_field=field) as client:
        result = await create(client, files=uploads)
        assert _open_files_under(tmp_path) == []
    assert result.done
    assert received["fields"] == {
        "input": "Hello", "workerId": "wrk_1", "taskId": "tsk_1", "budget": "standard",
        "triggeredBy": "email", "stream": "true",
    }  # fmt: skip
    assert received["files"] == [(field, u.filename, u.content_type, u.sha256) for u in uploads]


async def test_download_sends_the_key_only_to_the_api_origin() -> None:
    """The key goes to the API's own origin (also after a redirect within it), never to a listed host."""
    seen_api: Seen = []
    seen_cdn: Seen = []
    async with serve(("/f/{name}", answer(seen_cdn, lambda: PlainTextResponse("cdn bytes")), ["GET"])) as cdn:
        routes = [
            ("/files/own", answer(seen_api, lambda: Response(b"own bytes", media_type="image/png")), ["GET"]),
            ("/files/hop", answer(seen_api, lambda: RedirectResponse("/files/own", 302)), ["GET"]),
        ]
        listed = [OutputHost("127.0.0.1", int(cdn.rpartition(":")[2]))]
        async with (
            serve(*routes) as api,
            client_for(api, output_hosts=listed, private_origins=[cdn]) as client,
        ):
            assert await client.download("/files/own", max_bytes=100) == (b"own bytes", "image/png")
            assert await client.download(f"{api}/files/own", max_bytes=100) == (b"own bytes", "image/png")
            assert await client.download(f"{api}/files/hop", max_bytes=100) == (b"own bytes", "image/png")
            data, ctype = await client.download(f"{cdn}/f/direct", max_bytes=100)
            assert (data, ctype) == (b"cdn bytes", "text/plain; charset=utf-8")
    assert [headers.get("authorization") for headers, _ in seen_api] == ["Bearer hk_test"] * 4
    assert [headers.get("authorization") for headers, _ in seen_cdn] == [None]


async def test_download_aborts_past_max_bytes() -> None:
    """A declared or streamed size past max_bytes raises TooLarge without reading everything."""

    async def chunked(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"x" * 1024

        return StreamingResponse(body(), media_type="application/octet-stream")

    routes = [
        ("/declared", answer([], lambda: Response(b"y" * 5000)), ["GET"]),
        ("/chunked", chunked, ["GET"]),
        ("/gone", answer([], lambda: JSONResponse({"error": "expired"}, 404)), ["GET"]),
    ]
    async with serve(*routes) as url, client_for(url) as client:
        with pytest.raises(TooLarge) as declared:
            await client.download("/declared", max_bytes=4096)
        with pytest.raises(TooLarge) as streamed:
            await client.download("/chunked", max_bytes=4096)
        with pytest.raises(ApiRejected) as gone:
            await client.download("/gone", max_bytes=4096)
        with pytest.raises(DownloadRefused):
            await client.download("file:///etc/passwd", max_bytes=4096)
        assert await client.download("/declared", max_bytes=5000) == (b"y" * 5000, None)
    assert declared.value.size == 5000
    assert 4096 < streamed.value.size < 100 * 1024
    assert (gone.value.status, gone.value.reason) == (404, "expired")
