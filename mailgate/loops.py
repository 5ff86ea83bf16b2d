"""What the background loops (the turn scheduler and the outbox) share: waiting, draining, back-off."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterable


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event` at most `timeout` seconds.

    `asyncio.timeout`, not `wait_for`: on 3.11 `wait_for` can swallow a cancellation that races with the
    event being set, and a loop waiting on it would then never stop.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout, 0.01)):
            await event.wait()


async def drain(jobs: Iterable[asyncio.Task[None]], timeout: float) -> int:
    """Wait up to `timeout` for `jobs`, cancel the rest; returns how many were cancelled.

    A cancelled job leaves its row in a committed state, so the next start resumes it.
    """
    jobs = list(jobs)
    if not jobs:
        return 0
    _, pending = await asyncio.wait(jobs, timeout=timeout)
    for job in pending:
        job.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


def backoff(attempt: int, *, base: float = 2.0, cap: float = 600.0, hint: float | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with full jitter, at least `hint`."""
    delay = random.uniform(base, min(cap, base * 2 ** max(0, attempt - 1)))
    return max(delay, hint or 0.0)
