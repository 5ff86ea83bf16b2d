"""The turn scheduler: which messages run now, one at a time per task and many tasks at once; the hold
while the API refuses our key; drain on shutdown. The work of each state is in `turns.steps`, which
returns an outcome; the scheduler acts on it (commit a retry time, hold, or end the message with its
reply from `replies`).

An inbound message's states (the `state` column of `inbound`), each committed before the next begins,
so after a crash the row says where to resume:

| state        | meaning                                                     | next                        |
|--------------|-------------------------------------------------------------|-----------------------------|
| `received`   | committed at DATA (250 sent); body not read yet             | `queued`, `failed`          |
| `queued`     | the turn's input and files are ready; waits for its task's  | `submitting`                |
|              | earlier turns, a free slot, or a retry time                 |                             |
| `submitting` | the POST is about to go, or went without an answer: the     | `running`, `queued` (none   |
|              | turn may exist, so it is looked for before any re-POST      | was created), `submitting`  |
| `running`    | the API has the turn (it answered 2xx); waiting for its end | `answered`, `failed`        |
| `answered`   | the answer is in the outbox (same transaction)              | (end)                       |
| `ignored`    | never answered: bounce, auto-reply, loop, list mail, or a   | (end; `replay` runs it)     |
|              | second address of the same task in one message              |                             |
| `failed`     | failed for good, with the reason; the sender got a notice   | (end; `replay` runs it)     |
| `held`       | a sender on neither allow list (MAILGATE_UNKNOWN_SENDERS=   | `received` (approve),       |
|              | hold): waits for the operator (`turns.held`); never claimed | `ignored` (deny, 7 days)    |

Their replies (the `outbox` table's `state`): `pending` -> `sent`, or `retry` until the horizon, then
`dead` (`delivery.outbox`); a `sent` reply becomes `bounced` when a bounce comes back to its return path
(`admission.admit`).

A message that keeps crashing its job (a bug, a poison message) is quarantined as `failed` after
MAILGATE_MAX_PROCESSING_ATTEMPTS; the count is taken before the work it guards, so a message that takes
the whole process down is caught on the next start.

Which messages this gateway runs is a claim on them (`Store.claim_inbound`; with SQLite the scheduler's
own busy set, with PostgreSQL also a lease that other gateways respect), handed back when the job ends.
A job whose claim was taken over by another gateway (`LeaseLost`: this gateway was cut off for longer
than the lease) stops without writing anything: the other gateway resumes from the last commit.

Two conditions pause the whole scheduler instead of failing anyone's message: the API refusing our key
(the hold: nothing is posted until a call succeeds again) and trouble with the disk or the database
(full, read-only, failing, locked: `loops.storage_trouble`). The storage pause backs off from 1 s to a
minute, lives only in memory (the store may be what fails), logs once a minute at most, counts no
crash, and ends by itself when a job's work is committed again.

A message that starts with a command (`/status`, `/archive`, `/help`: `turns.commands`) is answered by
the gateway with a notice and ends `answered`, with no turn. Read early (a message still to be read may
be claimed while its task's turn runs), a command is answered at once; a message that is not one waits
`queued` behind its task's earlier turns.

A turn that runs long is acknowledged: MAILGATE_ACK_AFTER seconds after the API took it (0: never), if
no answer has come, the sender gets one short notice in the thread (`working`: the task's link, the
files the worker received and those skipped) and the row remembers it (`acked_at`), so a turn is
acknowledged at most once, through restarts too. A streamed turn's step lasts as long as the turn: the
scheduler waits for it up to the acknowledgement's time, then asks `steps.acknowledgement` whether it is
still due and commits the notice while the step goes on; a turn that is polled (after a restart or a
lost stream) is looked at again no later than that time. Ignored mail never gets one (it is never run).

An alias whose worker the API does not know (`WorkerUnknown`: MAILGATE_WORKERS is wrong) holds only that
alias's new mail: each message stays `queued` with the reason in `last_error` and is tried again with
back-off; its sender is told once that the address is not set up yet (`address_not_ready`); the
operator gets one ERROR line per alias per start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from mailgate.config import Settings
from mailgate.errors import LeaseLost
from mailgate.loops import Pause, backoff, drain, storage_trouble, wait_event
from mailgate.metrics import Metrics
from mailgate.models import InboundState, RunResult
from mailgate.replies.compose import Replies
from mailgate.store import InboundRow, NewReply, Store
from mailgate.store.spool import Spool
from mailgate.turns.commands import Command
from mailgate.turns.steps import (
    Acknowledge,
    Answer,
    Continue,
    Hold,
    Later,
    Notice,
    Outcome,
    TurnSteps,
    WorkerUnknown,
)

log = logging.getLogger("mailgate.turns")

HOLD_SECONDS = 30.0
LOUD_EVERY = 300.0
ACK_RECHECK = 5.0  # seconds between looks while a turn due an acknowledgement is not at the API yet
NOT_READY = "address_not_ready"  # the notice to the sender of mail held for an unknown worker


class Scheduler:
    """Runs message jobs. `wake()` after committing new work; `run()` until cancelled."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        steps: TurnSteps,
        replies: Replies,
        spool: Spool,
        *,
        on_outbox: Callable[[], None] = lambda: None,
        hold_seconds: float = HOLD_SECONDS,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.steps = steps
        self.replies = replies
        self.spool = spool
        self.on_outbox = on_outbox
        self.clock = steps.timing.clock
        self.hold_seconds = hold_seconds
        self._wake = asyncio.Event()
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._draining = False  # set by `drain`: no job starts after it (the store closes next)
        self._hold_until = 0.0
        self._held = False  # a 401 was seen and no API call has succeeded since
        self._hold_reason = ""
        self._last_loud = 0.0
        self._unknown_workers: set[str] = set()  # aliases already reported (once per start)
        self._acked: set[str] = set()  # messages acknowledged by a job in hand (their rows are older)
        self.storage = Pause("storage", log, base=steps.timing.retry_base, clock=self.clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(self.metrics.jobs_in_hand.labels("scheduler"), lambda: len(self._busy))
        self.metrics.watch(self.metrics.api_hold, lambda: int(self._held))
        self.metrics.watch(self.metrics.storage_paused.labels("scheduler"), lambda: int(self.storage.tripped))

    @property
    def held(self) -> str | None:
        """Why every turn is held (the API refuses the key), or None."""
        return self._hold_reason if self._held else None

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                timeout = await self._start_due()
            except Exception as exc:
                if not storage_trouble(exc):
                    raise
                self.storage.trip(str(exc))
                timeout = self.storage.until - self.clock()
            await wait_event(self._wake, timeout)

    async def _start_due(self) -> float:
        """Start the jobs that are due and may run; return how long to wait before looking again."""
        now = self.clock()
        paused_until = max(self._hold_until, self.storage.until)
        free = self.settings.concurrency - len(self._busy)
        if free > 0 and now >= paused_until and not self._draining:
            for row in await self.store.claim_inbound(now, free, set(self._busy)):
                if self._draining:  # the drain began while the claim was on its way: hand it back
                    await self.store.release_inbound(row.id)
                elif row.id not in self._busy:
                    self._busy[row.id] = asyncio.create_task(self._job(row), name=f"message-{row.id}")
        # rows due already are in hand or wait for a slot (a finishing job wakes us): only later ones
        due = await self.store.next_due_after("inbound", now)
        timeout = 5.0 if due is None else min(5.0, max(0.0, due - self.clock()))
        if now < paused_until:
            timeout = max(timeout, paused_until - now)
        return timeout

    async def drain(self, timeout: float) -> int:
        """Start nothing more; wait up to `timeout` for jobs in hand, cancel the rest. Returns how many
        were cancelled."""
        self._draining = True
        return await drain(self._busy, timeout, log, "scheduler")

    async def _job(self, row: InboundRow) -> None:
        try:
            await self._drive(row)
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:  # another gateway has it now and resumes from the last commit
            log.warning("lease_lost", extra={"inbound": row.id, "error": str(exc)})
        except Exception as exc:
            if storage_trouble(exc):  # the disk's fault, not the message's: pause, count nothing
                await self._stalled(row, exc)
            else:  # a bug or a poison message: count it, quarantine after a few
                await self._crashed(row, exc)
        finally:
            await self.store.release_inbound(row.id)
            self._busy.pop(row.id, None)
            self._acked.discard(row.id)
            self._wake.set()

    async def _drive(self, row: InboundRow) -> None:
        if row.crashes >= self.settings.max_processing_attempts:
            await self._quarantine(row, "its processing kept failing")
            return
        streamed: RunResult | None = None
        while True:
            outcome: Outcome = await self._advance(row, streamed)
            if outcome.api_ok:
                await self._resumed()
            if not isinstance(outcome, Continue):
                break
            row, streamed = outcome.row, outcome.streamed
        try:
            await self._conclude(row, outcome)
        finally:
            if isinstance(outcome, Answer) and outcome.prefetched is not None:
                outcome.prefetched.cancel()  # what the reply did not take

    async def _conclude(self, row: InboundRow, outcome: Outcome) -> None:
        """Act on the last outcome of a job's steps (anything but `Continue`) and commit it."""
        ended = isinstance(outcome, Answer) or (isinstance(outcome, Notice) and outcome.turn_status)
        if ended and row.state == InboundState.RUNNING:  # `updated_at`: when the API took the turn
            self.metrics.turn_seconds.observe(max(0.0, self.clock() - row.updated_at))
        if isinstance(outcome, Later):
            at = outcome.at
            due = self._ack_due(row)
            if due is not None and row.state == InboundState.RUNNING and outcome.state in (None, row.state):
                at = min(at, max(due, self.clock()))  # a polled turn: look again when the ack is due
            if outcome.error is not None:
                self.metrics.retries.labels("api").inc()
            await self.store.reschedule(row.id, at, state=outcome.state, error=outcome.error)
        elif isinstance(outcome, Hold):
            self.metrics.turns.labels("held").inc()
            await self._hold(outcome.error)
            await self.store.reschedule(
                row.id,
                self.clock() + self.hold_seconds,
                state=outcome.state,
                error="401: the API key was refused; held until it works again",
            )
        elif isinstance(outcome, WorkerUnknown):
            await self._worker_unknown(row, outcome)
        elif isinstance(outcome, Answer):
            replies = await self.replies.answer(row, outcome.answer, outcome.prefetched)
            await self._finish(
                row,
                InboundState.ANSWERED,
                None,
                replies,
                turn_seq=outcome.turn_seq,
                task_turns=outcome.task_turns,
                task_url=outcome.answer.task_url,
                turn_status="completed",
            )
            self.metrics.turns.labels("answered").inc()
            log.info("turn_answered", extra={"inbound": row.id, "task": row.task_id, "seq": outcome.turn_seq})
        elif isinstance(outcome, Command):
            self.metrics.turns.labels("command").inc()
            await self._command(row, outcome)
        else:
            assert isinstance(outcome, Notice), outcome  # every other outcome is handled above
            self.metrics.turns.labels(outcome.kind).inc()
            await self._notify(row, outcome)
        self.storage.clear()  # the outcome is committed: the store takes writes

    async def _advance(self, row: InboundRow, streamed: RunResult | None) -> Outcome:
        """One step of `row`; if it lasts until the turn's acknowledgement is due, acknowledge it (once)
        while the step goes on."""
        due = self._ack_due(row)
        if due is None:
            return await self.steps.advance(row, streamed)
        step = asyncio.create_task(self.steps.advance(row, streamed), name=f"step-{row.id}")
        try:
            while not step.done() and row.id not in self._acked:
                await asyncio.wait({step}, timeout=max(0.0, due - self.clock()))
                if not step.done():
                    await self._acknowledge(row)
                    due = self.clock() + ACK_RECHECK  # not yet running (a slow upload): look again
            return await step
        finally:
            if not step.done():  # this job was cancelled (a drain): the step goes with it
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    def _ack_due(self, row: InboundRow) -> float | None:
        """When the turn of `row` is to be acknowledged, or None when it never is (any more)."""
        after = self.settings.ack_after
        if after <= 0 or row.acked_at is not None or row.id in self._acked:
            return None
        if row.state not in (InboundState.QUEUED, InboundState.SUBMITTING, InboundState.RUNNING):
            return None
        started = row.started_at if row.state == InboundState.RUNNING and row.started_at else self.clock()
        return started + after

    async def _acknowledge(self, row: InboundRow) -> None:
        """Tell the sender the turn is being worked on, if it still is (`steps.acknowledgement`), and
        remember it on the row in the same transaction. A failure here is logged: the step goes on."""
        try:
            ack: Acknowledge | None = await self.steps.acknowledgement(row)
            if ack is None:
                return
            replies = await self.replies.acknowledgement(row, ack.task_url)
            await self.store.acknowledge(row.id, replies)
        except Exception:
            log.exception("acknowledgement_failed", extra={"inbound": row.id})
            return
        self._acked.add(row.id)
        if replies:
            self.on_outbox()
        log.info("turn_acknowledged", extra={"inbound": row.id, "task": row.task_id, "sent": len(replies)})

    async def _worker_unknown(self, row: InboundRow, outcome: WorkerUnknown) -> None:
        """Hold the message (queued, with the reason) and tell its sender once; ERROR once per alias."""
        self.metrics.turns.labels("worker_unknown").inc()
        if outcome.alias not in self._unknown_workers:
            self._unknown_workers.add(outcome.alias)
            log.error(
                "worker_unknown: the API does not know the worker MAILGATE_WORKERS names for this alias; "
                "its new mail is held, not lost: fix the worker id and restart mailgate",
                extra={"alias": outcome.alias, "worker": outcome.worker_id, "error": outcome.error},
            )
        told = row.task_id is not None and await self.store.count_notices_for_task(row.task_id, NOT_READY, 0)
        replies = [] if told else await self.replies.notice(row, NOT_READY)
        await self.store.reschedule(
            row.id, outcome.at, state=InboundState.QUEUED, error=outcome.error, replies=replies
        )
        if replies:
            self.on_outbox()
        log.info("message_held", extra={"inbound": row.id, "alias": outcome.alias, "why": "worker unknown"})

    async def _notify(self, row: InboundRow, notice: Notice) -> None:
        replies = await self.replies.notice(
            row,
            notice.kind,
            detail=notice.detail,
            task_url=notice.task_url,
            skipped=notice.skipped,
            once_per_thread_per_day=notice.once_per_thread_per_day,
        )
        await self._finish(
            row,
            InboundState.FAILED,
            notice.reason,
            replies,
            turn_seq=notice.turn_seq,
            task_turns=notice.task_turns,
            task_url=notice.task_url,
            turn_status=notice.turn_status,
            notice=notice.kind,
        )

    async def _command(self, row: InboundRow, command: Command) -> None:
        """Answer a command with its notice (if the notice limits let it go); the message is answered."""
        replies = await self.replies.notice(
            row, command.kind, detail=command.detail, task_url=command.task_url, details=command.details
        )
        reason = f"{command.command}: answered by the gateway" + (
            f" ({command.detail})" if command.detail else ""
        )
        if not replies:  # the row, not only a notice_suppressed line, says the sender got nothing
            reason += "; no reply sent (held back by the notice limits)"
        await self._finish(row, InboundState.ANSWERED, reason, replies, notice=command.kind)

    async def _finish(
        self,
        row: InboundRow,
        state: InboundState,
        reason: str | None,
        replies: list[NewReply],
        *,
        notice: str | None = None,
        **task: Any,
    ) -> None:
        await self.store.finish(row.id, state, reason, replies, task_id=row.task_id, **task)
        self.spool.remove(row.id)
        if replies:
            self.on_outbox()
        self.metrics.messages.labels(str(state)).inc()
        fields = {
            "inbound": row.id,
            "task": row.task_id,
            "sender": row.sender,
            "state": str(state),
            "reason": reason,
            "notice": notice if replies else None,
        }
        # a failed message is something an operator may have to look at; an answer is routine
        log.log(
            logging.WARNING if state == InboundState.FAILED else logging.INFO, "message_done", extra=fields
        )

    async def _stalled(self, row: InboundRow, exc: Exception) -> None:
        """Pause everything for a while; the message keeps its state and is tried again after the pause.
        The row is put right before the pause begins, so whoever sees the pause sees the row at rest."""
        if row.state == InboundState.RECEIVED:  # the crash counted before reading the body was not one
            with contextlib.suppress(Exception):
                await self.store.count_crash(row.id, row.crashes)
        self.storage.trip(f"{type(exc).__name__}: {exc}")

    async def _crashed(self, row: InboundRow, exc: Exception) -> None:
        log.exception("message_crashed", extra={"inbound": row.id})
        self.metrics.turns.labels("crashed").inc()
        fresh = await self.store.inbound(row.id) or row
        crashes = fresh.crashes + (0 if fresh.state == InboundState.RECEIVED else 1)
        if crashes >= self.settings.max_processing_attempts:
            await self._quarantine(fresh, f"{type(exc).__name__}: {exc}"[:300], crashes=crashes)
            return
        delay = backoff(crashes, base=self.steps.timing.retry_base)
        await self.store.reschedule(
            row.id, self.clock() + delay, crashes=crashes, error=f"{type(exc).__name__}: {exc}"
        )

    async def _quarantine(self, row: InboundRow, why: str, *, crashes: int | None = None) -> None:
        """Stop trying a message that keeps failing: `failed` with the error, and a notice."""
        count = row.crashes if crashes is None else crashes
        log.error("message_quarantined", extra={"inbound": row.id, "crashes": count, "error": why})
        try:
            replies = await self.replies.notice(row, "gave_up")
        except Exception:  # the notice itself may be what fails: the row must still come to rest
            log.exception("notice_failed", extra={"inbound": row.id, "kind": "gave_up"})
            replies = []
        await self._finish(
            row,
            InboundState.FAILED,
            f"quarantined after {count} failed attempts: {why}",
            replies,
            notice="gave_up",
        )

    async def _resumed(self) -> None:
        self._hold_until = 0.0
        if self._held:
            self._held = False
            log.warning("api_key_accepted: the API answers again; held messages resume")
            await self.store.clear_api_hold()

    async def _hold(self, error: str) -> None:
        """Hold every turn; the first time, record the hold in the store for `mailgate status`."""
        now = self.clock()
        if not self._held:
            await self.store.set_api_hold(now, error)
        self._held = True
        self._hold_reason = error
        self._hold_until = now + self.hold_seconds
        if now - self._last_loud >= LOUD_EVERY:
            self._last_loud = now
            log.error(
                "api_key_rejected: HANDINGER_API_KEY is missing, wrong or revoked; all messages are held and "
                "will be retried",
                extra={"error": error},
            )
