"""Small helpers shared by the runner's and the outbox's background loops."""

from __future__ import annotations

import asyncio
import contextlib
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
