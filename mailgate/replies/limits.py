"""How much mail goes back: the notice limits and the loop breaker.

Notices (a failure, a hold, the acknowledgement of a long turn, the answer to `/status`, ...) are sent
only while every limit allows, checked in this order; the first that refuses says why in a
`notice_suppressed` line:

1. never to an address whose replies keep bouncing (the suppression list);
2. none while the whole gateway is in a reply storm: more than MAILGATE_MAX_REPLIES_PER_MINUTE replies
   due in the last minute (every gateway on the store counted). The failure stays on the message's row
   (`mailgate messages --state failed`, `mailgate replay`); answers still queue;
3. at most MAILGATE_MAX_NOTICES_PER_DAY notices to one sender a day;
4. some kinds at most once per thread per day;
5. at most MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR answers and notices to one address in an hour.

Answers are never dropped: an answer to an address that had its hour's replies waits in the outbox
(`next_attempt_at`) until it fits, a sliding hour after the replies that filled it. Two systems
answering each other are held to that pace, whatever the per-thread limit of admission lets through.
Every reply's place under the hourly limit is taken in the store in one transaction
(`Store.reserve_reply`), so replies composed at the same moment, on one gateway or several, count each
other; a place taken for a reply that is then not queued (a crash between) still counts for the hour.

A storm is logged once, at ERROR, when it begins (`reply_storm`), and at WARNING when a later count
finds it over; the state is this gateway's, in memory. The store is counted at most once a second;
between counts this gateway adds the replies it placed itself (other gateways' show at the next count).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from mailgate.config import Settings
from mailgate.store import InboundRow, Store

log = logging.getLogger("mailgate.replies")

DAY = 86400.0
MINUTE = 60.0
RECOUNT_AFTER = 1.0  # seconds a count of the store stands (with this gateway's replies added meanwhile)


class ReplyLimits:
    """The limits on what one gateway sends back (see the module docstring)."""

    def __init__(self, settings: Settings, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.storming = False  # a storm was logged and no count has found it over since
        self._counted = (float("-inf"), 0)  # (when, how many) the store last counted
        self._since = 0  # replies this gateway placed since that count

    async def may_notify(
        self, row: InboundRow, kind: str, *, outbox_id: str, once_per_thread_per_day: bool = False
    ) -> bool:
        """May the sender of `row` get a notice of `kind` now? When it may, its place under the hourly
        limit is taken (for the reply `outbox_id`)."""
        if row.sender is None:
            return False
        now = self.clock()
        settings = self.settings
        if await self.store.is_suppressed(row.sender):
            why, level = "the address bounces our replies (mailgate suppressed)", logging.WARNING
        elif await self.storm():
            why, level = "reply storm: notices pause (MAILGATE_MAX_REPLIES_PER_MINUTE)", logging.WARNING
        elif await self.store.count_notices(row.sender, now - DAY) >= settings.max_notices_per_day:
            why, level = "daily notice limit", logging.WARNING
        elif (
            once_per_thread_per_day
            and row.task_id
            and await self.store.count_notices_for_task(row.task_id, kind, now - DAY)
        ):
            why, level = "already told today", logging.INFO
        elif (
            await self.store.reserve_reply(
                outbox_id, [row.sender], now, settings.max_replies_per_address_per_hour, wait=False
            )
            is None
        ):
            why, level = "hourly reply limit (MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR)", logging.WARNING
        else:
            self._since += 1
            return True
        log.log(level, "notice_suppressed", extra={"inbound": row.id, "kind": kind, "why": why})
        return False

    async def answer_at(self, row: InboundRow, recipients: Sequence[str], *, outbox_id: str) -> float:
        """When the answer `outbox_id` to `recipients` may go (its place taken): now (0.0), or when the
        last of them whose hour is full has room again."""
        await self.storm()  # answers are never held for a storm, but one is noticed (and logged)
        now = self.clock()
        limit = self.settings.max_replies_per_address_per_hour
        at = await self.store.reserve_reply(outbox_id, recipients, now, limit, wait=True)
        self._since += 1
        if at is None or at <= now:
            return 0.0
        log.warning(
            "answer_deferred",
            extra={
                "inbound": row.id,
                "until": round(at, 1),
                "why": "hourly reply limit (MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR)",
            },
        )
        return at

    async def storm(self) -> bool:
        """Is the gateway in a reply storm now? Logs its start (ERROR, once) and its end."""
        now = self.clock()
        limit = self.settings.max_replies_per_minute
        counted_at, counted = self._counted
        if now - counted_at < RECOUNT_AFTER:  # recently counted: add what this gateway placed since
            count = counted + self._since
        else:
            count = await self.store.count_replies(now - MINUTE, now, limit)
            self._counted, self._since = (now, count), 0
        if count >= limit and not self.storming:
            self.storming = True
            log.error(
                "reply_storm: the gateway sends more than MAILGATE_MAX_REPLIES_PER_MINUTE replies; "
                "notices pause (answers still queue) until the rate falls: look for a mail loop",
                extra={"replies_last_minute": count, "limit": limit},
            )
        elif count < limit and self.storming:
            self.storming = False
            log.warning("reply_storm_over", extra={"replies_last_minute": count, "limit": limit})
        return self.storming
