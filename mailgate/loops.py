"""What the background loops (the turn scheduler and the outbox) share: waiting, draining, back-off, and
pausing for a condition of the whole gateway (a refused API key, a full or failing disk)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from mailgate.errors import StoreBusy

# OS errors that say the disk, not the message, is the problem
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event` at most `timeout` seconds.

    `asyncio.timeout`, not `wait_for`: on 3.11 `wait_for` can swallow a cancellation that races with the
    event being set, and a loop waiting on it would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout, 0.01)):
            await event.wait()


async def drain(
    jobs: Mapping[str, asyncio.Task[None]], timeout: float, log: logging.Logger, loop: str
) -> int:
    """Wait up to `timeout` for `jobs` (row id -> job), cancel the rest; returns how many were cancelled.

    Says on `log` what it waits for (`shutdown_waiting`, the row ids) and what it cancelled
    (`shutdown_cancelled`). A cancelled job leaves its row in a committed state, so the next start
    resumes it.
    """
    named = dict(jobs)
    if not named:
        return 0
    log.info(
        "shutdown_waiting",
        extra={"loop": loop, "jobs": len(named), "ids": sorted(named)[:20], "deadline": timeout},
    )
    _, pending = await asyncio.wait(named.values(), timeout=timeout)
    for job in pending:
        job.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        cancelled = sorted(name for name, job in named.items() if job in pending)
        log.warning(
            "shutdown_cancelled: resumed at the next start",
            extra={"loop": loop, "jobs": len(cancelled), "ids": cancelled[:20]},
        )
    return len(pending)


def backoff(attempt: int, *, base: float = 2.0, cap: float = 600.0, hint: float | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with full jitter, at least `hint`."""
    delay = random.uniform(base, min(cap, base * 2 ** max(0, attempt - 1)))
    return max(delay, hint or 0.0)


def storage_trouble(exc: BaseException) -> bool:
    """Is `exc` the disk's or the database's fault (full, read-only, failing, locked), not a message's?"""
    if isinstance(exc, StoreBusy):
        return True
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


class Pause:
    """A pause of a whole loop for a condition that is nobody's message's fault (a refused API key, a full
    disk): `trip()` starts or lengthens it (back-off from `base` doubling to `cap`), `clear()` ends it.
    The condition is logged at ERROR when it starts and then at most once every `log_every` seconds, and
    once at WARNING when it clears. Nothing of it is written to the store (which may be what is failing).
    """

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        *,
        base: float = 1.0,
        cap: float = 60.0,
        log_every: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.log = log
        self.base = base
        self.cap = cap
        self.log_every = log_every
        self.clock = clock
        self.until = 0.0
        self.reason = ""
        self._delay = 0.0
        self._last_log = float("-inf")
        self.trips = 0  # how often it was tripped since it last cleared

    @property
    def active(self) -> bool:
        return self.clock() < self.until

    @property
    def tripped(self) -> bool:
        """Tripped and not cleared since (it may be between two tries)."""
        return self.trips > 0

    def trip(self, reason: str, *, delay: float | None = None) -> None:
        now = self.clock()
        self._delay = delay if delay is not None else min(self.cap, max(self.base, self._delay * 2))
        self.until = max(self.until, now + self._delay)
        self.reason = reason
        self.trips += 1
        if now - self._last_log >= self.log_every:
            self._last_log = now
            self.log.error(f"{self.name}_paused", extra={"reason": reason, "retry_in": round(self._delay, 1)})

    def clear(self) -> None:
        if self.trips:
            self.log.warning(f"{self.name}_resumed", extra={"after": self.trips})
        self.until = 0.0
        self._delay = 0.0
        self.trips = 0
        self._last_log = float("-inf")


LAG_EVERY = 0.01  # seconds between the loop-lag probe's wake-ups


async def measure_loop_lag(observe: Callable[[float], None], every: float = LAG_EVERY) -> None:
    """Until cancelled: a timer due every `every` seconds; `observe` how late each wake-up came. A
    callback that holds the loop for 200 ms shows as one wake-up 200 ms late (the next one is due
    `every` after the late one, so a stall counts once)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        observe(max(0.0, loop.time() - due))


def run_loop(coro: Any, event_loop: str = "auto") -> Any:
    """Run `coro` on uvloop when MAILGATE_EVENT_LOOP says so (`auto`: when it is installed), else on
    asyncio's own loop. uvloop's sockets, timers and thread wake-ups are C: the SMTP sessions cost the
    loop less (bench/sustained_accept.py)."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":  # checked at load already; only a broken install gets here
                raise
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
