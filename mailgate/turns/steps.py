"""The steps of one message's turn. Each does one state's work and returns an `Outcome`; it never decides
what the gateway does next (that is the scheduler's job) and never calls back into it.

- `received`: read the body (once); a command (`/status`, `/archive`, `/help`: `turns.commands`) is
  answered by the gateway (`Command`, no turn); otherwise build the turn input, spool the files ->
  `queued` (and wait there while an earlier message of the task is still active).
- `queued`/`submitting`: if an earlier POST may have reached the API, ask `GET /api/tasks/{id}` whether
  the turn is there before posting; record `submitting` with the expected turn number; POST; the row says
  `running` as soon as the API has answered 2xx.
- `running`: `GET /api/tasks/{id}` until the turn has ended -> an `Answer` or a `Notice`.

Besides these, `acknowledgement(row)` answers the scheduler's question "is the acknowledgement of this
long turn still due?": only while the row is `running`, not yet acknowledged, and the API does not say
the turn has ended; with the task's dashboard link.

API failures become outcomes here: a 401 is `Hold`, other transient failures `Later` (backing off, until
the retry horizon, then a "gave up" `Notice`), refusals a `Notice` for the sender. A 404 to the POST that
starts a new task is about the worker (the task does not exist yet): an operator's mistake in
MAILGATE_WORKERS, so `WorkerUnknown` keeps the message queued (backing off, with no horizon) until the
configuration is fixed; a task not yet created starts on the worker the configuration names now.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.errors import ApiRejected, ApiUnauthorized, ApiUnavailable, MailgateError
from mailgate.loops import backoff
from mailgate.mail.parse import parse_body
from mailgate.metrics import Metrics
from mailgate.models import (
    InboundState,
    MailBody,
    OutputFile,
    RunResult,
    SkippedFile,
    TaskSnapshot,
    Turn,
    TurnAnswer,
)
from mailgate.replies.output_files import Prefetch
from mailgate.store import InboundRow, Store
from mailgate.store.spool import Spool
from mailgate.turns.commands import Command, answer_command, find_command
from mailgate.turns.turn_input import TurnInput, build_turn_input

log = logging.getLogger("mailgate.turns")

DONE_STATUSES = {"completed", "complete", "done", "succeeded", "success"}
FAILED_STATUSES = {"error", "failed", "aborted", "cancelled", "canceled"}
# A POST whose answer was lost (the process died, or the connection dropped without a response) may
# still be on its way through the API; it is looked for again after this long before anything is re-sent.
SETTLE_SECONDS = 5.0
# Messages prepared or posted at once, until the API has taken their turn (its stream then runs with no
# slot). A burst of mail otherwise starts every job in the same loop pass: 1,000 first steps of ~0.5 ms
# each held the runner's loop 200-500 ms (bench/loop_stall.py). A slot is a few commits and one POST
# (tens of ms), so 16 start several hundred turns a second.
STARTING = 16


# --- outcomes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Continue:
    """The row moved to its next state: step it again (`streamed`: what the POST's answer told)."""

    row: InboundRow
    streamed: RunResult | None = None
    api_ok: bool = False  # an API call succeeded (so the key works)


@dataclass(frozen=True)
class Later:
    """Look at the row again at `at`, writing `state` (if given) and `error` with it."""

    at: float
    state: str | None = None
    error: str | None = None
    api_ok: bool = False


@dataclass(frozen=True)
class Hold:
    """The API refused our key: hold every message until it works again (`state`: the row's, if it
    must change)."""

    error: str
    state: str | None = None
    api_ok: bool = False


@dataclass(frozen=True)
class Answer:
    """The turn ended with an answer: reply with it, and the message is `answered`."""

    answer: TurnAnswer
    turn_seq: int
    task_turns: int
    api_ok: bool = True
    prefetched: Prefetch | None = None  # the files the stream announced, on their way (`prefetch`)


@dataclass(frozen=True)
class Notice:
    """The message ends `failed` with `reason`; the sender is told (`kind`, with `detail` shown)."""

    kind: str
    reason: str
    detail: str | None = None
    task_url: str | None = None
    skipped: tuple[SkippedFile, ...] = ()
    once_per_thread_per_day: bool = False
    turn_seq: int | None = None
    task_turns: int | None = None
    turn_status: str | None = None  # how the turn ended at the API, when it ran to its end
    api_ok: bool = False


@dataclass(frozen=True)
class WorkerUnknown:
    """The API does not know the worker of `alias` (a 404 to the POST of a new task): keep the message
    `queued`, look again at `at`, and tell the sender that the address is not ready (once)."""

    alias: str
    worker_id: str
    at: float
    error: str
    api_ok: bool = True  # the API answered, so the key works


Outcome = Continue | Later | Hold | Answer | Notice | Command | WorkerUnknown


@dataclass(frozen=True)
class Acknowledge:
    """The turn runs on at the API with no answer yet: tell the sender it is being worked on."""

    task_url: str | None


@dataclass
class Timing:
    """How patient the steps are (tests shorten these)."""

    poll_base: float = 1.0  # the shortest wait between looks at a running turn
    retry_base: float = 2.0  # the first back-off after a transient API failure
    settle_seconds: float = SETTLE_SECONDS
    clock: Callable[[], float] = field(default=time.time)


class TurnSteps:
    """One state's work for one message. `advance(row)` does it and says what happened."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        api: HandingerClient,
        spool: Spool,
        timing: Timing,
        *,
        metrics: Metrics | None = None,
        prefetch: Callable[[Sequence[OutputFile]], Prefetch] | None = None,
    ) -> None:
        self.settings = settings
        self.prefetch = prefetch  # starts fetching a stream's announced files (`OutputFiles.prefetch`)
        self.store = store
        self.api = api
        self.spool = spool
        self.timing = timing
        self.metrics = metrics if metrics is not None else Metrics()
        self._starting = asyncio.Semaphore(STARTING)
        # inbound id -> the `running` commit made when the API took its turn, still on its way (see
        # `_submit`); the next step of that row waits for it before it decides anything
        self._running: dict[str, asyncio.Task[None]] = {}

    async def advance(self, row: InboundRow, streamed: RunResult | None = None) -> Outcome:
        try:
            if row.state != InboundState.RUNNING:
                await self._running_committed(row)
            if row.state == InboundState.RECEIVED:
                async with self._starting:
                    return await self._prepare(row)
            if row.state in (InboundState.QUEUED, InboundState.SUBMITTING):
                return await self._submit(row)
            return await self._await_end(row, streamed)
        except ApiUnauthorized as exc:
            fresh = await self.store.inbound(row.id) or row
            # a 401 is an answer: nothing was created, so a row that was about to post is simply queued
            state = InboundState.QUEUED if fresh.state == InboundState.SUBMITTING else None
            return Hold(str(exc), state)
        except ApiUnavailable as exc:
            return await self._retry(row, exc)
        except ApiRejected as exc:
            return await self._rejected(row, exc)

    async def acknowledgement(self, row: InboundRow) -> Acknowledge | None:
        """`Acknowledge` when the turn of `row` runs at the API, unanswered and not yet acknowledged;
        None when not (yet): the row is not `running`, was acknowledged, or the turn has ended. The task's
        link comes from the API (a new task has none in the store before its first answer); when the API
        cannot be asked, from the store."""
        fresh = await self.store.inbound(row.id)
        if fresh is None or fresh.state != InboundState.RUNNING or fresh.acked_at is not None:
            return None
        assert fresh.task_id is not None
        try:
            snapshot = await self.api.get_task(fresh.task_id)
        except MailgateError:
            snapshot = None
        if snapshot is not None:
            turn = find_turn(snapshot, fresh)
            if turn is not None and turn.status.lower() in DONE_STATUSES | FAILED_STATUSES:
                return None  # the answer is on its way: no acknowledgement now
            return Acknowledge(snapshot.url)
        task = await self.store.task_row(fresh.task_id)
        return Acknowledge(task.url if task else None)

    # --- received -> queued ------------------------------------------------------------------------

    async def _prepare(self, row: InboundRow) -> Outcome:
        await self.store.count_crash(row.id, row.crashes + 1)  # counts a crash while parsing, too
        body = await self._read_body(row)
        command = find_command(body.reply_text)
        if command is not None:
            return await answer_command(row, command, self.store, self.api)
        turn = await self._turn_of(row, body)
        del body
        if not turn.input:
            return Notice("empty_reply", "nothing new after removing quoted text", skipped=turn.skipped)
        files = await self.spool.write(row.id, turn.files)
        await self.store.set_turn_input(
            row.id,
            input=turn.input,
            files=self.spool.describe(files),
            skipped=[{"filename": s.filename, "reason": s.reason} for s in turn.skipped],
        )
        if row.task_id is not None and await self.store.task_busy_before(row.task_id, row.id):
            return Later(0.0)  # read while an earlier turn of its task runs: its own turn waits for it
        fresh = await self.store.inbound(row.id)
        assert fresh is not None
        return Continue(fresh)

    async def _read_body(self, row: InboundRow) -> MailBody:
        raw = await self.store.raw(row.raw_id)
        return await asyncio.to_thread(parse_body, raw)

    async def _read_turn(self, row: InboundRow) -> TurnInput:
        """What the worker receives, read from the raw message (the same every time it is read, but for
        the token of its delimiters)."""
        return await self._turn_of(row, await self._read_body(row))

    async def _turn_of(self, row: InboundRow, body: MailBody) -> TurnInput:
        assert row.task_id is not None and row.sender is not None
        already = set() if row.new_task else await self.store.file_hashes_of_task(row.task_id, before=row.id)
        return build_turn_input(
            body,
            subject=row.subject,
            sender=row.sender,
            sender_name=row.sender_name,
            new_task=bool(row.new_task),
            already_sent=already,
            verified=row.verified,
            participants=await self.store.participants(row.task_id),
        )

    async def _respool(self, row: InboundRow) -> str:
        """The row's files are not in this host's spool (another gateway prepared it, or the spool was
        lost): spool them again from the raw message; the input stays as committed."""
        turn = await self._read_turn(row)
        files = self.spool.describe(await self.spool.write(row.id, turn.files))
        await self.store.set_files(row.id, files)
        log.info("turn_respooled", extra={"inbound": row.id, "files": len(files)})
        return json.dumps(files)

    # --- queued/submitting -> running ---------------------------------------------------------------

    async def _submit(self, row: InboundRow) -> Outcome:
        """`_post` in one of the `STARTING` slots, given back once the API has taken the turn."""
        await self._starting.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self._starting.release()

        try:
            return await self._post(row, release)
        finally:
            release()

    async def _post(self, row: InboundRow, release: Callable[[], None]) -> Outcome:
        assert row.task_id is not None and row.input is not None
        task = await self.store.task_row(row.task_id)
        assert task is not None
        snapshot: TaskSnapshot | None = None
        # the task may exist already: a later turn, an earlier POST that may have got through, or a replay
        # after a turn that ended (its `turn_seq` is set, attempts are not): number the turn after its turns
        if (
            row.attempts > 0
            or row.state == InboundState.SUBMITTING
            or not row.new_task
            or row.turn_seq is not None
        ):
            snapshot = await self.api.get_task(row.task_id)
            if snapshot is not None and row.attempts > 0:
                turn = find_turn(snapshot, row)
                if turn is not None:  # the earlier POST did reach the API: never post it twice
                    log.info(
                        "turn_recovered", extra={"inbound": row.id, "task": row.task_id, "seq": turn.seq}
                    )
                    await self.store.mark_running(row.id, turn_seq=turn.seq)
                    running = replace(row, state=InboundState.RUNNING, turn_seq=turn.seq)
                    return Continue(running, api_ok=True)
            if snapshot is None and not row.new_task and task.turns > 0:
                raise ApiRejected(404, "the task no longer exists")
            settle_until = row.updated_at + self.timing.settle_seconds
            if row.state == InboundState.SUBMITTING and self.timing.clock() < settle_until:
                # the lost POST may not have reached the API yet: never race it with a second one
                log.info("turn_settling", extra={"inbound": row.id, "task": row.task_id})
                return Later(settle_until, api_ok=True)
        worker_id = task.worker_id
        configured = self.settings.worker_for(task.alias)
        if row.new_task and snapshot is None and configured and configured.worker_id != worker_id:
            # not created at the API yet: it starts on the worker the configuration names now
            worker_id = configured.worker_id
            await self.store.set_task_worker(task.id, worker_id)
            log.info("task_worker_changed", extra={"task": task.id, "worker": worker_id})
        expected = len(snapshot.turns) if snapshot is not None else 0
        files = await self._respool(row) if self.spool.missing(row.files) else row.files
        await self.store.mark_submitting(row.id, turn_seq=expected, attempts=row.attempts + 1)
        uploads = self.spool.uploads(files)
        log.info(
            "turn_post",
            extra={"inbound": row.id, "task": row.task_id, "seq": expected, "files": len(uploads)},
        )

        async def committed() -> None:
            await self.store.mark_running(row.id)
            self.metrics.accept_to_post_seconds.observe(max(0.0, time.time() - row.received_at))
            release()  # the stream runs on without a slot

        async def accepted() -> None:  # the API answered 2xx: the turn exists and runs
            # committed while the stream is read and the final GET is on its way (`_await_end` waits
            # for it before it decides anything): until it is, the row says `submitting`, which after
            # a crash looks for the turn before any re-POST, so nothing is posted twice meanwhile
            self._running[row.id] = asyncio.create_task(committed(), name=f"running-{row.id}")

        try:
            result = await self.api.create_turn(
                task_id=row.task_id,
                worker_id=worker_id,
                input=row.input,
                budget=task.budget,
                files=uploads,
                on_accepted=accepted,
            )
        except ApiRejected as exc:
            if exc.status == 404 and row.new_task and snapshot is None:  # no task yet: the worker is unknown
                delay = backoff(row.attempts + 1, base=self.timing.retry_base)
                return WorkerUnknown(
                    row.alias,
                    worker_id,
                    self.timing.clock() + delay,
                    f"API 404: {exc.reason} (MAILGATE_WORKERS: {row.alias}={worker_id}); held until the "
                    "worker id is fixed and mailgate restarted",
                )
            raise
        running = replace(
            row,
            updated_at=time.time(),  # as `mark_running` stamped it
            state=InboundState.RUNNING,
            last_error=None,
            turn_seq=expected,
            attempts=row.attempts + 1,
        )
        return Continue(running, result, api_ok=True)

    # --- running -> answered -------------------------------------------------------------------------

    async def _await_end(self, row: InboundRow, streamed: RunResult | None) -> Outcome:
        """GET the task; meanwhile the `running` commit ends (if on its way: it is waited for first, so
        whatever follows, a retry that reads the row or the answer's commit, comes after it) and the
        files the stream announced are fetched (handed on with the `Answer`, else dropped)."""
        assert row.task_id is not None
        get = asyncio.create_task(self.api.get_task(row.task_id), name=f"get-{row.id}")
        files = streamed.files if streamed is not None else []
        prefetched = self.prefetch(files) if self.prefetch is not None and files else None
        try:
            await self._running_committed(row)
            outcome = await self._ended(row, streamed, await get)
        except BaseException:
            get.cancel()
            await asyncio.gather(get, return_exceptions=True)
            if prefetched is not None:
                prefetched.cancel()
            raise
        if isinstance(outcome, Answer) and prefetched is not None:
            return replace(outcome, prefetched=prefetched)
        if prefetched is not None:
            prefetched.cancel()
        return outcome

    async def _ended(
        self, row: InboundRow, streamed: RunResult | None, snapshot: TaskSnapshot | None
    ) -> Outcome:
        """What the task's snapshot says of the turn of `row`: still running, ended with an answer, failed."""
        assert row.task_id is not None
        if snapshot is None:
            raise ApiRejected(404, "the task no longer exists")
        turn = find_turn(snapshot, row)
        if turn is None:
            if row.attempts == 0:  # nothing was ever posted (state came from an operator edit)
                return Later(0.0, state=InboundState.QUEUED, api_ok=True)
            return self._poll_later(row)
        status = turn.status.lower()
        if status not in DONE_STATUSES | FAILED_STATUSES and not (snapshot.finished and turn.output_text):
            return self._poll_later(row)
        if status in FAILED_STATUSES or snapshot.status in ("error", "aborted"):
            ended = snapshot.status if snapshot.status in ("error", "aborted") else status
            return Notice(
                "task_failed",
                f"task {snapshot.status}",
                detail=ended,
                task_url=snapshot.url,
                turn_seq=turn.seq,
                task_turns=len(snapshot.turns),
                turn_status=ended,
                api_ok=True,
            )
        result = streamed or RunResult()
        if not result.sources and not result.files:
            with contextlib.suppress(MailgateError):
                task = await self.store.task_row(row.task_id)
                recovered = await self.api.worker_run(task.worker_id if task else "", row.task_id)
                # older servers ignore ?taskId= and answer the worker's latest run: use it only if it is ours
                if recovered is not None and recovered.text.strip() == turn.output_text.strip():
                    result = recovered
        answer = TurnAnswer(
            text=turn.output_text or result.text,
            sources=tuple(result.sources),
            files=tuple(turn.files) or tuple(result.files),
            task_url=snapshot.url or result.url,
        )
        return Answer(answer, turn_seq=turn.seq, task_turns=len(snapshot.turns))

    async def _running_committed(self, row: InboundRow) -> None:
        """Wait for the `running` commit of `row` still on its way, if any (a failure raises here)."""
        pending = self._running.pop(row.id, None)
        if pending is not None:
            await asyncio.shield(pending)  # a cancelled job leaves the commit to end by itself

    def _poll_later(self, row: InboundRow) -> Outcome:
        """The turn is still running: look again later (sooner for young turns), up to the horizon."""
        now = self.timing.clock()
        if now - row.received_at > self.settings.retry_horizon:
            return Notice("gave_up", "the turn did not finish within the retry horizon", api_ok=True)
        waited = now - row.updated_at
        return Later(now + min(30.0, max(self.timing.poll_base, waited / 4)), api_ok=True)

    # --- failures --------------------------------------------------------------------------------------

    async def _retry(self, row: InboundRow, exc: ApiUnavailable) -> Outcome:
        fresh = await self.store.inbound(row.id) or row
        now = self.timing.clock()
        if now - fresh.received_at > self.settings.retry_horizon:
            return Notice("gave_up", f"gave up after the retry horizon: {exc}")
        delay = backoff(max(1, fresh.attempts), base=self.timing.retry_base, hint=exc.retry_after)
        state = InboundState.RUNNING if fresh.state == InboundState.RUNNING else InboundState.QUEUED
        if fresh.state == InboundState.SUBMITTING and exc.maybe_sent and not exc.answered:
            state = InboundState.SUBMITTING  # no answer came: the next try lets the POST settle first
        log.warning(
            "api_unavailable", extra={"inbound": row.id, "error": str(exc), "retry_in": round(delay, 1)}
        )
        return Later(now + delay, state=state, error=str(exc))

    async def _rejected(self, row: InboundRow, exc: ApiRejected) -> Outcome:
        fresh = await self.store.inbound(row.id) or row
        once = False
        if exc.status == 402:
            kind, once = "out_of_credits", True
            log.error("api_out_of_credits", extra={"inbound": row.id, "task": row.task_id})
        elif exc.status == 403 and not fresh.new_task:
            kind = "wrong_worker"
        elif exc.status == 404:
            kind = "task_not_found"
        else:
            kind = "api_rejected"
        # nothing was created: the next try (after an operator's replay) posts again
        return Notice(
            kind,
            f"API {exc.status}: {exc.reason}",
            detail=exc.reason,
            once_per_thread_per_day=once,
            api_ok=True,
        )


def find_turn(snapshot: TaskSnapshot, row: InboundRow) -> Turn | None:
    """The turn `row` created, if the API has it: matched by input, else by its expected number."""
    want = (row.input or "").strip()
    start = row.turn_seq or 0
    for turn in snapshot.turns:
        if turn.seq >= start and turn.input.strip() == want:
            return turn
    if row.turn_seq is not None and row.attempts > 0:
        for turn in snapshot.turns:
            if turn.seq == row.turn_seq:
                return turn
    return None
