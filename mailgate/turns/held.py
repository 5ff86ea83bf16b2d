"""Held mail (MAILGATE_UNKNOWN_SENDERS=hold): its sender told once, and dropped after HELD_DAYS.

Admission commits the mail of an authenticated sender who is on neither allow list (MAILGATE_ALLOWED_
SENDERS, the stored one) as `held` and answers 250. This loop, beside the scheduler:

- tells the sender once that the message waits for approval: a `held` notice (through the notice
  limits), unless one already went to that sender within HELD_DAYS; the row remembers it (`told_at`) in
  the transaction that queues the notice, so neither a restart nor a second gateway tells again. In a
  reply storm nobody is told (nor marked told) until it is over;
- every minute drops held mail older than HELD_DAYS (`ignored`, one WARNING `held_dropped` line each),
  and forgets the loop breaker's record of replies older than a day.

The operator decides with `mailgate approve ID [--always]` (`held -> received`: the scheduler runs it as
any message; `--always` puts the sender on the stored allow list) or `mailgate deny ID` (`ignored`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mailgate.config import Settings
from mailgate.loops import storage_trouble, wait_event
from mailgate.models import HELD_DAYS
from mailgate.replies.compose import Replies
from mailgate.store import Store

log = logging.getLogger("mailgate.turns")

DAY = 86400.0
HELD = "held"  # the notice kind
SWEEP_EVERY = 60.0


class HeldMail:
    """Tells the senders of held mail and drops what waited too long. `wake()` after new mail; `run()`
    until cancelled."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        replies: Replies,
        *,
        on_outbox: Callable[[], None] = lambda: None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.replies = replies
        self.on_outbox = on_outbox
        self.interval = interval
        self.clock = clock
        self._wake = asyncio.Event()
        self._swept = float("-inf")

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception as exc:  # the store may fail for a while: look again later
                log.warning("held_mail_failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            await wait_event(self._wake, self.interval)

    async def tick(self) -> None:
        """Tell the senders of held mail not told yet; once a minute, drop what waited too long."""
        now = self.clock()
        if now - self._swept >= SWEEP_EVERY:
            self._swept = now
            for row in await self.store.drop_held(now - HELD_DAYS * DAY):
                log.warning(
                    "held_dropped: neither approved nor denied in time",
                    extra={"inbound": row.id, "sender": row.sender, "days": HELD_DAYS},
                )
            await self.store.forget_replies(now - DAY)
        if self.settings.unknown_senders != "hold":
            return  # nothing new is held; what an earlier configuration held waits for the operator
        if await self.replies.limits.storm():
            return  # notices pause in a reply storm: the senders are told after it, not marked told now
        for row in await self.store.held_untold():
            assert row.sender is not None
            told = await self.store.count_notices(row.sender, now - HELD_DAYS * DAY, HELD)
            try:
                replies = [] if told else await self.replies.notice(row, HELD)
            except Exception as exc:
                if storage_trouble(exc):
                    raise  # the store's trouble, nobody's message: the whole pass is tried again later
                # this message's notice cannot be made: marked told all the same (or it would fail on
                # every pass and hold up the senders after it)
                log.warning(
                    "held_notice_failed", extra={"inbound": row.id, "error": f"{type(exc).__name__}: {exc}"}
                )
                replies = []
            if await self.store.tell_held(row.id, replies) and replies:
                self.on_outbox()
            log.info(
                "message_held",
                extra={
                    "inbound": row.id,
                    "sender": row.sender,
                    "told": bool(replies),
                    "why": "unknown sender",
                },
            )
