"""The runner: turns committed messages into turns, one at a time per task, many tasks at once.

Each message moves `received -> queued -> submitting -> running -> answered` (or `failed`), and every
step is committed before the next begins, so after a crash the row's state says where to resume:

- `received`: parse, trim, pick the files, spool them; the input is stored (it identifies the turn).
- `queued`/`submitting`: if an earlier POST may have reached the API, ask `GET /api/tasks/{id}` whether
  the turn is there before posting; record `submitting` with the expected turn number; POST.
- `running`: reconcile with `GET /api/tasks/{id}` until the turn has ended, then render the answer and
  commit it to the outbox with the `answered` state in one transaction.

Transient API failures back off (exponential, jitter, `Retry-After` honoured) until the retry horizon;
a 401 holds all API work until a call succeeds again; permanent refusals end in a notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from mailgate import compose, parsing
from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.endings import Endings, _skipped
from mailgate.errors import ApiRejected, ApiUnauthorized, ApiUnavailable, MailgateError
from mailgate.jobs import drain, wait_event
from mailgate.models import InboundState, RunResult, TaskSnapshot, Turn, UploadFile
from mailgate.outputs import Outputs, Prefetch
from mailgate.replies import Prepared, Replies
from mailgate.spool import Spool
from mailgate.store import InboundRow, Store, update

log = logging.getLogger("mailgate.runner")

DONE_STATUSES = {"completed", "complete", "done", "succeeded", "success"}
FAILED_STATUSES = {"error", "failed", "aborted", "cancelled", "canceled"}
HOLD_SECONDS = 30.0
# A POST whose answer was lost (the process died, or the connection dropped without a response) may
# still be on its way through the API; it is looked for again after this long before anything is re-sent.
SETTLE_SECONDS = 5.0
LOUD_EVERY = 300.0


class Runner(Endings):
    """Schedules message jobs. `wake()` after committing new work; `run()` until cancelled."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        api: HandingerClient,
        replies: Replies,
        spool: Spool,
        *,
        on_outbox: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        poll_base: float = 1.0,
        retry_base: float = 2.0,
        hold_seconds: float = HOLD_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self.settings = settings
        self.store = store
        self.api = api
        self.replies = replies
        self.spool = spool
        self.on_outbox = on_outbox
        self.clock = clock
        self.poll_base = poll_base
        self.retry_base = retry_base
        self.hold_seconds = hold_seconds
        self.settle_seconds = settle_seconds
        self.outputs = Outputs(api, settings)
        self._wake = asyncio.Event()
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._hold_until = 0.0
        self._held = False  # a 401 was seen and no API call has succeeded since
        self._last_loud = 0.0
        self._results: dict[str, RunResult] = {}

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = self.clock()
            free = self.settings.concurrency - len(self._busy)
            if free > 0 and now >= self._hold_until:
                # ids first (cheap with many jobs in hand), whole rows only for those started
                ids = await self.store.runnable_ids(now, free, set(self._busy))
                for row in await self.store.inbound_rows(ids):
                    if row.id not in self._busy:
                        self._busy[row.id] = asyncio.create_task(self._job(row), name=f"message-{row.id}")
            # rows due already are in hand or wait for a slot (a finishing job wakes us): only later ones
            due = await self.store.next_due_after("inbound", now)
            timeout = 5.0 if due is None else min(5.0, max(0.0, due - self.clock()))
            if now < self._hold_until:
                timeout = max(timeout, self._hold_until - now)
            await wait_event(self._wake, timeout)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for jobs in hand; cancel the rest. Returns how many were cancelled."""
        return await drain(self._busy.values(), timeout)

    async def _job(self, row: InboundRow) -> None:
        try:
            await self._step(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a poison message: count it, quarantine after a few
            await self._crashed(row, exc)
        finally:
            self._busy.pop(row.id, None)
            self._wake.set()

    async def _step(self, row: InboundRow) -> None:
        if row.crashes >= self.settings.max_processing_attempts:
            # crashes are counted before the work they guard, so a message that takes the whole process
            # down (not only this job) is caught here on the next start instead of being retried forever
            await self._quarantine(row, "its processing kept failing")
            return
        if row.state == InboundState.RECEIVED:
            fresh = await self._compose(row)
            if fresh is None:
                return
            row = fresh
        try:
            if row.state in (InboundState.QUEUED, InboundState.SUBMITTING):
                fresh = await self._submit(row)
                if fresh is None:
                    return
                row = fresh
            await self._reconcile(row)
        except ApiUnauthorized as exc:
            self._hold(str(exc))
            await self.store.set_inbound(
                row.id,
                next_attempt_at=self.clock() + self.hold_seconds,
                last_error="401: the API key was refused; held until it works again",
            )
        except ApiUnavailable as exc:
            await self._retry_later(row, exc)
        except ApiRejected as exc:
            self._resumed()  # the API read the request, so it took the key
            await self._rejected(row, exc)
        else:
            self._resumed()

    # --- received -> queued -------------------------------------------------------------------

    async def _compose(self, row: InboundRow) -> InboundRow | None:
        await self.store.set_inbound(row.id, crashes=row.crashes + 1)  # counts a crash while parsing, too
        raw = await self.store.raw(row.raw_id)
        mail = await asyncio.to_thread(parsing.parse_message, raw)
        del raw
        already: set[str] = set()
        assert row.task_id is not None and row.sender is not None
        if not row.new_task:
            for earlier in await self.store.messages_of_task(row.task_id):
                if earlier.id != row.id and earlier.files:
                    already |= {f["sha256"] for f in json.loads(earlier.files)}
        turn = compose.compose(mail, sender=row.sender, new_task=bool(row.new_task), already_sent=already)
        skipped = [{"filename": s.filename, "reason": s.reason} for s in turn.skipped]
        if not turn.input:
            statements = await self.replies.notice(row, "empty_reply", skipped=_skipped(json.dumps(skipped)))
            await self._finish(row, InboundState.FAILED, "nothing new after removing quoted text", statements)
            return None
        files = await self.spool.write(row.id, turn.files)
        del mail
        values = {
            "state": InboundState.QUEUED,
            "input": turn.input,
            "crashes": 0,
            "skipped": json.dumps(skipped),
            "files": json.dumps(
                [
                    {
                        "filename": f.filename,
                        "content_type": f.content_type,
                        "path": str(f.path),
                        "size": f.size,
                        "sha256": f.sha256,
                    }
                    for f in files
                ]
            ),
        }
        await self.store.set_inbound(row.id, **values)
        return await self.store.inbound(row.id)

    # --- queued/submitting -> running ---------------------------------------------------------

    async def _submit(self, row: InboundRow) -> InboundRow | None:
        assert row.task_id is not None and row.input is not None
        task = await self.store.task_row(row.task_id)
        assert task is not None
        snapshot: TaskSnapshot | None = None
        if row.attempts > 0 or row.state == InboundState.SUBMITTING or not row.new_task:
            snapshot = await self.api.get_task(row.task_id)
            if snapshot is not None and row.attempts > 0:
                turn = find_turn(snapshot, row)
                if turn is not None:  # the earlier POST did reach the API: never post it twice
                    log.info(
                        "turn_recovered", extra={"inbound": row.id, "task": row.task_id, "seq": turn.seq}
                    )
                    await self.store.set_inbound(row.id, state=InboundState.RUNNING, turn_seq=turn.seq)
                    return await self.store.inbound(row.id)
            if snapshot is None and not row.new_task and task.turns > 0:
                raise ApiRejected(404, "the task no longer exists")
            settle_until = row.updated_at + self.settle_seconds
            if row.state == InboundState.SUBMITTING and self.clock() < settle_until:
                # the lost POST may not have reached the API yet: never race it with a second one
                log.info("turn_settling", extra={"inbound": row.id, "task": row.task_id})
                await self.store.write([update("inbound", row.id, next_attempt_at=settle_until)])
                return None
        expected = len(snapshot.turns) if snapshot is not None else 0
        await self.store.set_inbound(
            row.id, state=InboundState.SUBMITTING, turn_seq=expected, attempts=row.attempts + 1
        )
        uploads = [
            UploadFile(f["filename"], f["content_type"], Path(f["path"]), f["size"], f["sha256"])
            for f in json.loads(row.files or "[]")
        ]
        log.info(
            "turn_post",
            extra={"inbound": row.id, "task": row.task_id, "seq": expected, "files": len(uploads)},
        )
        result = await self.api.create_turn(
            task_id=row.task_id, worker_id=task.worker_id, input=row.input, budget=task.budget, files=uploads
        )
        self._hold_until = 0.0
        self._resumed()
        self._results[row.id] = result
        now = time.time()  # as `set_inbound` stamps it
        await self.store.write(
            [update("inbound", row.id, updated_at=now, state=InboundState.RUNNING, last_error=None)]
        )
        return dataclasses.replace(
            row,
            updated_at=now,
            state=InboundState.RUNNING,
            last_error=None,
            turn_seq=expected,
            attempts=row.attempts + 1,
        )

    # --- running -> answered -------------------------------------------------------------------

    async def _reconcile(self, row: InboundRow) -> None:
        assert row.task_id is not None
        streamed = self._results.get(row.id)
        if streamed is None or not streamed.done or streamed.error:
            await self._conclude(row, await self.api.get_task(row.task_id))
            return
        # the stream ended with its done marker: the turn is most likely over, so the reply's headers are
        # read while GET /api/tasks/{id} confirms it (and gives the final answer)
        # read while GET /api/tasks/{id} confirms it (and gives the final answer), and the files the stream
        # announced are downloaded meanwhile
        preparing = asyncio.create_task(self.replies.prepare(row))
        prefetch = self.outputs.prefetch(streamed.files)
        try:
            try:
                snapshot = await self.api.get_task(row.task_id)
            except BaseException:
                preparing.cancel()
                await asyncio.gather(preparing, return_exceptions=True)
                raise
            (prepared,) = await asyncio.gather(preparing, return_exceptions=True)
            # a failed read is not this step's failure: `answer` reads again (and raises) if it needs them
            ready = None if isinstance(prepared, BaseException) else prepared
            await self._conclude(row, snapshot, ready, prefetch)
        finally:
            await prefetch.aclose()

    async def _conclude(
        self,
        row: InboundRow,
        snapshot: TaskSnapshot | None,
        prepared: Prepared | None = None,
        prefetch: Prefetch | None = None,
    ) -> None:
        assert row.task_id is not None
        if snapshot is None:
            raise ApiRejected(404, "the task no longer exists")
        turn = find_turn(snapshot, row)
        if turn is None:
            if row.attempts == 0:  # nothing was ever posted (state came from an operator edit)
                await self.store.set_inbound(row.id, state=InboundState.QUEUED, next_attempt_at=0)
                return
            await self._poll_later(row)
            return
        status = turn.status.lower()
        if status not in DONE_STATUSES | FAILED_STATUSES and not (snapshot.finished and turn.output_text):
            await self._poll_later(row)
            return
        result = self._results.pop(row.id, None) or RunResult()
        if status in FAILED_STATUSES or snapshot.status in ("error", "aborted"):
            ended = snapshot.status if snapshot.status in ("error", "aborted") else status
            statements = await self.replies.notice(row, "task_failed", reason=ended, task_url=snapshot.url)
            await self._finish(
                row, InboundState.FAILED, f"task {snapshot.status}", statements, snapshot, turn
            )
            return
        if not result.sources and not result.files:
            with contextlib.suppress(MailgateError):
                recovered = await self.api.worker_run(await self._worker_id(row), row.task_id)
                # older servers ignore ?taskId= and answer the worker's latest run: use it only if it is ours
                if recovered is not None and recovered.text.strip() == turn.output_text.strip():
                    result = recovered
        text = turn.output_text or result.text
        attached, linked = await self.outputs.collect(list(turn.files) or result.files, prefetch)
        statements = await self.replies.answer(
            row,
            text=text,
            sources=result.sources,
            task_url=snapshot.url or result.url,
            attached=attached,
            linked=linked,
            skipped=_skipped(row.skipped),
            prepared=prepared,
        )
        await self._finish(row, InboundState.ANSWERED, None, statements, snapshot, turn)
        log.info("turn_answered", extra={"inbound": row.id, "task": row.task_id, "seq": turn.seq})

    async def _worker_id(self, row: InboundRow) -> str:
        assert row.task_id is not None
        task = await self.store.task_row(row.task_id)
        return task.worker_id if task else ""

    async def _poll_later(self, row: InboundRow) -> None:
        """The turn is still running: look again later (sooner for young turns), up to the horizon."""
        if self.clock() - row.received_at > self.settings.retry_horizon:
            statements = await self.replies.notice(row, "gave_up")
            await self._finish(
                row, InboundState.FAILED, "the turn did not finish within the retry horizon", statements
            )
            return
        waited = self.clock() - row.updated_at
        delay = min(30.0, max(self.poll_base, waited / 4))
        await self.store.write([update("inbound", row.id, next_attempt_at=self.clock() + delay)])

    def _resumed(self) -> None:
        if self._held:
            self._held = False
            log.warning("api_key_accepted: the API answers again; held messages resume")

    def _hold(self, error: str) -> None:
        now = self.clock()
        self._held = True
        self._hold_until = now + self.hold_seconds
        if now - self._last_loud >= LOUD_EVERY:
            self._last_loud = now
            log.error(
                "api_key_rejected: HANDINGER_API_KEY is missing, wrong or revoked; all messages are held and "
                "will be retried",
                extra={"error": error},
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
