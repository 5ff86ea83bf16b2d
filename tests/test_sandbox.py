"""The sandbox API, driven by the official `handinger` SDK and by raw httpx (SSE, multipart, limits)."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import zlib
from collections.abc import AsyncIterator
from html.parser import HTMLParser

import handinger
import httpx
import pytest
from handinger.types import DeleteTaskResponse, Task, TaskWithTurns, Worker
from handinger.types.task_with_turns import Turn
from httpx_sse import aconnect_sse

from mailgate.sandbox import RunningSandbox, SandboxOptions, long_answer, run_sandbox, served_file_bytes

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
        ({"input": "[sandbox:name=a.txt]", "workerId": "wrk_1"}, 400, "'name=a.txt'"),
        ({"input": "[sandbox:answer-bytes=-1]", "workerId": "wrk_1"}, 400, "answer-bytes"),
        ({"input": "[sandbox:answer-bytes=999999999999]", "workerId": "wrk_1"}, 400, "answer-bytes"),
        ({"input": "[sandbox:file-url=]", "workerId": "wrk_1"}, 400, "file-url"),
        ({"input": "[sandbox:file-bytes=1 size=-1]", "workerId": "wrk_1"}, 400, "size"),
        ({"input": "[sandbox:file-bytes=1 name=echo.txt]", "workerId": "wrk_1"}, 400, "echo.txt"),
        ({"input": "[sandbox:file-bytes=1 name=a%2Fb]", "workerId": "wrk_1"}, 400, "'a/b'"),
        ({"input": "[sandbox:file-bytes=1 name=x file-bytes=2 name=x]", "workerId": "wrk_1"}, 400, "unique"),
        ({"input": "[sandbox:credits=-1]", "workerId": "wrk_1"}, 400, "credits"),
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


# --- switches for load, output-file and usage tests ------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 300_001, 3 * MiB + 7])
async def test_answer_bytes_is_exactly_that_long(
    sb: RunningSandbox, sdk: handinger.AsyncHandinger, http: httpx.AsyncClient, size: int
) -> None:
    """`answer-bytes=N` answers exactly N bytes (UTF-8), the same text in the run, the turn and echo.txt."""
    run = await sdk.tasks.create(
        input=f"big [sandbox:answer-bytes={size}]", worker_id="wrk_b", task_id="tsk_b"
    )
    assert len(run.output_text.encode()) == size
    assert run.output_text == long_answer("tsk_b", 0, size)
    assert run.output[0].content[0].text == run.output_text
    (turn,) = (await sdk.tasks.retrieve("tsk_b")).turns
    assert turn.output_text == run.output_text
    assert turn.output_tokens == (max(1, len(turn.output_text) // 4) if size else 0)
    echo = await http.get(run.files[0].url)
    assert echo.content == run.output_text.encode()
    assert sb.state.tasks["tsk_b"].turns[0].files[0]["size"] == size


async def test_long_answer_reads_like_varied_markdown() -> None:
    """The generated answer has headings, lists, a table, code, quotes, links and non-ASCII text."""
    text = long_answer("tsk_md", 0, 200_000)
    assert text.startswith("# Sandbox answer of 200000 bytes (turn 1 of tsk_md)\n\n## 1. ")
    for mark in ("\n## ", "\n### ", "\n- **", "\n1. Step", "\n   - ", "|---|---:|", "```python\n", "```sh\n",
                 "\n> ", "](https://example.com/", "\n- [x] ", "\n---\n", "°C", "×", "«"):  # fmt: skip
        assert mark in text, mark
    paragraphs = [p for p in text.split("\n\n") if len(p) > 20]
    assert len(set(paragraphs)) > 0.9 * len(paragraphs)
    assert long_answer("tsk_md", 0, 200_000) == text
    assert long_answer("tsk_md", 1, 200_000) != text


async def test_long_answer_streams_in_large_deltas(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """A 10 MiB answer streams as 64 KiB deltas (160 events, not one per word) that add up to it."""
    size = 10 * MiB
    body = {
        "input": f"[sandbox:answer-bytes={size}]",
        "workerId": "wrk_s",
        "taskId": "tsk_m",
        "stream": True,
    }
    data = await sse_events(http, body)
    assert data[-1] == "[DONE]"
    deltas = [e["delta"] for e in map(json.loads, data[:-1]) if e["type"] == "text-delta"]
    assert 150 <= len(deltas) <= 170
    assert max(len(d) for d in deltas) <= 64 * 1024
    assert "".join(deltas) == sb.state.turns_of("tsk_m")[0].output_text
    assert len("".join(deltas).encode()) == size


async def test_long_texts_keep_every_character(sb: RunningSandbox, sdk: handinger.AsyncHandinger) -> None:
    """Inputs and answers over 256 KiB (encoded in slices) keep quotes, backslashes and controls."""
    text = 'q"\\\x01\té—😀 [x]\n' * 30_000
    run = await sdk.tasks.create(input=text, worker_id="wrk_t", task_id="tsk_t")
    got = await sdk.tasks.retrieve("tsk_t")
    assert got.turns[0].input == text
    assert got.turns[0].output_text == run.output_text == sb.state.turns_of("tsk_t")[0].output_text
    assert '> q"\\\x01\té—😀 [x]' in run.output_text
    assert (await sdk.workers.retrieve("wrk_t")).output_text == run.output_text


async def test_file_url_outputs_appear_everywhere(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """`file-url` files keep their exact URL (IPv6 brackets, query) in the run, the stream and the turn."""
    redirect = f"{sb.url}/files/redirect?to=http://10.0.0.1/secret&status=307"
    text = (
        "[sandbox:file-url=http://127.0.0.1:18999/x.bin] "
        "[sandbox:file-url=http://[::1]:9/y name=a%20b.pdf size=5 type=application/x-thing] "
        f"[sandbox:no-echo-file file-url={redirect} name=r.txt]"
    )
    expected = [
        {"filename": None, "mediaType": "application/octet-stream", "url": "http://127.0.0.1:18999/x.bin"},
        {"filename": "a b.pdf", "mediaType": "application/x-thing", "url": "http://[::1]:9/y", "size": 5},
        {"filename": "r.txt", "mediaType": "text/plain", "url": redirect},
    ]
    body = {"input": text, "workerId": "wrk_u", "taskId": "tsk_u"}
    run = Worker.model_validate((await http.post("/api/tasks", json=body)).json())
    assert [(f.filename, f.media_type, f.url) for f in run.files] == [
        (e["filename"], e["mediaType"], e["url"]) for e in expected
    ]
    assert (await http.get("/api/tasks/tsk_u")).json()["turns"][0]["files"] == expected
    data = await sse_events(http, {"input": text, "taskId": "tsk_u", "stream": True})
    files = [e for e in map(json.loads, data[:-1]) if e["type"] == "file"]
    assert files == [{"type": "file", "url": e["url"], "mediaType": e["mediaType"]} for e in expected]


async def test_file_bytes_are_served_with_their_length(
    sb: RunningSandbox, sdk: handinger.AsyncHandinger, http: httpx.AsyncClient
) -> None:
    """`file-bytes=N` serves N deterministic bytes at /files/...; `size=` may declare something else."""
    text = (
        "[sandbox:file-bytes=12000000 name=big.bin] [sandbox:file-bytes=300 size=7 file-bytes=10 name=r.pdf]"
    )
    run = await sdk.tasks.create(input=text, worker_id="wrk_f", task_id="tsk_fb")
    assert [(f.filename, f.media_type) for f in run.files] == [
        ("echo.txt", "text/plain"),
        ("big.bin", "application/octet-stream"),
        ("file-2.bin", "application/octet-stream"),
        ("r.pdf", "application/pdf"),
    ]
    assert run.files[1].url == f"{sb.url}/files/tsk_fb/0/big.bin"
    assert [f.get("size") for f in sb.state.turns_of("tsk_fb")[0].files][1:] == [12_000_000, 7, 10]
    big = await http.get(run.files[1].url)
    assert (big.status_code, big.headers["content-length"]) == (200, "12000000")
    assert big.content == served_file_bytes("big.bin", 12_000_000)
    assert len(zlib.compress(big.content[:MiB])) > 0.99 * MiB  # like real files, not a run of zeros
    liar = await http.get(run.files[2].url)
    assert (len(liar.content), liar.content) == (300, served_file_bytes("file-2.bin", 300))
    pdf = await http.get(run.files[3].url)
    assert (pdf.headers["content-type"], pdf.content) == ("application/pdf", served_file_bytes("r.pdf", 10))
    assert served_file_bytes("r.pdf", 10) != served_file_bytes("s.pdf", 10)
    assert (await http.get(f"{sb.url}/files/tsk_fb/0/other.bin")).status_code == 404
    async with httpx.AsyncClient() as anonymous:
        assert (await anonymous.get(run.files[1].url)).status_code == 401


async def test_redirect_endpoint(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """GET /files/redirect?to=URL answers 302 (or the status asked) to URL as given; it needs the key."""
    to = "http://127.0.0.1:18999/x.bin?a=1&b=%2F"
    response = await http.get("/files/redirect", params={"to": to})
    assert (response.status_code, response.headers["location"]) == (302, to)
    moved = await http.get("/files/redirect", params={"to": "/files/x", "status": "308"})
    assert (moved.status_code, moved.headers["location"]) == (308, "/files/x")
    assert (await http.get("/files/redirect")).status_code == 400
    assert (await http.get("/files/redirect", params={"to": to, "status": "200"})).status_code == 400
    run = Worker.model_validate(
        (await http.post("/api/tasks", json={"input": "hi", "workerId": "wrk_r"})).json()
    )
    followed = await http.get("/files/redirect", params={"to": run.files[0].url}, follow_redirects=True)
    assert followed.text == run.output_text
    async with httpx.AsyncClient(base_url=sb.url) as anonymous:
        assert (await anonymous.get("/files/redirect", params={"to": to})).status_code == 401


class _Page(HTMLParser):
    """The tags, links and text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.hrefs += [v or "" for k, v in attrs if k == "href"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


async def test_dashboard_page_escapes_attacker_text(sb: RunningSandbox, http: httpx.AsyncClient) -> None:
    """The task url answers a small HTML page without a key; inputs, answers and URLs are escaped."""
    hostile = '<script>alert(1)</script> "quoted" & <img src=x onerror=alert(2)>'
    text = f"{hostile}\n[sandbox:file-url=javascript:alert(3) name=<b>evil</b>.exe] [sandbox:credits=4]"
    run = Worker.model_validate(
        (await http.post("/api/tasks", json={"input": text, "workerId": "wrk_d", "taskId": "tsk_d"})).json()
    )
    async with httpx.AsyncClient() as browser:
        page = await browser.get(run.url)
        missing = await browser.get(f"{sb.url}/dashboard/tasks/tsk_<none>")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    parsed = _Page()
    parsed.feed(page.text)
    assert not {"script", "img", "b", "iframe"} & set(parsed.tags)
    assert parsed.hrefs == [run.files[0].url, "https://example.com/sandbox/source"]
    shown = "".join(parsed.text)
    assert hostile in shown
    assert "<b>evil</b>.exe" in shown
    assert "tsk_d" in shown
    assert "completed" in shown
    assert "4 credits" in shown
    assert missing.status_code == 404
    assert "<none>" not in missing.text
    assert "tsk_&lt;none&gt;" in missing.text


async def test_dashboard_page_cuts_long_answers(sdk: handinger.AsyncHandinger) -> None:
    """A 1 MiB answer gives a page of about 64 KiB that says how much it left out."""
    run = await sdk.tasks.create(input=f"[sandbox:answer-bytes={MiB}]", worker_id="wrk_l")
    async with httpx.AsyncClient() as browser:
        page = await browser.get(run.url)
    assert page.status_code == 200
    assert len(page.content) < 80_000
    assert f"[… {len(run.output_text) - 64 * 1024} more characters not shown]" in page.text
    assert "Sandbox answer of 1048576 bytes" in page.text


@pytest.mark.parametrize("era", ["seed", "new"])
async def test_usage_figures(era: str) -> None:
    """Task totals sum the turns' credits and durations; turns carry credits, duration and tokens."""
    async with (
        run_sandbox(SandboxOptions(era=era)) as sb,  # type: ignore[arg-type]
        httpx.AsyncClient(base_url=sb.url, timeout=10) as http,
    ):
        first = await http.post(
            "/api/tasks",
            json={"input": "one [sandbox:credits=3 slow=0.2]", "workerId": "wrk_u", "taskId": "tsk_use"},
        )
        usage = Worker.model_validate(first.json()).usage
        assert usage is not None
        assert usage.credits == 3
        assert usage.duration_ms is not None and usage.duration_ms >= 200
        await http.post("/api/tasks", json={"input": "two [sandbox:credits=5]", "taskId": "tsk_use"})
        await http.post("/api/tasks", json={"input": "three", "taskId": "tsk_use"})
        task = Task.model_validate((await http.get("/api/tasks/tsk_use")).json()["task"])
        raw = (
            (await http.get("/api/tasks/tsk_use/turns")).json()["items"]
            if era == "new"
            else ((await http.get("/api/tasks/tsk_use")).json()["turns"])
        )
    turns = [Turn.model_validate(t) for t in raw]
    assert [t.credits for t in turns] == [3, 5, 1]
    assert turns[0].duration_ms >= 200
    assert (task.totals.credits, task.totals.turn_count) == (9, 3)
    assert task.totals.duration_ms == sum(t.duration_ms for t in turns)
    assert all(t.input_tokens == len(t.input) // 4 for t in turns)
    assert all(t.output_tokens == len(t.output_text) // 4 > 0 for t in turns)


async def test_long_turn_heartbeats_throughout() -> None:
    """A turn of `turn_seconds` sends `: ping` while quiet, before and between its text deltas."""
    async with (
        run_sandbox(SandboxOptions(turn_seconds=1.2, heartbeat_seconds=0.1)) as sb,
        httpx.AsyncClient(base_url=sb.url) as http,
        http.stream("POST", "/api/tasks", json={"input": "slow", "workerId": "wrk_h", "stream": True}) as r,
    ):
        lines = [line async for line in r.aiter_lines() if line]
    kinds = [line if line == ": ping" else json.loads(line[6:])["type"] for line in lines[:-1]]
    deltas = [i for i, kind in enumerate(kinds) if kind == "text-delta"]
    assert len(deltas) == 4
    assert ": ping" in kinds[: deltas[0]]
    assert all(": ping" in kinds[a:b] for a, b in itertools.pairwise(deltas))
    (turn,) = next(iter(sb.state.tasks.values())).turns
    assert turn.duration_ms >= 1200
