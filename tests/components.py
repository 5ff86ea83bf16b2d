"""Test helpers: the turn stage wired as `service.Gateway.start` wires it, without the SMTP listener or
the outbox loop, so tests drive admission, the store and the scheduler directly.

    async with turn_stack(tmp_path, sandbox, MAILGATE_CONCURRENCY="1") as stack:
        replies = await stack.admission.accept("alice@example.org", [rcpt], raw)
        stack.scheduler.wake()

`ApiLog` is an httpx transport (an edge we do not own) that passes every request to the real one and
notes when it left and when its answer came back, so a test can say what happened while held.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mailgate.admission.admit import Admission
from mailgate.api import HandingerClient
from mailgate.config import Settings
from mailgate.replies.compose import Replies
from mailgate.replies.output_files import OutputFiles
from mailgate.replies.render import Renderer
from mailgate.sandbox import RunningSandbox
from mailgate.service import make_api_client, make_signer, open_store
from mailgate.store import InboundRow, Store
from mailgate.store.spool import Spool
from mailgate.turns.scheduler import Scheduler
from mailgate.turns.steps import Timing, TurnSteps
from tests.conftest import settings_for
from tests.mail import until


@dataclass(frozen=True)
class ApiCall:
    """One request to the API: when it left, when its answer's head came back, and the status."""

    method: str
    path: str
    started: float
    answered: float
    status: int


class ApiLog(httpx.AsyncBaseTransport):
    """The real httpx transport, with a note of every request (wall-clock times, as the scheduler's)."""

    def __init__(self) -> None:
        # the sandbox speaks plain HTTP on loopback: no certificate store to load (0.4 s per transport)
        self._inner = httpx.AsyncHTTPTransport(verify=False)
        self.calls: list[ApiCall] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.time()
        response = await self._inner.handle_async_request(request)
        self.calls.append(
            ApiCall(request.method, request.url.path, started, time.time(), response.status_code)
        )
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class TurnStack:
    """The components of the turn stage, sharing one store, with the scheduler running in the loop."""

    settings: Settings
    store: Store
    api: HandingerClient
    api_log: ApiLog
    spool: Spool
    replies: Replies
    scheduler: Scheduler
    admission: Admission
    _runner: asyncio.Task[None] | None = field(default=None, repr=False)

    async def row(self, inbound_id: str) -> InboundRow:
        row = await self.store.inbound(inbound_id)
        assert row is not None, inbound_id
        return row

    async def reached(self, inbound_id: str, *states: str, timeout: float = 10.0) -> InboundRow:
        """Wait until the message is in one of `states`; return its row."""

        async def check() -> bool:
            return (await self.row(inbound_id)).state in states

        await until(check, timeout=timeout, what=f"{inbound_id} in {states}")
        return await self.row(inbound_id)

    def start_scheduler(self) -> None:
        """Run the scheduler's loop in the background (as `Gateway.start` does)."""
        assert self._runner is None, "the scheduler already runs"
        self._runner = asyncio.create_task(self.scheduler.run(), name="scheduler")

    async def stop_scheduler(self, timeout: float = 0.0) -> int:
        """Drain the jobs in hand (cancelling what is left after `timeout`) and stop the scheduler."""
        cancelled = await self.scheduler.drain(timeout)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        return cancelled


@contextlib.asynccontextmanager
async def turn_stack(
    tmp_path: Path,
    sandbox: RunningSandbox,
    *,
    hold_seconds: float = 30.0,
    run: bool = True,
    **env: str,
) -> AsyncIterator[TurnStack]:
    """The store, API client, spool, replies, steps, scheduler and admission of `Gateway.start`, on
    `tmp_path`, talking to `sandbox`; the scheduler runs (after `reset_for_restart`) unless `run=False`."""
    settings = settings_for(tmp_path, sandbox.url, None, **env)
    store = await open_store(settings)
    api_log = ApiLog()
    api = make_api_client(settings, transport=api_log)
    try:
        secret = (settings.secret or await store.secret()).encode()
        spool = Spool(settings.spool_dir)
        timing = Timing(poll_base=0.05, retry_base=0.05, settle_seconds=0.2)
        replies = Replies(
            settings,
            store,
            Renderer(settings.templates_dir),
            OutputFiles(api, settings),
            secret,
            signer=make_signer(settings),
        )
        scheduler = Scheduler(
            settings,
            store,
            TurnSteps(settings, store, api, spool, timing, prefetch=replies.output_files.prefetch),
            replies,
            spool,
            hold_seconds=hold_seconds,
        )
        stack = TurnStack(
            settings, store, api, api_log, spool, replies, scheduler, Admission(settings, store, secret)
        )
        await store.reset_for_restart()
        if run:
            stack.start_scheduler()
        try:
            yield stack
        finally:
            await stack.stop_scheduler()
    finally:
        await api.aclose()
        await store.close()
