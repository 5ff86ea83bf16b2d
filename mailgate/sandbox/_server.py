"""Serving the sandbox with uvicorn in the caller's event loop: no threads, no signal handlers.

`run_sandbox` binds the socket itself (so a busy port raises `OSError` right away, before anything
starts), runs `uvicorn.Server` as a task of the current loop, and on leaving: cancels the running
turns (their streams end cut, blocked POSTs get 503), then stops the server and awaits it. uvicorn's
own signal handling is switched off, because the gateway process and the tests own the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass

import uvicorn

from mailgate.sandbox._app import create_app
from mailgate.sandbox._sse import QuietCut
from mailgate.sandbox._state import SandboxOptions, SandboxState

log = logging.getLogger("mailgate.sandbox")


@dataclass(frozen=True)
class RunningSandbox:
    """A sandbox serving at `url` ("http://127.0.0.1:PORT"), with its `state` open to inspection."""

    url: str
    state: SandboxState
    port: int


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers, telling when it is ready to accept."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        """uvicorn's loop (a tick per second for the Date header) that wakes at once on `stop()`."""
        counter = 0
        while not await self.on_tick(counter):
            counter += 10
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._stopping.wait()

    def stop(self) -> None:
        self.should_exit = True
        self._stopping.set()


@contextlib.asynccontextmanager
async def run_sandbox(
    options: SandboxOptions | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSandbox]:
    """Serve a fresh sandbox on `host:port` (0: any free port) for the duration of the block.

    Raises `OSError` when the address cannot be bound. Leaving the block stops the server within
    about half a second; turns still running are cancelled (status `aborted`).
    """
    state = SandboxState(options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): the accepted sockets inherit it, and asyncio sets TCP_NODELAY only on
    # sockets whose proto says TCP. Without it a response's body waits ~40 ms for the client's delayed
    # ACK of its head on every reused connection (Nagle), which real API servers do not do.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(state),
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = _Server(config)
    quiet = QuietCut()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="sandbox server")
    try:
        ready = asyncio.ensure_future(server.ready.wait())
        await asyncio.wait({ready, serving}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if serving.done():
            serving.result()  # re-raise why uvicorn could not start
            raise OSError(f"sandbox on {host}:{bound} stopped while starting")
        url_host = f"[{host}]" if family == socket.AF_INET6 else host
        yield RunningSandbox(url=f"http://{url_host}:{bound}", state=state, port=bound)
    finally:
        await state.aclose()
        server.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        sock.close()
        logging.getLogger("uvicorn.error").removeFilter(quiet)


async def serve_sandbox(options: SandboxOptions, host: str, port: int) -> None:
    """Serve the sandbox until cancelled (the `mailgate sandbox` verb). Logs the URL once ready."""
    async with run_sandbox(options, host, port) as sandbox:
        log.info("sandbox_listening", extra={"url": sandbox.url, "era": options.era})
        await asyncio.Event().wait()
