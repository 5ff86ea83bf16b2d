"""The sandbox's in-memory store: options, recorded requests, faults, tasks and their turns.

A turn runs as its own asyncio task, independent of the HTTP request that created it: a client that
drops the connection does not stop it (the real API behaves the same way, and mailgate's crash
recovery depends on it). `SandboxState.aclose()` cancels and awaits every running turn; a cancelled
turn ends with status `aborted`.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Literal
from urllib.parse import quote

from mailgate.sandbox._agent import CHUNKS, Directives, FileInfo, count_tokens, deltas, echo_answer
from mailgate.sandbox._bulk import long_answer

Event = dict[str, object]


@dataclass
class SandboxOptions:
    """How the sandbox behaves. See docs/sandbox.md for what each option changes on the wire."""

    api_key: str | None = None  # set: every /api and /files request needs `Authorization: Bearer <key>`
    workers: frozenset[str] | None = None  # None: any id starting "wrk_" exists
    era: Literal["seed", "new"] = "seed"
    turn_seconds: float = 0.0  # how long each echo turn works
    heartbeat_seconds: float = 15.0  # `: ping` comment interval on a quiet stream


@dataclass(frozen=True)
class RecordedFile:
    """A file part as received: never kept, only described."""

    filename: str
    content_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RecordedRequest:
    """One POST /api/tasks that passed validation and created turn `seq` of `task_id`."""

    task_id: str
    worker_id: str | None  # as sent; None when the request named only a task
    input: str
    budget: str
    triggered_by: str | None
    stream: bool  # asked for a stream: `stream: true` or `Accept: text/event-stream`
    multipart: bool
    files_field: str | None  # "files" or "files[]"; None without files
    files: list[RecordedFile]
    seq: int


@dataclass
class Fault:
    """A failure answered to the next `times` requests matching `path` ("METHOD /glob")."""

    status: int
    times: int
    retry_after: float | None
    path: str


class FaultQueue:
    """Global failures for requests whose input the test does not control. First match wins."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def push(
        self,
        status: int = 503,
        times: int = 1,
        retry_after: float | None = None,
        path: str = "POST /api/tasks",
    ) -> Fault:
        """Fail the next `times` requests matching `path`, e.g. "POST /api/tasks" or "GET /api/tasks/*".

        `path` is a METHOD and an fnmatch pattern over the URL path ("*" matches any method).
        Raises `ValueError` for a status outside 400..599 or `times` < 1.
        """
        if not 400 <= status <= 599 or times < 1:
            raise ValueError("a fault needs a status in 400..599 and times >= 1")
        fault = Fault(status, times, retry_after, path)
        self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault matching this request, counted as used; None when nothing matches."""
        for fault in self._faults:
            want_method, _, want_path = fault.path.partition(" ")
            if fnmatchcase(method, want_method) and fnmatchcase(path, want_path or "*"):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def clear(self) -> None:
        self._faults.clear()

    def __len__(self) -> int:
        return len(self._faults)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(eq=False)
class SandboxTurn:
    """One turn: the input, what the agent wrote so far, and the stream events it produced."""

    id: str
    task_id: str
    seq: int
    input: str
    run_id: str
    base_url: str
    started_at: str = field(default_factory=now_iso)
    created_at: int = field(default_factory=lambda: int(datetime.now(UTC).timestamp()))
    status: str = "running"  # running | completed | error | aborted
    output_text: str = ""
    completed_at: str | None = None
    credits: int = 0
    duration_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    files: list[dict[str, object]] = field(default_factory=list)
    sources: list[dict[str, object]] = field(default_factory=list)
    served: dict[str, int | None] = field(default_factory=dict)  # name -> generated size (None: the answer)
    events: list[Event] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced after every emit

    @property
    def running(self) -> bool:
        return self.status == "running"

    def emit(self, event: Event | None = None) -> None:
        """Append a stream event (None only wakes the listeners) and wake whoever waits on `changed`."""
        if event is not None:
            self.events.append(event)
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(eq=False)
class SandboxTask:
    id: str
    worker_id: str
    title: str
    triggered_by: str
    base_url: str
    created_at: str = field(default_factory=now_iso)
    turns: list[SandboxTurn] = field(default_factory=list)
    archived: bool = False

    @property
    def url(self) -> str:
        return f"{self.base_url}/dashboard/tasks/{self.id}"

    @property
    def status(self) -> str:
        if not self.turns:
            return "pending"
        last = self.turns[-1].status
        return "completed" if last == "completed" else last

    @property
    def completed_at(self) -> str | None:
        return None if not self.turns or self.turns[-1].running else self.turns[-1].completed_at


class SandboxState:
    """Everything the sandbox knows; tests read `requests`, `tasks` and `turns_of()` directly."""

    def __init__(self, options: SandboxOptions | None = None) -> None:
        self.options = options or SandboxOptions()
        self.requests: list[RecordedRequest] = []
        self.tasks: dict[str, SandboxTask] = {}
        self.faults = FaultQueue()
        self._counts: dict[tuple[str, str], int] = {}
        self._running: set[asyncio.Task[None]] = set()

    def turns_of(self, task_id: str) -> list[SandboxTurn]:
        """The turns of `task_id`, oldest first; an unknown task has none (an empty list)."""
        task = self.tasks.get(task_id)
        return list(task.turns) if task else []

    def directive_fires(self, scope: str, directives: Directives) -> bool:
        """Whether a `status=` directive fails this POST; `times` is counted per (scope, directive)."""
        if directives.status is None:
            return False
        if directives.times is None:
            return True
        key = (scope, directives.status_key)
        used = self._counts.get(key, 0)
        if used >= directives.times:
            return False
        self._counts[key] = used + 1
        return True

    def start_turn(
        self, task: SandboxTask, text: str, directives: Directives, files: list[RecordedFile]
    ) -> SandboxTurn:
        """Append a running turn to `task` and start the echo agent on it. Synchronous on purpose:
        the caller's checks (409, 403) and this insertion happen without yielding to the loop."""
        seq = len(task.turns)
        turn = SandboxTurn(
            id=f"trn_{secrets.token_hex(8)}",
            task_id=task.id,
            seq=seq,
            input=text,
            run_id=f"run_{secrets.token_hex(8)}",
            base_url=task.base_url,
        )
        task.turns.append(turn)
        answer: str | None = None  # `answer-bytes`: made by the turn, in a thread
        if directives.answer_bytes is None:
            infos = [FileInfo(f.filename, f.size, f.sha256) for f in files]
            answer = echo_answer(task.id, seq, text, infos)
        delay = directives.slow if directives.slow is not None else self.options.turn_seconds
        runner = asyncio.get_running_loop().create_task(
            _run_turn(turn, answer, delay, directives), name=f"sandbox turn {task.id}#{seq}"
        )
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)
        return turn

    async def wait_idle(self) -> None:
        """Return once no turn is running (for tests; new turns started meanwhile are awaited too)."""
        while self._running:
            await asyncio.wait(set(self._running))

    async def aclose(self) -> None:
        """Cancel every running turn and wait for them to finish; safe to call twice."""
        for runner in list(self._running):
            runner.cancel()
        while self._running:
            await asyncio.wait(set(self._running))


