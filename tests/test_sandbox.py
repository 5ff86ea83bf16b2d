"""The sandbox API, driven by the official `handinger` SDK and by raw httpx (SSE, multipart, limits)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator

import handinger
import httpx
import pytest
from handinger.types import DeleteTaskResponse, Task, TaskWithTurns, Worker
from handinger.types.task_with_turns import Turn
from httpx_sse import aconnect_sse

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox

pytestmark = pytest.mark.anyio

KEY = "sk_sandbox_test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MiB = 1024 * 1024


@pytest.fixture
async def sb() -> AsyncIterator[RunningSandbox]:
    async with run_sandbox(SandboxOptions(api_key=KEY)) as running:
        yield running


@pytest.fixture
async def http(sb: RunningSandbox) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sb.url, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
async def sdk(sb: RunningSandbox) -> AsyncIterator[handinger.AsyncHandinger]:
    client = handinger.AsyncHandinger(
        base_url=sb.url, api_key=KEY, max_retries=0, _strict_response_validation=True
    )
    async with client:
        yield client


async def sse_events(client: httpx.AsyncClient, body: dict[str, object]) -> list[str]:
    async with aconnect_sse(client, "POST", "/api/tasks", json=body) as source:
        return [event.data async for event in source.aiter_sse()]


async def test_sdk_create_retrieve_delete(sb: RunningSandbox, sdk: handinger.AsyncHandinger) -> None:
    """The SDK parses create, retrieve and delete replies; a follow-up adds turn 1."""
    run = await sdk.tasks.create(input="Hello\nthere", worker_id="wrk_a", task_id="tsk_1", budget="high")
    assert isinstance(run, Worker)
    assert run.status == "completed"
    assert not run.running
    assert run.id != "tsk_1"
    assert run.output_text.startswith("Echo from the sandbox (turn 1 of task tsk_1).\n\n> Hello\n> there\n")
    assert run.output[0].content[0].text == run.output_text
    assert run.sources[0].url == "https://example.com/sandbox/source"
    assert run.files[0].url == f"{sb.url}/files/tsk_1/0/echo.txt"
    assert run.files[0].media_type == "text/plain"
    assert run.url == f"{sb.url}/dashboard/tasks/tsk_1"
    again = await sdk.tasks.create(input="More", task_id="tsk_1")
    assert "(turn 2 of task tsk_1)" in again.output_text
    got = await sdk.tasks.retrieve("tsk_1")
    assert isinstance(got, TaskWithTurns)
    assert (got.task.status, got.task.title, got.task.worker_id, got.task.triggered_by) == (
        "completed", "Hello", "wrk_a", "api",
    )  # fmt: skip
    assert got.task.totals.turn_count == 2
    assert [(t.seq, t.status, t.input) for t in got.turns] == [
        (0, "completed", "Hello\nthere"),
        (1, "completed", "More"),
    ]
    assert got.turns[1].output_text == again.output_text
    deleted = await sdk.tasks.delete("tsk_1")
    assert isinstance(deleted, DeleteTaskResponse)
    assert deleted.archived
    assert (await sdk.tasks.retrieve("tsk_1")).task.id == "tsk_1"
    assert [(r.task_id, r.seq, r.budget, r.worker_id) for r in sb.state.requests] == [
        ("tsk_1", 0, "high", "wrk_a"),
        ("tsk_1", 1, "standard", None),
    ]


async def test_new_task_gets_an_id_and_worker_endpoint(sdk: handinger.AsyncHandinger) -> None:
    """Without a taskId the sandbox names the task; GET /api/workers/{id} returns its last run."""
    first = await sdk.tasks.create(input="one", worker_id="wrk_w")
    await sdk.tasks.create(input="two", worker_id="wrk_w", task_id="tsk_two")
    latest = await sdk.workers.retrieve("wrk_w")
    assert "task tsk_two" in latest.output_text
    chosen = await sdk.workers.retrieve("wrk_w", extra_query={"taskId": first.url.rsplit("/", 1)[1]})
    assert chosen.output_text == first.output_text
    assert chosen.output_text.startswith("Echo")


@pytest.mark.parametrize("field", ["files", "files[]"])
async def test_multipart_files_are_described(sb: RunningSandbox, http: httpx.AsyncClient, field: str) -> None:
    """Both part names are accepted and recorded; the answer lists each file's size and sha256."""
    blobs = [
        ("a.txt", b"alpha\n", "text/plain"),
        ("b.bin", bytes(range(256)) * 9, "application/octet-stream"),
    ]
    response = await http.post(
        "/api/tasks",
        data={"input": "see files", "workerId": "wrk_f", "taskId": "tsk_f", "triggeredBy": "email"},
        files=[(field, blob) for blob in blobs],
    )
    assert response.status_code == 200, response.text
    run = Worker.model_validate(response.json())
    for name, data, _ in blobs:
        assert f"- {name} — {len(data)} bytes — sha256 {hashlib.sha256(data).hexdigest()}" in run.output_text
    (record,) = sb.state.requests
    assert (record.multipart, record.files_field, record.triggered_by) == (True, field, "email")
    assert [(f.filename, f.content_type, f.size) for f in record.files] == [
        (n, t, len(d)) for n, d, t in blobs
    ]
    assert sb.state.tasks["tsk_f"].triggered_by == "email"


