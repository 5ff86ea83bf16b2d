"""The runner (turn scheduler and outbox) in a process of its own, beside the SMTP listener's.

With MAILGATE_RUNNER=process (or `auto` on a machine with two or more CPUs), `serve` is two processes:
the first keeps the SMTP/LMTP listeners, admission and `/metrics`; the second (`python -m
mailgate.runner_main`, an entry point like `cli`, started and watched by the first) runs the turns
and delivers the replies. Python runs
one thread at a time per process, so in one process every turn's rendering, stream and HTTP parsing
competes with the SMTP sessions for the same interpreter; in two, acceptance keeps a core to itself
(bench/sustained_accept.py). The store is the hand-off, as it is between stages in one process: the
listener commits each accepted message before its 250, the runner claims it from there.

What the two share, and how:

- **The instance lock** (`store/lock.py`). The listener takes it; the runner inherits the same open file
  (`pass_fds`), so the `flock` is held until *both* have exited: a second `serve` cannot start while a
  runner of the first still works (two runners on one SQLite store would post a turn twice).
- **The SQLite file.** Each process has its own connections (WAL: one writer at a time, the other waits
  in SQLite's busy handler, up to `busy_timeout`). Only the runner claims messages and replies, so the
  claims stay each loop's own busy set, as in one process.
- **A control socket** (a socketpair; the runner's end is passed by number in MAILGATE_RUNNER_FD). The
  listener writes `w` after each accepted message (the runner's scheduler wakes at once; a wake already
  on its way is not repeated), `s` to ask for the runner's status (one JSON line back: the API hold,
  storage pauses, its metrics for `/metrics`) and `q` to stop (the runner drains its jobs, as `serve`
  does on SIGTERM, and exits). The settings go first, as one pickled frame.
- **Its life.** The runner dies with the listener (`PR_SET_PDEATHSIG`, and the control socket's end):
  a killed gateway is a killed gateway, whatever process was hit. A runner that exits on its own is
  logged (ERROR `runner_exited`) and started again with back-off; meanwhile `/readyz` says so and
  accepted mail waits in the store. One that does not say `ready` within START_TIMEOUT is killed (and
  so started again the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import socket
import struct
import sys
from typing import Any

from mailgate.config import Settings

log = logging.getLogger("mailgate.runner")

FD_ENV = "MAILGATE_RUNNER_FD"
WAKE, STATUS, QUIT = b"w", b"s", b"q"
STATUS_TIMEOUT = 5.0
START_TIMEOUT = 60.0  # seconds a new runner has to say `ready` (it opens the store the listener opened)


class RunnerProcess:
    """The listener's handle on the runner process: start it, wake it, ask its status, stop it."""

    def __init__(self, settings: Settings, lock_fd: int | None, *, shutdown_deadline: float) -> None:
        self.settings = settings
        self.lock_fd = lock_fd
        self.shutdown_deadline = shutdown_deadline
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._status_lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._late = 0  # status answers still owed by the runner after a timeout (read and dropped)
        self.command = [sys.executable, "-m", "mailgate.runner_main"]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None and self._writer is not None and not self._writer.is_closing()

    async def start(self) -> None:
        """Start the runner and wait until it says it runs (`RuntimeError` when it cannot start)."""
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="runner-process")

    async def _spawn(self) -> None:
        mine, theirs = socket.socketpair()
        try:
            fds = [theirs.fileno(), *([self.lock_fd] if self.lock_fd is not None else [])]
            env = {**os.environ, FD_ENV: str(theirs.fileno())}
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                pass_fds=fds,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_connection(sock=mine)
        self._late = 0
        frame = pickle.dumps(self.settings)
        self._writer.write(struct.pack("!I", len(frame)) + frame)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await self._reader.readline()
        except TimeoutError:  # hung while starting: killed, and (from `_supervise`) started again
            self._writer.close()
            self._proc.kill()
            await self._proc.wait()
            raise RuntimeError(f"the runner process did not say ready within {START_TIMEOUT:g} s") from None
        if line.strip() != b"ready":
            self._writer.close()
            code = await self._proc.wait()
            said = line.decode(errors="replace").strip()
            raise RuntimeError(f"the runner process did not start (exit {code}): {said}")
        log.info("runner_started", extra={"pid": self._proc.pid})

    async def _supervise(self) -> None:
        """Start the runner again whenever it exits while the listener runs."""
        loop = asyncio.get_running_loop()
        delay, since = 1.0, loop.time()
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if loop.time() - since > 60.0:  # it ran a while: this exit is not part of a crash loop
                delay = 1.0
            if self._writer is not None:
                self._writer.close()
            if self._stopping:
                return
            log.error("runner_exited: started again; accepted mail waits in the store", extra={"code": code})
            await asyncio.sleep(delay)
            delay = min(60.0, delay * 2)
            try:
                await self._spawn()
                self.restarts += 1
            except (OSError, RuntimeError) as exc:
                log.error("runner_start_failed", extra={"error": str(exc)})
            since = loop.time()  # a start that failed does not reset the back-off either

    def wake(self) -> None:
        """New work is committed: wake the runner's scheduler (a wake still on its way is enough)."""
        writer = self._writer
        if writer is not None and not writer.is_closing() and writer.transport.get_write_buffer_size() == 0:
            writer.write(WAKE)

    async def status(self) -> dict[str, Any] | None:
        """The runner's status (`held`, `paused`, `metrics`), or None when it does not answer."""
        async with self._status_lock:
            writer, reader = self._writer, self._reader
            if writer is None or reader is None or writer.is_closing():
                return None
            try:
                writer.write(STATUS)
                async with asyncio.timeout(STATUS_TIMEOUT):
                    while True:  # an answer that came too late for its request is not this one's
                        line = await reader.readline()
                        if not self._late:
                            break
                        self._late -= 1
                answer: dict[str, Any] = json.loads(line)
            except TimeoutError:
                self._late += 1
                return None
            except (OSError, ValueError):
                return None
            return answer

    async def stop(self) -> None:
        """Ask the runner to drain and exit; kill it when it outlasts the deadline."""
        self._stopping = True
        proc, writer = self._proc, self._writer
        if proc is not None and proc.returncode is None:
            if writer is not None and not writer.is_closing():
                with contextlib.suppress(OSError):
                    writer.write(QUIT)
            try:
                async with asyncio.timeout(self.shutdown_deadline + 5.0):
                    await proc.wait()
            except TimeoutError:
                log.warning("runner_killed: it did not stop in time", extra={"pid": proc.pid})
                proc.kill()
                await proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if writer is not None:
            writer.close()
