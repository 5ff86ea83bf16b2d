"""Shows that the probes of `bench/_loopprobe.py` see a stall.

Run: `.venv/bin/python bench/_loopprobe_selftest.py` (about 2 s).

1. `LoopLagProbe` on an idle loop, then around a coroutine that calls `time.sleep(0.2)` on the loop.
2. `SmtpNoopProbe` against an aiosmtpd server whose loop (in another thread, so the probe's own loop
   stays free) is idle, then made to `time.sleep(0.2)`.

Each stall must show as a maximum of at least 180 ms while the idle runs stay well under it; the
script prints the reports and exits 1 when a probe misses the stall (or sees one when idle).
"""

from __future__ import annotations

import asyncio
import threading
import time

from _loopprobe import LagReport, LoopLagProbe, SmtpNoopProbe
from aiosmtpd.smtp import SMTP

STALL = 0.2
SEEN = 0.18  # a stall of STALL must show at least this
IDLE_MAX = 0.1  # an idle run must stay under this (generous: the machine is shared)


def check(what: str, report: LagReport, stalled: bool) -> bool:
    ok = report.max >= SEEN if stalled else report.max < IDLE_MAX
    print(f"   {'ok  ' if ok else 'FAIL'} {what}: {report}")
    return ok


async def loop_probe() -> list[bool]:
    with LoopLagProbe() as idle:
        await asyncio.sleep(0.3)
    results = [check("idle loop", idle.report(), stalled=False)]

    async def blocking_workload() -> None:
        await asyncio.sleep(0.1)
        time.sleep(STALL)  # the deliberate mistake: blocks the loop  # noqa: ASYNC251
        await asyncio.sleep(0.1)

    async with LoopLagProbe() as busy:
        await blocking_workload()
    report = busy.report()
    results.append(check("time.sleep(0.2) on the loop", report, stalled=True))
    results.append(report.p50 < IDLE_MAX and report.over == 1)
    if not results[-1]:
        print("   FAIL the stall should be one late wake-up, not many")
    return results


class _ServerThread:
    """An aiosmtpd server on its own loop in a thread, so a stall there leaves the probe's loop free."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, name="smtp server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(self.loop.create_server(lambda: SMTP(object()), "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    def __enter__(self) -> _ServerThread:
        self.thread.start()
        self.ready.wait(10)
        return self

    def stall(self, seconds: float) -> None:
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def smtp_probe() -> list[bool]:
    with _ServerThread() as server:
        async with SmtpNoopProbe("127.0.0.1", server.port) as idle:
            await asyncio.sleep(0.4)
        results = [check("idle SMTP server", idle.report(), stalled=False)]
        async with SmtpNoopProbe("127.0.0.1", server.port) as busy:
            await asyncio.sleep(0.1)
            server.stall(STALL)
            await asyncio.sleep(0.4)
        results.append(check("server loop blocked 0.2 s", busy.report(), stalled=True))
        async with SmtpNoopProbe("127.0.0.1", server.port) as cut_short:
            await asyncio.sleep(0.1)
            server.stall(STALL)
            await asyncio.sleep(0.1)  # stop while the NOOP still waits: its wait so far must count
        late = cut_short.report()
        results.append(late.max >= 0.08)
        print(f"   {'ok  ' if results[-1] else 'FAIL'} stopped 0.1 s into the stall: {late}")
    return results


async def main() -> int:
    print("== loop-stall probes: self-test")
    results = await loop_probe()
    results += await smtp_probe()
    print("   all probes saw what they should" if all(results) else "   SOME PROBES MISSED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