@pytest.mark.parametrize(
    ("sizes", "status", "words"),
    [
        ([1] * 6, 400, "at most 5"),
        ([11 * MiB], 413, "at most 10 MiB"),
        ([8 * MiB, 8 * MiB, 8 * MiB, 7 * MiB], 413, "30 MiB"),
        ([10 * MiB], 200, "Echo"),
    ],
    ids=["six-files", "11MiB-file", "31MiB-total", "10MiB-ok"],
)
async def test_file_limits(
    sb: RunningSandbox, http: httpx.AsyncClient, sizes: list[int], status: int, words: str
) -> None:
    """At most 5 files, 10 MiB each, 30 MiB together; a refused upload records nothing."""
    files = [
        ("files", (f"f{i}.bin", b"x" * size, "application/octet-stream")) for i, size in enumerate(sizes)
    ]
    response = await http.post("/api/tasks", data={"input": "big", "workerId": "wrk_l"}, files=files)
    assert response.status_code == status
    assert words in (response.json().get("error") or response.json()["output_text"])
    assert len(sb.state.requests) == (status == 200)


async def test_stream_events_in_order(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """A streamed turn sends start, text deltas, a source, a file, finish, then [DONE]."""
    data = await sse_events(
        http, {"input": "stream me", "workerId": "wrk_s", "taskId": "tsk_s", "stream": True}
    )
    assert data[-1] == "[DONE]"
    events = [json.loads(item) for item in data[:-1]]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start"
    assert kinds[-1] == "finish"
    assert kinds.index("source-url") < kinds.index("file") < kinds.index("finish")
    deltas = [e["delta"] for e in events if e["type"] == "text-delta"]
    assert len(deltas) > 1
    assert "".join(deltas) == sb.state.turns_of("tsk_s")[0].output_text
    file_event = next(e for e in events if e["type"] == "file")
    assert file_event == {
        "type": "file",
        "url": f"{sb.url}/files/tsk_s/0/echo.txt",
        "mediaType": "text/plain",
    }
    assert sb.state.requests[0].stream


async def test_heartbeat_comments_while_slow() -> None:
    """A quiet stream carries `: ping` comment lines; the turn's fields are final before `finish`."""
    async with (
        run_sandbox(SandboxOptions(heartbeat_seconds=0.05)) as sb,
        httpx.AsyncClient(base_url=sb.url) as http,
        http.stream(
            "POST", "/api/tasks", json={"input": "[sandbox:slow=0.4]", "workerId": "wrk_h", "stream": True}
        ) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in r.aiter_lines()]
    assert ": ping" in lines
    assert lines[-2:] == ["data: [DONE]", ""]
    (turn,) = next(iter(sb.state.tasks.values())).turns
    assert turn.duration_ms >= 400
    assert turn.status == "completed"


async def test_file_endpoint_needs_the_key(sdk: handinger.AsyncHandinger, http: httpx.AsyncClient) -> None:
    """GET /files/... serves echo.txt (the answer) with the key, 401 without it."""
    run = await sdk.tasks.create(input="file please", worker_id="wrk_x")
    response = await http.get(run.files[0].url)
    assert response.status_code == 200
    assert response.text == run.output_text
    assert response.headers["content-type"].startswith("text/plain")
    async with httpx.AsyncClient() as anonymous:
        assert (await anonymous.get(run.files[0].url)).status_code == 401


@pytest.mark.parametrize("header", [None, "Bearer wrong", KEY])
async def test_401_without_the_right_key(sb: RunningSandbox, header: str | None) -> None:
    """A missing or wrong bearer key is 401 with an error body; nothing is recorded."""
    headers = {"Authorization": header} if header else {}
    async with httpx.AsyncClient(base_url=sb.url, headers=headers) as client:
        response = await client.post("/api/tasks", json={"input": "hi", "workerId": "wrk_1"})
        assert response.status_code == 401
        assert "key" in response.json()["error"]
        assert (await client.get("/_sandbox/requests")).json() == {"items": []}


async def test_403_409_404(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """Another worker's task is 403, a running task 409, unknown tasks and workers 404."""
    async with http.stream(
        "POST",
        "/api/tasks",
        json={"input": "[sandbox:slow=0.5]", "workerId": "wrk_a", "taskId": "tsk_r", "stream": True},
    ) as streaming:
        busy = await http.post("/api/tasks", json={"input": "next", "taskId": "tsk_r"})
        assert busy.status_code == 409
        assert "running" in busy.json()["error"]
        other = await http.post("/api/tasks", json={"input": "mine", "workerId": "wrk_b", "taskId": "tsk_r"})
        assert other.status_code == 403
        assert other.json()["error"] == "task tsk_r belongs to another worker"
        await streaming.aread()
    assert (await http.get("/api/tasks/tsk_nope")).json() == {"error": "task not found"}
    assert (await http.get("/api/tasks/tsk_nope")).status_code == 404
    assert (await http.delete("/api/tasks/tsk_nope")).status_code == 404
    unknown = await http.post("/api/tasks", json={"input": "x", "workerId": "agent_1"})
    assert unknown.status_code == 404
    assert "agent_1" in unknown.json()["error"]
    assert len(sb.state.requests) == 1


async def test_worker_allowlist() -> None:
    """With `workers` set, only those ids exist."""
    async with (
        run_sandbox(SandboxOptions(workers=frozenset({"wrk_ok"}))) as sb,
        httpx.AsyncClient(base_url=sb.url) as http,
    ):
        assert (
            await http.post("/api/tasks", json={"input": "x", "workerId": "wrk_other"})
        ).status_code == 404
        assert (await http.post("/api/tasks", json={"input": "x", "workerId": "wrk_ok"})).status_code == 200
        assert (await http.get("/api/workers/wrk_other")).status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"workerId": "wrk_1"}, 400, "input is required"),
        ({"input": "  ", "workerId": "wrk_1"}, 400, "input is required"),
        ({"input": 5, "workerId": "wrk_1"}, 400, "input is required"),
        ({"input": "x", "workerId": "wrk_1", "budget": "huge"}, 422, "budget"),
        ({"input": "x"}, 400, "workerId"),
        ({"input": "x", "taskId": "tsk_new"}, 400, "workerId"),
        ({"input": "x", "workerId": "wrk_1", "stream": "yes"}, 400, "stream"),
        ({"input": "x", "workerId": "wrk_1", "taskId": "t" * 101}, 400, "taskId"),
        ({"input": "x", "workerId": "wrk_1", "triggeredBy": "fax"}, 422, "triggeredBy"),
        ({"input": "[sandbox:status=abc]", "workerId": "wrk_1"}, 400, "sandbox directive"),
        ([1, 2], 400, "JSON object"),
    ],
)
async def test_validation(
    sb: RunningSandbox, http: httpx.AsyncClient, body: object, status: int, words: str
) -> None:
    """Bad requests get 400/422 with a reason, and create nothing."""
    response = await http.post("/api/tasks", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert sb.state.requests == []
    assert sb.state.tasks == {}


async def test_bad_content(http: httpx.AsyncClient) -> None:
    """Invalid JSON and unknown content types are 400 with an error body."""
    bad_json = await http.post("/api/tasks", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400
    assert "JSON" in bad_json.json()["error"]
    text = await http.post("/api/tasks", content=b"hi", headers={"content-type": "text/plain"})
    assert text.status_code == 400
    assert "multipart" in text.json()["error"]
    assert (await http.get("/nowhere")).json() == {"error": "Not Found"}


@pytest.mark.parametrize(
    ("directive", "statuses", "headers"),
    [
        ("[sandbox:status=402]", [402, 402, 402], {}),
        ("[sandbox:status=429 retry-after=2]", [429, 429], {"retry-after": "2", "retry-after-ms": "2000"}),
        ("[sandbox:status=503 times=2]", [503, 503, 200, 200], {}),
    ],
)
async def test_status_directives(
    sb: RunningSandbox, http: httpx.AsyncClient, directive: str, statuses: list[int], headers: dict[str, str]
) -> None:
    """`status=` fails before anything is recorded; `times=N` lets the POSTs after the Nth through."""
    body = {"input": f"please {directive}", "workerId": "wrk_d", "taskId": "tsk_d"}
    seen = []
    for _ in statuses:
        response = await http.post("/api/tasks", json=body)
        seen.append(response.status_code)
        if response.status_code != 200:
            assert "sandbox directive" in response.json()["error"]
            assert {k: response.headers.get(k) for k in headers} == headers
        assert len(sb.state.requests) == seen.count(200)
    assert seen == statuses


async def test_cut_stream_still_completes(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """`[sandbox:cut]` drops the connection mid-body; the turn completes server-side anyway."""
    body = {
        "input": "[sandbox:cut] [sandbox:slow=0.2]",
        "workerId": "wrk_c",
        "taskId": "tsk_c",
        "stream": True,
    }
    data: list[str] = []

    async def read() -> None:
        async with aconnect_sse(http, "POST", "/api/tasks", json=body) as source:
            async for event in source.aiter_sse():
                data.append(event.data)

    with pytest.raises(httpx.RemoteProtocolError):
        await read()
    kinds = [json.loads(item)["type"] for item in data]
    assert kinds.count("text-delta") == 2
    assert "finish" not in kinds
    await sb.state.wait_idle()
    got = TaskWithTurns.model_validate((await http.get("/api/tasks/tsk_c")).json())
    assert got.task.status == "completed"
    assert got.turns[0].output_text.startswith("Echo")


async def test_client_dropping_stream_or_wait_does_not_stop_the_turn(
    sb: RunningSandbox, http: httpx.AsyncClient
) -> None:
    """A client that leaves mid-stream or mid-wait leaves a turn that still completes and is recorded."""
    body = {"input": "[sandbox:slow=0.3]", "workerId": "wrk_q", "taskId": "tsk_q", "stream": True}
    async with aconnect_sse(http, "POST", "/api/tasks", json=body) as source:
        async for event in source.aiter_sse():
            assert json.loads(event.data)["type"] == "start"
            break
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/api/tasks", json={**body, "taskId": "tsk_q2", "stream": False}, timeout=0.1)
    assert [t.status for t in sb.state.turns_of("tsk_q") + sb.state.turns_of("tsk_q2")] == ["running"] * 2
    await sb.state.wait_idle()
    assert [t.status for t in sb.state.turns_of("tsk_q") + sb.state.turns_of("tsk_q2")] == ["completed"] * 2
    assert [r.task_id for r in sb.state.requests] == ["tsk_q", "tsk_q2"]


async def test_error_directive(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """`[sandbox:error]` ends the turn in error: 500 when blocking, an error event when streamed."""
    blocking = await http.post(
        "/api/tasks", json={"input": "[sandbox:error]", "workerId": "wrk_e", "taskId": "tsk_e"}
    )
    assert blocking.status_code == 500
    assert "sandbox:error" in blocking.json()["error"]
    task = Task.model_validate((await http.get("/api/tasks/tsk_e")).json()["task"])
    assert task.status == "error"
    assert task.completed_at is not None
    data = await sse_events(http, {"input": "[sandbox:error]", "taskId": "tsk_e", "stream": True})
    assert [json.loads(d)["type"] for d in data[:-1]][-1] == "error"
    assert data[-1] == "[DONE]"
    assert [t.status for t in sb.state.turns_of("tsk_e")] == ["error", "error"]


async def test_json_directive_answers_json_to_a_stream_request(http: httpx.AsyncClient) -> None:
    """`[sandbox:json]` answers the blocking JSON body even when a stream was asked for."""
    body = {"input": "[sandbox:json]", "workerId": "wrk_j", "stream": True}
    response = await http.post("/api/tasks", json=body, headers={"accept": "text/event-stream"})
    assert response.headers["content-type"] == "application/json"
    assert Worker.model_validate(response.json()).status == "completed"


async def test_global_faults_in_process_and_over_http(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """Queued faults fail the next matching requests, then requests pass; /_sandbox lists requests."""
    sb.state.faults.push(status=503, times=2)
    body = {"input": "hi", "workerId": "wrk_g", "taskId": "tsk_g"}
    assert [(await http.post("/api/tasks", json=body)).status_code for _ in range(3)] == [503, 503, 200]
    pushed = await http.post(
        "/_sandbox/faults", json={"status": 429, "times": 1, "retryAfter": 1.5, "path": "GET /api/*"}
    )
    assert pushed.status_code == 201
    assert pushed.json()["pending"] == 1
    limited = await http.get("/api/tasks/tsk_g")
    assert limited.status_code == 429
    assert (limited.headers["retry-after"], limited.headers["retry-after-ms"]) == ("2", "1500")
    assert (await http.get("/api/tasks/tsk_g")).status_code == 200
    assert (await http.post("/_sandbox/faults", json={"status": 200})).status_code == 400
    items = (await http.get("/_sandbox/requests")).json()["items"]
    assert [(i["task_id"], i["seq"], i["multipart"], i["files"]) for i in items] == [("tsk_g", 0, False, [])]


async def test_new_era_shapes() -> None:
    """New era: `stream` is refused, GET returns {task}, turns (with files) come from /turns."""
    async with (
        run_sandbox(SandboxOptions(era="new")) as sb,
        httpx.AsyncClient(base_url=sb.url) as http,
    ):
        refused = await http.post("/api/tasks", json={"input": "x", "workerId": "wrk_n", "stream": True})
        assert refused.status_code == 400
        assert "stream" in refused.json()["error"]
        body = {"input": "x", "workerId": "wrk_n", "taskId": "tsk_n"}
        accepted = await http.post("/api/tasks", json=body, headers={"accept": "text/event-stream"})
        assert Worker.model_validate(accepted.json()).status == "completed"
        got = (await http.get("/api/tasks/tsk_n")).json()
        assert list(got) == ["task"]
        assert Task.model_validate(got["task"]).totals.turn_count == 1
        turns = (await http.get("/api/tasks/tsk_n/turns")).json()
        assert turns["taskId"] == "tsk_n"
        assert Turn.model_validate(turns["items"][0]).output_text.startswith("Echo")
        assert turns["items"][0]["files"][0]["filename"] == "echo.txt"
        assert len(sb.state.requests) == 1


async def test_seed_era_has_no_turns_endpoint(sdk: handinger.AsyncHandinger, http: httpx.AsyncClient) -> None:
    """In the seed era the turns come inside GET /api/tasks/{id}; /turns is 404."""
    await sdk.tasks.create(input="x", worker_id="wrk_1", task_id="tsk_seed")
    assert (await http.get("/api/tasks/tsk_seed/turns")).status_code == 404


async def test_archived_task_refuses_new_turns(
    sdk: handinger.AsyncHandinger, http: httpx.AsyncClient
) -> None:
    """After DELETE the task is still readable (marked archived) but takes no new turn."""
    await sdk.tasks.create(input="x", worker_id="wrk_1", task_id="tsk_arch")
    await sdk.tasks.delete("tsk_arch")
    assert (await http.get("/api/tasks/tsk_arch")).json()["task"]["archived"] is True
    response = await http.post("/api/tasks", json={"input": "y", "taskId": "tsk_arch"})
    assert response.status_code == 404
    assert "archived" in response.json()["error"]


async def test_leaving_aborts_running_turns() -> None:
    """Leaving run_sandbox cancels a running turn (status aborted) promptly, without leftovers."""
    async with run_sandbox() as sb:
        async with (
            httpx.AsyncClient(base_url=sb.url) as http,
            http.stream(
                "POST", "/api/tasks", json={"input": "[sandbox:slow=30]", "workerId": "wrk_z", "stream": True}
            ),
        ):
            pass
        started = time.monotonic()
    assert time.monotonic() - started < 3
    (task,) = sb.state.tasks.values()
    assert task.status == "aborted"
    assert task.turns[0].completed_at is not None
