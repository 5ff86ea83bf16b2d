"""The runner process's own entry point (`python -m mailgate.runner_main`): the other end of
`runner.RunnerProcess`, which starts it. It reads its settings from the control socket, runs a `Gateway`
in the runner role and answers the listener's wake, status and stop requests (see `runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import pickle
import signal
import socket
import struct
import sys
import time

from mailgate import logs
from mailgate.config import Settings
from mailgate.loops import run_loop
from mailgate.runner import FD_ENV, QUIT, STATUS, WAKE
from mailgate.service import Gateway

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the listener dies (any other system: the socket's end)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


UNFREEZE_EVERY = 600.0  # seconds between full collections that walk the frozen objects too


class SurvivorFreezer:
    """Keeps the objects that outlived a full garbage collection out of the next ones.

    A full collection walks every tracked object while holding the interpreter: with 1,000 streams open
    ~250,000 of them, 90-180 ms of CPU and of loop stall each time (bench/loop_stall.py), and CPython
    runs one whenever a quarter more objects have outlived the younger collections (4 times in the ramp
    to 1,000 streams; every ~25 s while turns come and go). Objects that outlived one are mostly what
    lives as long as a stream or the process; frozen (`gc.freeze`, right after the collection), they
    are still freed by reference counting, only not walked, so the next full collection walks what
    appeared since. What it costs: a reference cycle among frozen objects that becomes garbage stays
    until they are all walked again, by the first full collection after `unfreeze_every` seconds (one
    long collection then, as before). Startup's objects (modules, classes, templates: ~50,000) are
    frozen by `install`, after collecting startup's garbage."""

    def __init__(self, unfreeze_every: float = UNFREEZE_EVERY) -> None:
        self.unfreeze_every = unfreeze_every
        self._walked = time.monotonic()

    def install(self) -> None:
        gc.collect()
        gc.freeze()
        self._walked = time.monotonic()
        gc.callbacks.append(self._after)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._after)

    def _after(self, phase: str, info: dict[str, int]) -> None:
        """A gc callback (in whichever thread collected): after a full collection, freeze."""
        if phase != "stop" or info["generation"] != 2:
            return
        if time.monotonic() - self._walked >= self.unfreeze_every:
            gc.unfreeze()  # the next full collection walks them all: garbage cycles among them go
            self._walked = time.monotonic()
        else:
            gc.freeze()


def _read_settings(sock: socket.socket) -> Settings:
    head = _read_exactly(sock, 4)
    settings: Settings = pickle.loads(_read_exactly(sock, struct.unpack("!I", head)[0]))  # noqa: S301 (our parent)
    return settings


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the listener went away")
        data += chunk
    return data


async def _serve(sock: socket.socket, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader, writer = await asyncio.open_connection(sock=sock)
    gateway = Gateway(settings, role="runner")
    try:
        await gateway.start()
    except Exception as exc:
        writer.write(f"failed: {exc}\n".encode())
        await writer.drain()
        raise
    freezer = SurvivorFreezer()
    freezer.install()
    writer.write(b"ready\n")

    async def control() -> None:
        while data := await reader.read(4096):
            if WAKE in data:
                gateway.wake_workers()
            for _ in range(data.count(STATUS)):  # one answer per request: the listener counts them
                writer.write(json.dumps(gateway.runner_status()).encode() + b"\n")
            if QUIT in data:
                stop.set()
                return
        os._exit(0)  # the listener is gone: so is the gateway (the rows say where to resume)

    commands = asyncio.create_task(control(), name="runner-control")
    try:
        await stop.wait()
    finally:
        commands.cancel()
        freezer.remove()
        await gateway.stop()
        writer.close()


def main() -> int:
    _die_with_parent()
    sock = socket.socket(fileno=int(os.environ.pop(FD_ENV)))
    settings = _read_settings(sock)
    logs.setup(settings.log_level, settings.log_format)
    run_loop(_serve(sock, settings), settings.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
