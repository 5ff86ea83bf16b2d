"""How a message's processing ends or pauses: the final commit (state and outbox rows in one transaction),
a retry after a transient API failure, a notice after a refusal, a crash count and quarantine.

A mixin of `Runner` (runner.py), which holds the state these use.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable

from mailgate.config import Settings
from mailgate.errors import ApiRejected, ApiUnavailable
from mailgate.models import InboundState, TaskSnapshot, Turn
from mailgate.render import SkippedFile
from mailgate.replies import Replies
from mailgate.spool import Spool
from mailgate.store import InboundRow, Statement, Store, update

log = logging.getLogger("mailgate.runner")


def backoff(attempt: int, *, base: float = 2.0, cap: float = 600.0, hint: float | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with full jitter, at least `hint`."""
    delay = random.uniform(base, min(cap, base * 2 ** max(0, attempt - 1)))
    return max(delay, hint or 0.0)


class Endings:
    settings: Settings
    store: Store
    replies: Replies
    spool: Spool
    on_outbox: Callable[[], None]
    clock: Callable[[], float]
    retry_base: float

    async def _finish(
        self,
        row: InboundRow,
        state: InboundState,
        reason: str | None,
        statements: list[Statement],
        snapshot: TaskSnapshot | None = None,
        turn: Turn | None = None,
    ) -> None:
        now = self.clock()
        todo = [
            *statements,
            update(
                "inbound",
                row.id,
                state=state,
                reason=reason,
                updated_at=now,
                next_attempt_at=0,
                turn_seq=turn.seq if turn else row.turn_seq,
            ),
        ]
        if snapshot is not None and row.task_id:
            todo.append(update("task", row.task_id, url=snapshot.url, turns=len(snapshot.turns)))
        await self.store.write(todo)
        self.spool.remove(row.id)
        if statements:
            self.on_outbox()
        log.info("message_done", extra={"inbound": row.id, "state": str(state), "reason": reason})

    async def _retry_later(self, row: InboundRow, exc: ApiUnavailable) -> None:
        fresh = await self.store.inbound(row.id) or row
        if self.clock() - fresh.received_at > self.settings.retry_horizon:
            statements = await self.replies.notice(fresh, "gave_up")
            await self._finish(
                fresh, InboundState.FAILED, f"gave up after the retry horizon: {exc}", statements
            )
            return
        delay = backoff(max(1, fresh.attempts), base=self.retry_base, hint=exc.retry_after)
        state = InboundState.RUNNING if fresh.state == InboundState.RUNNING else InboundState.QUEUED
        lost = fresh.state == InboundState.SUBMITTING and getattr(exc, "maybe_sent", True)
        if lost and not getattr(exc, "answered", False):
            state = InboundState.SUBMITTING  # no answer came: the next try lets the POST settle first
        log.warning(
            "api_unavailable", extra={"inbound": row.id, "error": str(exc), "retry_in": round(delay, 1)}
        )
        await self.store.set_inbound(
            row.id, state=state, next_attempt_at=self.clock() + delay, last_error=str(exc)
        )

    async def _rejected(self, row: InboundRow, exc: ApiRejected) -> None:
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
        statements = await self.replies.notice(fresh, kind, reason=exc.reason, once_per_thread_per_day=once)
        await self._finish(fresh, InboundState.FAILED, f"API {exc.status}: {exc.reason}", statements)

    async def _crashed(self, row: InboundRow, exc: Exception) -> None:
        log.exception("message_crashed", extra={"inbound": row.id})
        fresh = await self.store.inbound(row.id) or row
        crashes = fresh.crashes + (0 if fresh.state == InboundState.RECEIVED else 1)
        if crashes >= self.settings.max_processing_attempts:
            await self._quarantine(fresh, f"{type(exc).__name__}: {exc}"[:300], crashes=crashes)
            return
        delay = backoff(crashes, base=self.retry_base)
        await self.store.set_inbound(
            row.id,
            crashes=crashes,
            next_attempt_at=self.clock() + delay,
            last_error=f"{type(exc).__name__}: {exc}"[:500],
        )

    async def _quarantine(self, row: InboundRow, why: str, *, crashes: int | None = None) -> None:
        """Stop trying a message that keeps failing: `failed` with the error, and a notice."""
        count = row.crashes if crashes is None else crashes
        log.error("message_quarantined", extra={"inbound": row.id, "crashes": count, "error": why})
        try:
            statements = await self.replies.notice(row, "gave_up")
        except Exception:  # the notice itself may be what fails: the row must still come to rest
            log.exception("notice_failed", extra={"inbound": row.id, "kind": "gave_up"})
            statements = []
        await self._finish(
            row, InboundState.FAILED, f"quarantined after {count} failed attempts: {why}", statements
        )


def _skipped(data: str | None) -> list[SkippedFile]:
    return [SkippedFile(s["filename"], s["reason"]) for s in json.loads(data or "[]")]