async def _run_turn(turn: SandboxTurn, answer: str | None, delay: float, directives: Directives) -> None:
    """The echo agent at work: start, text deltas spread over `delay`, a source, files, finish.

    `answer` None: the answer is `directives.answer_bytes` of Markdown, made in a worker thread. A
    failing turn (`[sandbox:error]`) stops after two deltas with an `error` event. The turn's fields
    are final before `finish` is emitted, so a client that reads `finish` and then GETs the task sees
    the completed turn.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    turn.input_tokens = count_tokens(turn.input)
    credits = directives.credits
    try:
        turn.emit({"type": "start", "messageId": turn.run_id})
        turn.emit({"type": "text-start", "id": "txt_0"})
        if answer is None:
            size = directives.answer_bytes or 0
            answer = await asyncio.to_thread(long_answer, turn.task_id, turn.seq, size)
        pieces = deltas(answer)
        step = delay / len(pieces)
        written = 0
        for index, piece in enumerate(pieces):
            if step > 0:
                await asyncio.sleep(step)
            elif index >= CHUNKS:
                await asyncio.sleep(0)  # a long answer: let the streams send while it is written
            if directives.error and index == 2:
                break
            written += len(piece)
            turn.output_text = answer if written == len(answer) else answer[:written]
            turn.emit({"type": "text-delta", "id": "txt_0", "delta": piece})
        turn.emit({"type": "text-end", "id": "txt_0"})
        if directives.error:
            turn.error = "the agent failed, as asked by [sandbox:error]"
            _settle(turn, "error", started, credits)
            turn.emit({"type": "error", "errorText": turn.error})
            return
        source: dict[str, object] = {
            "id": "src_1",
            "title": "Sandbox source",
            "type": "url",
            "url": "https://example.com/sandbox/source",
        }
        turn.sources.append(source)
        turn.emit({"type": "source-url", "sourceId": "src_1", "url": source["url"], "title": source["title"]})
        if directives.echo_file:
            length = len(answer.encode()) if directives.answer_bytes is None else directives.answer_bytes
            echo: dict[str, object] = {"filename": "echo.txt", "mediaType": "text/plain"}
            _add_file(turn, echo, length, url=None, served=None)
        for spec in directives.outputs:
            wire: dict[str, object] = {"filename": spec.name, "mediaType": spec.guessed_type()}
            declared = spec.size if spec.size is not None else spec.served
            _add_file(turn, wire, declared, url=spec.url, served=spec.served)
        _settle(turn, "completed", started, credits)
        turn.emit({"type": "finish"})
    except asyncio.CancelledError:
        turn.error = "the sandbox shut down while the turn ran"
        _settle(turn, "aborted", started, credits)
        raise
    finally:
        turn.done.set()
        turn.emit()


def _add_file(
    turn: SandboxTurn, wire: dict[str, object], size: int | None, *, url: str | None, served: int | None
) -> None:
    """Add an output file at `url`, or (`url` None) served by the sandbox under its filename: `served`
    generated bytes, or the answer text when `served` is None too (echo.txt)."""
    if url is None:
        name = str(wire["filename"])
        turn.served[name] = served
        url = f"{turn.base_url}/files/{turn.task_id}/{turn.seq}/{quote(name, safe='')}"
    wire["url"] = url
    if size is not None:
        wire["size"] = size
    turn.files.append(wire)
    turn.emit({"type": "file", "url": url, "mediaType": wire["mediaType"]})


def _settle(turn: SandboxTurn, status: str, started: float, credits: int) -> None:
    turn.status = status
    turn.completed_at = now_iso()
    turn.duration_ms = int((asyncio.get_running_loop().time() - started) * 1000)
    turn.credits = credits
    turn.output_tokens = count_tokens(turn.output_text)
