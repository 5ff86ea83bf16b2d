"""The outbox: delivers committed replies through the relay (or into the Maildir), with retries.

`pending -> sent`, or `retry` (relay 4xx, connection errors) with backoff until the horizon, then
`dead`; a relay 5xx is `dead` at once. Recipients refused one by one are recorded on the row (`refused`,
recipient -> the relay's reply); those refused with a 4xx are retried on their own (the row goes back to
`retry`). The message bytes, and so the Message-ID and the DKIM signature, never change between
attempts, with one exception: when the relay refuses a reply for its size (552) and the row has a
links-only version (`fallback`, stored and signed by `replies.compose`), that version replaces the bytes
for good and is sent at once, with the same Message-ID; it is `dead` only if that is refused too. A
`sent` row becomes `bounced` later, in admission, when a bounce comes back to its return path (the
envelope sender, one per row); the outbox never sends a `bounced` row again.

Which rows this gateway sends is a claim on them (`Store.claim_outbox`), handed back when the send ends;
an outcome the store refuses because another gateway took the row over (`LeaseLost`) is dropped.

When the store cannot take the outcome of an attempt (a full or failing disk), the outcome is kept in
memory and written once the store takes writes again, so a delivered reply is never sent twice; the
loop pauses meanwhile (`loops.Pause`), logging once a minute at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from mailgate.delivery.transports import Delivery
from mailgate.errors import DeliveryDeferred, DeliveryFailed, LeaseLost
from mailgate.loops import Pause, backoff, drain, storage_trouble, wait_event
from mailgate.metrics import Metrics
from mailgate.models import OutboxState
from mailgate.store import OutboxRow, Store

log = logging.getLogger("mailgate.outbox")


class Outbox:
    def __init__(
        self,
        store: Store,
        delivery: Delivery,
        *,
        horizon: float,
        parallel: int = 8,
        clock: Callable[[], float] = time.time,
        retry_base: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.delivery = delivery
        self.horizon = horizon
        self.parallel = parallel
        self.clock = clock
        self.retry_base = retry_base
        self._wake = asyncio.Event()
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._draining = False  # set by `drain`: no send starts after it (the store closes next)
        self._unrecorded: dict[str, dict[str, Any]] = {}  # outbox id -> an attempt's outcome to write
        self.storage = Pause("outbox_storage", log, base=retry_base, clock=clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch(self.metrics.jobs_in_hand.labels("outbox"), lambda: len(self._busy))
        self.metrics.watch(self.metrics.storage_paused.labels("outbox"), lambda: int(self.storage.tripped))

    def wake(self) -> None:
        self._wake.set()

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
        """Write outcomes kept in memory, start the sends that are due; return how long to wait."""
        now = self.clock()
        if now < self.storage.until:
            return self.storage.until - now
        for outbox_id, outcome in list(self._unrecorded.items()):
            with contextlib.suppress(LeaseLost):  # another gateway took the row: its outcome counts
                await self.store.record_delivery(outbox_id, **outcome)
            del self._unrecorded[outbox_id]
        self.storage.clear()
        free = self.parallel - len(self._busy)
        if free > 0 and not self._draining:
            for row in await self.store.claim_outbox(now, free, set(self._busy) | set(self._unrecorded)):
                if self._draining:  # the drain began while the claim was on its way: hand it back
                    await self.store.release_outbox(row.id)
                else:
                    self._busy[row.id] = asyncio.create_task(self._send(row), name=f"outbox-{row.id}")
        # rows due already are being sent or wait for a free sender (which wakes us when done)
        due = await self.store.next_due_after("outbox", now)
        return 5.0 if due is None else min(5.0, max(0.05, due - self.clock()))

    async def drain(self, timeout: float) -> int:
        """Start nothing more; wait up to `timeout` for the sends in hand, cancel the rest, close kept
        relay connections."""
        self._draining = True
        cancelled = await drain(self._busy, timeout, log, "outbox")
        await self.delivery.aclose()
        return cancelled

    async def _send(self, row: OutboxRow) -> None:
        try:
            await self._attempt(row)
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:
            log.warning("lease_lost", extra={"outbox": row.id, "error": str(exc)})
        except Exception as exc:
            if storage_trouble(exc):  # the row stays due; the loop pauses
                self.storage.trip(f"{type(exc).__name__}: {exc}")
            else:  # never lose the row: treat as a deferral
                log.exception("outbox_crashed", extra={"outbox": row.id})
                await self._defer(row, f"{type(exc).__name__}: {exc}")
        finally:
            if row.id not in self._unrecorded:  # an outcome kept in memory still needs the claim
                await self.store.release_outbox(row.id)
            self._busy.pop(row.id, None)
            self._wake.set()

    async def _attempt(self, row: OutboxRow) -> None:
        attempts = row.attempts + 1
        earlier: dict[str, str] = json.loads(row.refused) if row.refused else {}
        # a retry after a partial delivery goes only to the recipients the relay deferred (4xx)
        waiting = [r for r in row.recipient_list if earlier.get(r, "").startswith("4")]
        recipients = waiting if row.state == OutboxState.RETRY and waiting else row.recipient_list
        try:
            report = await self.delivery.deliver(row.data, mail_from=row.mail_from, recipients=recipients)
        except DeliveryDeferred as exc:
            await self._defer(row, str(exc))
            return
        except DeliveryFailed as exc:
            if exc.too_large and row.fallback is not None:
                log.warning(
                    "outbox_too_large",
                    extra=_fields(row, recipients)
                    | {
                        "error": str(exc),
                        "size": len(row.data),
                        "now": len(row.fallback),
                    },
                )
                await self.store.use_fallback(row.id)
                await self._attempt(replace(row, data=row.fallback, fallback=None))
                return
            log.error("outbox_dead", extra=_fields(row, recipients) | {"error": str(exc)})
            await self._record(row, OutboxState.DEAD, attempts=attempts, error=str(exc))
            return
        now = self.clock()
        if row.sent_at is None:
            self.metrics.end_to_relay_seconds.observe(max(0.0, now - row.created_at))
        refused = {r: why for r, why in earlier.items() if r not in report.accepted} | report.refused
        deferred = [r for r, why in refused.items() if why.startswith("4")]
        log.info(
            "outbox_sent",
            extra=_fields(row, report.accepted)
            | {"reply": report.response, "refused": [f"{r} ({why})" for r, why in report.refused.items()]},
        )
        state, error, at = OutboxState.SENT, None, 0.0
        if deferred:  # delivered to some; the deferred recipients are tried again on their own
            error = f"deferred for {', '.join(deferred)}: {refused[deferred[0]]}"
            if now - row.created_at > self.horizon:
                state = OutboxState.DEAD
            else:
                state, at = OutboxState.RETRY, now + backoff(attempts, base=self.retry_base, cap=1800.0)
                self.metrics.retries.labels("relay").inc()
        await self._record(
            row,
            state,
            attempts=attempts,
            error=error,
            next_attempt_at=at,
            refused=refused,
            sent_at=row.sent_at or now,
            reply=report.response,
        )

    async def _defer(self, row: OutboxRow, error: str) -> None:
        attempts = row.attempts + 1
        fields = _fields(row, row.recipient_list) | {"error": error}
        if self.clock() - row.created_at > self.horizon:
            log.error("outbox_dead", extra=fields | {"why": "retry horizon"})
            await self._record(row, OutboxState.DEAD, attempts=attempts, error=error)
            return
        delay = backoff(attempts, base=self.retry_base, cap=1800.0)
        log.warning("outbox_deferred", extra=fields | {"retry_in": round(delay, 1)})
        self.metrics.retries.labels("relay").inc()
        await self._record(
            row, OutboxState.RETRY, attempts=attempts, error=error, next_attempt_at=self.clock() + delay
        )

    async def _record(self, row: OutboxRow, state: str, **outcome: Any) -> None:
        """Write an attempt's outcome; when the store cannot take it, keep it for later and pause."""
        self.metrics.deliveries.labels(row.notice or row.kind, str(state)).inc()
        outbox_id = row.id
        try:
            await self.store.record_delivery(outbox_id, state, **outcome)
        except Exception as exc:
            if not storage_trouble(exc):
                raise
            self._unrecorded[outbox_id] = {"state": state, **outcome}
            self.storage.trip(f"{type(exc).__name__}: {exc}")


def _fields(row: OutboxRow, recipients: Sequence[str]) -> dict[str, Any]:
    """What an outbox log line says of its row: which reply, of which message, to whom."""
    return {
        "outbox": row.id,
        "kind": row.notice or row.kind,
        "inbound": row.inbound_id,
        "message_id": row.message_id,
        "recipients": list(recipients),
    }
