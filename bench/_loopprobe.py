"""Stall probes for benchmarks: how late an asyncio loop wakes up, and how long an SMTP server takes to
answer NOOP, while a workload runs. Standard library only; usable from any benchmark or test.

```python
async with LoopLagProbe() as loop_lag, SmtpNoopProbe("127.0.0.1", smtp_port) as smtp:
    await workload()
print(loop_lag.report())  # loop lag: 812 samples, p50 0.1 ms, p99 1.9 ms, max 203.4 ms, 1 over 50 ms
print(smtp.report())
```

`LoopLagProbe` measures the loop it runs in: a timer due every `interval` (5 ms) records how late
each wake-up came. A callback that holds the loop for 200 ms shows as one wake-up 200 ms late (the
next one is scheduled from the late wake-up, so a stall is counted once, not as 40 missed ticks): look
at `max` and `over` for stalls, at `p50`/`p99` for general sluggishness.

`SmtpNoopProbe` measures a server from the outside: one connection, a NOOP every `interval` (20 ms,
or at once when the last answer came later than that), the round trip of each. A NOOP still
unanswered when the probe stops counts with the time it has waited so far, so a stall that outlasts
the workload is not lost. Run it in another process than the server to see the server alone; in the
server's own loop it sees the loop's stalls too (which is what a remote client would also see, plus
the probe's own share of the loop).

Figures are in seconds; `LagReport.__str__` prints milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

__all__ = ["LagReport", "LoopLagProbe", "SmtpNoopProbe", "percentile"]


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile (nearest rank) of `values`; nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class LagReport:
    """What a probe saw: `samples` delays (seconds) and their summary."""

    name: str
    samples: tuple[float, ...]
    threshold: float = 0.05  # a delay over this counts in `over`
    errors: int = 0  # SMTP: unexpected replies or a lost connection

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    @property
    def max(self) -> float:
        return max(self.samples, default=float("nan"))

    @property
    def over(self) -> int:
        """How many delays exceeded `threshold`."""
        return sum(1 for s in self.samples if s > self.threshold)

    def __str__(self) -> str:
        errors = f", {self.errors} errors" if self.errors else ""
        return (
            f"{self.name}: {len(self.samples)} samples, p50 {self.p50 * 1000:.1f} ms, "
            f"p99 {self.p99 * 1000:.1f} ms, max {self.max * 1000:.1f} ms, "
            f"{self.over} over {self.threshold * 1000:.0f} ms{errors}"
        )


class LoopLagProbe:
    """Scheduling lag of the running loop, sampled every `interval` seconds between start and stop.

    Use as `with` or `async with` inside a coroutine (it needs the running loop), or call `start()`
    and `stop()`. `report()` may be called at any time; `stop()` returns it too.
    """

    def __init__(self, interval: float = 0.005, threshold: float = 0.05, name: str = "loop lag") -> None:
        self.interval = interval
        self.threshold = threshold
        self.name = name
        self.lags: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        if self._handle is not None:
            raise RuntimeError("the probe is already running")
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.lags.append(max(0.0, now - self._due))  # asyncio may run a timer a hair early
        self._schedule(now)

    def stop(self) -> LagReport:
        """Stop sampling; a wake-up already overdue counts with its lateness so far."""
        if self._handle is not None and self._loop is not None:
            self._handle.cancel()
            self._handle = None
            late = self._loop.time() - self._due
            if late > 0:
                self.lags.append(late)
        return self.report()

    def report(self) -> LagReport:
        return LagReport(self.name, tuple(self.lags), self.threshold)

    def __enter__(self) -> LoopLagProbe:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LoopLagProbe:
        return self.__enter__()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SmtpNoopProbe:
    """NOOP round trips to an SMTP (or LMTP) server at `host:port`, one every `interval` seconds.

    `async with SmtpNoopProbe(host, port) as probe:` connects and reads the greeting (raising
    `OSError` or `TimeoutError` when it cannot, within `connect_timeout`), then probes in the
    background until the block ends, and says QUIT. A reply other than 250, or a lost connection,
    counts in `errors` (probing stops at a lost connection), except the `421` with which an MTA ends a
    session after its junk-command limit (mailgate's: 100 NOOPs): the probe opens a new session and
    goes on (`reconnects`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        interval: float = 0.02,
        threshold: float = 0.1,
        connect_timeout: float = 10.0,
        name: str = "smtp NOOP",
    ) -> None:
        self.host = host
        self.port = port
        self.interval = interval
        self.threshold = threshold
        self.connect_timeout = connect_timeout
        self.name = name
        self.round_trips: list[float] = []
        self.sent: list[float] = []  # perf_counter when each NOOP went, parallel to round_trips
        self.errors = 0
        self.reconnects = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._sent_at: float | None = None  # perf_counter of the NOOP awaiting its answer

    async def __aenter__(self) -> SmtpNoopProbe:
        await self._connect()
        self._task = asyncio.get_running_loop().create_task(self._probe(), name="smtp noop probe")
        return self

    async def _connect(self) -> None:
        async with asyncio.timeout(self.connect_timeout):
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            code = await self._reply()
        if code != 220:
            self._writer.close()
            raise OSError(f"{self.host}:{self.port} greeted with {code}, not 220")

    async def _reply(self) -> int:
        """Read one (possibly multi-line) reply; its code, or 0 when the connection ended."""
        assert self._reader is not None
        while True:
            line = await self._reader.readline()
            if not line:
                return 0
            if line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else 0

    async def _probe(self) -> None:
        assert self._writer is not None
        while True:
            started = time.perf_counter()
            self._sent_at = started
            self._writer.write(b"NOOP\r\n")
            code = await self._reply()
            self._sent_at = None
            if code == 0:
                self.errors += 1
                return
            self.round_trips.append(time.perf_counter() - started)
            self.sent.append(started)
            if code == 421:  # the server's junk-command limit: a new session, and on
                self._writer.close()
                self.reconnects += 1
                try:
                    await self._connect()
                except OSError:
                    self.errors += 1
                    return
                continue
            if code != 250:
                self.errors += 1
            await asyncio.sleep(max(0.0, started + self.interval - time.perf_counter()))

    async def stop(self) -> LagReport:
        """Stop probing (an unanswered NOOP counts with its wait so far), say QUIT, close."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if self._sent_at is not None:
                self.round_trips.append(time.perf_counter() - self._sent_at)
                self.sent.append(self._sent_at)
                self._sent_at = None
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.write(b"QUIT\r\n")
                async with asyncio.timeout(2):
                    await self._reply()
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        return self.report()

    def report(self) -> LagReport:
        return LagReport(self.name, tuple(self.round_trips), self.threshold, self.errors)

    def between(self, start: float, end: float) -> list[float]:
        """Round trips of the NOOPs that were waiting at some moment between `start` and `end`
        (perf_counter values)."""
        return [
            rt for at, rt in zip(self.sent, self.round_trips, strict=True) if at <= end and at + rt >= start
        ]

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
