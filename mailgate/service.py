"""Wiring: the one place that builds the components, starts them, and stops them in order.

`open_store` and `make_api_client` are the factories every entry point uses (`serve`, `check` and the
operator verbs). Start-up: the store's instance lock (one gateway per store), the store (and the
reply-token secret), the API client, the turn scheduler, the outbox, the held-mail loop, then the
listeners; then, in the background, the API key and the worker ids are checked (an ERROR line per
problem; the gateway runs on).
Files that hold mail and are open to group or others get a WARNING each. With MAILGATE_METRICS_LISTEN,
`monitor.Monitor` serves `/metrics`, `/healthz` and `/readyz`; the `Gateway` is its probe (`refresh`,
`not_ready`), and its one `Metrics` registry is handed to every component. Shutdown: stop the listeners,
let jobs in hand finish within a deadline (saying which), cancel the rest (their rows say where to
resume), then close the monitor, the client and the store, and release the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import platform
import socket
import ssl
import stat
import time
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self

import httpx

from mailgate import checks, private, retention
from mailgate.admission.admit import Admission
from mailgate.api import HandingerClient
from mailgate.config import Listen, OperatorSettings, Settings
from mailgate.delivery.outbox import Outbox
from mailgate.delivery.transports import Delivery, make_delivery
from mailgate.errors import StartupError, StoreBusy
from mailgate.loops import measure_loop_lag
from mailgate.metrics import Metrics
from mailgate.models import InboundState, OutboxState
from mailgate.monitor import Monitor
from mailgate.replies.compose import Replies
from mailgate.replies.output_files import OutputFiles
from mailgate.replies.render import Renderer
from mailgate.replies.signing import DkimSigner
from mailgate.runner import RunnerProcess
from mailgate.smtp import data
from mailgate.smtp.handler import Handler
from mailgate.smtp.limits import FreeSpace, Limits
from mailgate.smtp.server import protocol_factory
from mailgate.store import InstanceLock, SqliteStore, Store
from mailgate.store.spool import Spool
from mailgate.turns.held import HeldMail
from mailgate.turns.scheduler import Scheduler
from mailgate.turns.steps import Timing, TurnSteps

log = logging.getLogger("mailgate.service")

Role = Literal["all", "listener", "runner"]
READY_WRITE_EVERY = 5.0  # seconds between the readiness probe's writes to the store


async def open_store(settings: Settings | OperatorSettings) -> Store:
    """The store MAILGATE_DATABASE names, migrated to the current schema: PostgreSQL for a
    `postgresql://` URL, else the SQLite file at the path. `StartupError` when it cannot be opened."""
    try:
        if settings.database_url is not None:
            from mailgate.store.postgres import PostgresStore  # the driver is an extra

            return await PostgresStore.open(settings.database_url, lease_seconds=settings.lease_seconds)
        return await SqliteStore.open(settings.database)
    except StoreBusy as exc:
        raise StartupError(f"the store at {settings.store_label} is unusable: {exc}") from exc


def make_api_client(
    settings: Settings | OperatorSettings,
    *,
    concurrency: int | None = None,
    timeout: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    metrics: Metrics | None = None,
) -> HandingerClient:
    """The Handinger client as the settings describe it (one per process). The operator verbs' settings
    name only the API's address and key (`archive` makes one request)."""
    if isinstance(settings, OperatorSettings):
        return HandingerClient(
            settings.base_url,
            settings.api_key,
            concurrency=1 if concurrency is None else concurrency,
            timeout=30.0 if timeout is None else timeout,
            transport=transport,
            metrics=metrics,
        )
    return HandingerClient(
        settings.base_url,
        settings.api_key,
        concurrency=settings.concurrency if concurrency is None else concurrency,
        timeout=settings.api_timeout if timeout is None else timeout,
        send_triggered_by=settings.send_triggered_by,
        files_field=settings.files_field,
        stream=settings.stream,
        transport=transport,
        output_hosts=settings.output_hosts,
        metrics=metrics,
    )


def make_signer(settings: Settings) -> DkimSigner | None:
    """The DKIM signer of MAILGATE_DKIM_SELECTOR and MAILGATE_DKIM_KEY (both checked at load), if set."""
    if settings.dkim_selector is None or settings.dkim_key is None:
        return None
    return DkimSigner.from_file(settings.dkim_selector, settings.domain, settings.dkim_key)


class Gateway:
    """The running daemon. `async with Gateway(settings) as gw:` starts it; leaving stops it."""

    def __init__(
        self,
        settings: Settings,
        *,
        api_transport: httpx.AsyncBaseTransport | None = None,
        delivery: Delivery | None = None,
        dkim_dns: Callable[..., Any] | None = None,
        shutdown_deadline: float = 10.0,
        poll_base: float = 1.0,
        retry_base: float = 2.0,
        hold_seconds: float = 30.0,
        settle_seconds: float = 5.0,
        prune_after: float = retention.FIRST,
        prune_every: float = retention.EVERY,
        role: Role = "all",
    ) -> None:
        self.settings = settings
        # "all": one process does everything; "listener": SMTP, admission and /metrics here, the runner
        # in a process of its own (`runner.RunnerProcess`); "runner": that process (no listeners)
        self.role = role
        self.runner: RunnerProcess | None = None
        self._api_transport = api_transport
        self._delivery = delivery
        self._dkim_dns = dkim_dns
        self.shutdown_deadline = shutdown_deadline
        self._timing = Timing(poll_base=poll_base, retry_base=retry_base, settle_seconds=settle_seconds)
        self._hold_seconds = hold_seconds
        self._prune_after, self._prune_every = prune_after, prune_every
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lock: InstanceLock | None = None
        self._monitor: Monitor | None = None
        self._stopping = False
        self._writable_at = float("-inf")  # when the store last took the readiness probe's write
        self.metrics = Metrics()  # this gateway's registry: several gateways may share a process
        self.store: Store
        self.scheduler: Scheduler
        self.outbox: Outbox
        self.held_mail: HeldMail
        self.api: HandingerClient

    @property
    def smtp_port(self) -> int:
        return int(self._servers[0].sockets[0].getsockname()[1])

    @property
    def lmtp_address(self) -> Any:
        return self._servers[1].sockets[0].getsockname() if len(self._servers) > 1 else None

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics`, `/healthz` and `/readyz` are served on (None: MAILGATE_METRICS_LISTEN off)."""
        return self._monitor.port if self._monitor is not None else None

    async def start(self) -> None:
        s = self.settings
        keep_big_buffers_out_of_the_heap()
        # one gateway per SQLite store: the runner process shares the listener's lock (it inherits it)
        if s.database_url is None and self.role != "runner":
            self._lock = InstanceLock.acquire(s.database)
        try:
            self.store = await open_store(s)
        except BaseException:
            self._release()
            raise
        if self.role != "runner":
            self._warn_exposed()
        process = {"all": "gateway", "listener": "listener", "runner": "runner"}[self.role]
        lag = self.metrics.loop_lag_seconds.labels(process)
        self._tasks.append(asyncio.create_task(measure_loop_lag(lag.observe), name="loop-lag"))
        secret = (s.secret or await self.store.secret()).encode()
        if self.role == "listener":
            self.runner = RunnerProcess(
                s, self._lock.fd if self._lock else None, shutdown_deadline=self.shutdown_deadline
            )
            try:
                await self.runner.start()
            except (OSError, RuntimeError) as exc:
                await self.stop()
                raise StartupError(f"cannot start the runner process: {exc}") from exc
            on_accepted = self.runner.wake
        else:
            await self._start_runner(secret)
            on_accepted = self.wake_workers
        if self.role == "runner":
            self._tasks.append(asyncio.create_task(self._check_api(), name="api-check"))
            log.info("runner_ready", extra={"api": s.base_url, "concurrency": s.concurrency})
            return
        await self._start_listeners(secret, on_accepted)
        if self.role == "all":
            self._tasks.append(asyncio.create_task(self._check_api(), name="api-check"))

    async def _start_runner(self, secret: bytes) -> None:
        """The API client, the outbox and the turn scheduler, and their loops."""
        s = self.settings
        metrics = self.metrics
        self.api = make_api_client(s, transport=self._api_transport, metrics=metrics)
        delivery = self._delivery or make_delivery(s)
        # the relay is retried a little more patiently than the API (5 s base with the default 2 s)
        self.outbox = Outbox(
            self.store,
            delivery,
            horizon=s.retry_horizon,
            retry_base=self._timing.retry_base * 2.5,
            metrics=metrics,
        )
        spool = Spool(s.spool_dir)
        replies = Replies(
            s,
            self.store,
            Renderer(s.templates_dir),
            OutputFiles(self.api, s),
            secret,
            eight_bit=partial(getattr, delivery, "eight_bit"),  # the transport's flag, read at each reply
            signer=make_signer(s),
        )
        steps = TurnSteps(
            s,
            self.store,
            self.api,
            spool,
            self._timing,
            metrics=metrics,
            prefetch=replies.output_files.prefetch,
        )
        self.scheduler = Scheduler(
            s,
            self.store,
            steps,
            replies,
            spool,
            on_outbox=self.outbox.wake,
            hold_seconds=self._hold_seconds,
            metrics=metrics,
        )
        self.held_mail = HeldMail(s, self.store, replies, on_outbox=self.outbox.wake)
        await self.store.reset_for_restart()
        await self.store.watch(on_inbound=self.scheduler.wake, on_outbox=self.outbox.wake)
        await self.store.clear_api_hold()  # a hold recorded by an earlier run is no longer known
        self._tasks += [
            asyncio.create_task(self._supervise(self.scheduler.run, "scheduler"), name="scheduler"),
            asyncio.create_task(self._supervise(self.outbox.run, "outbox"), name="outbox"),
            asyncio.create_task(self._supervise(self.held_mail.run, "held"), name="held"),
        ]
        if s.retention_days > 0:  # MAILGATE_RETENTION_DAYS=0: raw bytes are kept
            self._tasks.append(asyncio.create_task(self._supervise(self._pruning, "prune"), name="prune"))

    async def _start_listeners(self, secret: bytes, on_accepted: Callable[[], None]) -> None:
        """Admission, the SMTP (and LMTP) listeners and the monitor."""
        s = self.settings
        metrics = self.metrics
        admission = Admission(s, self.store, secret, dkim_dns=self._dkim_dns)
        tls = self._tls_context()
        loop = asyncio.get_running_loop()
        if swept := await asyncio.to_thread(data.sweep, data.incoming_dir(s.spool_dir)):
            log.warning("spool_swept: DATA left unfinished by an earlier run", extra={"files": swept})
        watched = [s.spool_dir] if s.database_url is not None else [s.spool_dir, s.database.parent]
        free_space = FreeSpace(watched, s.min_free_space)
        try:
            for listen, lmtp in ((s.listen, False), (s.lmtp_listen, True)):
                if listen is None:
                    continue
                handler = Handler(
                    admission,
                    max_recipients=s.max_recipients,
                    is_lmtp=lmtp,
                    on_accepted=on_accepted,
                    metrics=metrics,
                )
                factory = protocol_factory(
                    handler,
                    hostname=s.domain,
                    limits=smtp_limits(s),
                    spool_dir=s.spool_dir,
                    free_space=free_space,
                    tls_context=tls,
                    require_starttls=s.require_starttls,
                    lmtp=lmtp,
                )
                self._servers.append(await _listen(loop, factory, listen, s))
            if (listen := s.metrics_listen) is not None:
                self._monitor = Monitor(metrics, self)
                await self._monitor.start(listen.host, listen.port)
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        log.info(
            "started",
            extra={
                "smtp": f"{s.listen.host}:{self.smtp_port}",
                "lmtp": str(s.lmtp_listen or "off"),
                "metrics": f"{s.metrics_listen.host}:{self.metrics_port}" if s.metrics_listen else "off",
                "api": s.base_url,
                "auth": s.auth,
                "runner": "process" if self.role == "listener" else "inline",
                "event_loop": loop_name(),
            },
        )
        if s.auth == "none":
            log.warning(
                "MAILGATE_AUTH=none: the From header is trusted as is; "
                "use only for demos and trusted networks"
            )

    async def _pruning(self) -> None:
        """Retention, in the background: see `retention.run`."""
        days = self.settings.retention_days
        await retention.run(self.store, days, every=self._prune_every, first=self._prune_after)

    def wake_workers(self) -> None:
        """New mail was committed: the scheduler and the held-mail loop look at once."""
        self.scheduler.wake()
        self.held_mail.wake()

    async def _check_api(self) -> None:
        """At start, without delaying the listeners: is the key accepted, does every worker id exist?"""
        try:
            found = await checks.api_checks(self.api, self.settings)
        except Exception:
            log.exception("startup_check_crashed")
            return
        for check in found:
            if not check.ok:
                log.error("startup_check_failed", extra={"problem": check.what})

    def _warn_exposed(self) -> None:
        """A WARNING for each existing file or folder holding mail that group or others may open."""
        s = self.settings
        paths = [s.spool_dir]
        if s.database_url is None:
            paths += [s.database, *(s.database.with_name(s.database.name + x) for x in ("-wal", "-shm"))]
        if s.smtp_relay is None:
            paths.append(s.outbox_dir)
        for path, mode in private.exposed(paths):
            log.warning(
                "private_file_exposed: it holds mail; make it the owner's alone",
                extra={"path": str(path), "mode": f"{mode:04o}", "fix": f"chmod go= {path}"},
            )

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_cert, s.tls_key)
        return context

    async def _supervise(self, run: Callable[[], Any], name: str) -> None:
        """Keep a background loop alive: a failing iteration is logged and the loop restarts."""
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("loop_failed", extra={"loop": name})
                await asyncio.sleep(1.0)

    # --- what /metrics and /readyz read (monitor.Probe) ----------------------------------------------

    def runner_status(self) -> dict[str, Any]:
        """What the listener asks the runner process for (`runner.STATUS`): the hold, the pauses and
        the metrics, as JSON."""
        paused = {
            name: pause.reason
            for name, pause in (("scheduler", self.scheduler.storage), ("outbox", self.outbox.storage))
            if pause.tripped
        }
        return {"held": self.scheduler.held, "paused": paused, "metrics": self.metrics.snapshot()}

    async def refresh(self) -> None:
        """Set the gauges that describe the store: rows per state, the oldest waiting message (and, with
        a runner process, fetch its metrics)."""
        if self.runner is not None:
            status = await self.runner.status()
            self.metrics.remote = status["metrics"] if status else []
        counts = await self.store.count_by_state()
        for table, states in (("inbound", InboundState), ("outbox", OutboxState)):
            for state in states:
                self.metrics.rows.labels(table, str(state)).set(counts[table].get(str(state), 0))
        oldest = await self.store.oldest_waiting()
        self.metrics.oldest_waiting.set(max(0.0, time.time() - oldest.received_at) if oldest else 0.0)

    async def not_ready(self) -> list[str]:
        """Why this gateway should not be sent mail now: stopping, a listener down, the store not taking
        writes, the API refusing the key. The store is written to at most every few seconds."""
        reasons: list[str] = []
        if self._stopping:
            reasons.append("stopping: finishing the work in hand")
        expected = 1 + (self.settings.lmtp_listen is not None)
        if len([srv for srv in self._servers if srv.is_serving()]) < expected:
            reasons.append("listeners: not all SMTP/LMTP listeners are up")
        held, paused = self.held, {}
        if self.runner is not None:
            status = await self.runner.status()
            if status is None:
                reasons.append("runner: the runner process is not running (being started again)")
            else:
                held, paused = status["held"], status["paused"]
        else:
            for name, pause in (("scheduler", self.scheduler.storage), ("outbox", self.outbox.storage)):
                if pause.tripped:
                    paused[name] = pause.reason
        for name, reason in paused.items():
            reasons.append(f"storage: the {name} is paused: {reason}")
        if time.monotonic() - self._writable_at > READY_WRITE_EVERY:
            try:
                await self.store.check_writable()
            except StoreBusy as exc:
                reasons.append(f"store: cannot write: {exc}")
            else:
                self._writable_at = time.monotonic()
        if held is not None:
            reasons.append(f"api_hold: the API refuses HANDINGER_API_KEY; every turn is held: {held}")
        return reasons

    @property
    def held(self) -> str | None:
        """Why every turn is held (the API refuses the key), when this process runs the turns."""
        return self.scheduler.held if hasattr(self, "scheduler") else None

    async def stop(self) -> None:
        self._stopping = True
        prefix = "runner_" if self.role == "runner" else ""  # one `stopping` line per gateway
        log.info(
            f"{prefix}stopping", extra={"listeners": len(self._servers), "deadline": self.shutdown_deadline}
        )
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=self.shutdown_deadline)
        self._servers.clear()
        cancelled = 0
        if self.runner is not None:
            await self.runner.stop()
        if hasattr(self, "scheduler"):
            cancelled += await self.scheduler.drain(self.shutdown_deadline)
            cancelled += await self.outbox.drain(self.shutdown_deadline)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._monitor is not None:  # last of the listeners: /readyz says "stopping" until here
            await self._monitor.close()
            self._monitor = None
        if hasattr(self, "api"):
            await self.api.aclose()
        if hasattr(self, "store"):
            await self.store.close()
        self._release()
        log.info(f"{prefix}stopped", extra={"cancelled": cancelled})

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def smtp_limits(s: Settings) -> Limits:
    """What each SMTP/LMTP session may do, from the settings."""
    return Limits(
        data_size=s.max_message_size,
        timeout=s.smtp_timeout,
        session_timeout=s.smtp_session_timeout,
        max_connections=s.max_connections,
        max_per_client=s.max_connections_per_client,
        max_header=max(1024 * 1024, s.max_header_size + 4),
    )


def loop_name() -> str:
    """Which event loop runs this gateway: `uvloop` or `asyncio`."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def keep_big_buffers_out_of_the_heap() -> None:
    """Let memory taken by a huge answer go back to the system once the reply is out.

    glibc serves allocations over its mmap threshold with mmap, so freeing them returns the pages at
    once; but after each such free it raises the threshold to that size (up to 32 MiB), and the next
    10 MB buffers come from the heap, where they stay after being freed (measured with
    bench/huge_answer.py: RSS 142 MiB above where it started after a 10 MB answer; 20 MiB with a fixed
    threshold). Setting the threshold fixes it at 1 MiB: the slices a reply is built from (256 KiB)
    stay on the heap, whole answers and replies do not. Nothing happens on another C library.
    """
    with contextlib.suppress(OSError, AttributeError):
        if platform.libc_ver()[0] == "glibc":
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


async def _listen(
    loop: asyncio.AbstractEventLoop, factory: Any, listen: Listen, settings: Settings
) -> asyncio.base_events.Server:
    if listen.unix_path:
        return await _listen_unix(loop, factory, listen.unix_path, settings)
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    return await loop.create_server(factory, listen.host, listen.port, family=family, reuse_address=True)


async def _listen_unix(
    loop: asyncio.AbstractEventLoop, factory: Any, path: str, settings: Settings
) -> asyncio.base_events.Server:
    """Bind the LMTP socket at `path` with the configured mode and group (the MTA's client connects).

    A socket left by an earlier run is removed; anything else at `path` is refused, never deleted.
    The mode is set after bind, so it holds whatever the umask (systemd's UMask=0077 included).
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket")
        os.unlink(path)
    server = await loop.create_unix_server(factory, path)
    try:
        if settings.lmtp_socket_group is not None and os.stat(path).st_gid != settings.lmtp_socket_group:
            os.chown(path, -1, settings.lmtp_socket_group)
        os.chmod(path, settings.lmtp_socket_mode)
    except OSError:
        server.close()
        raise
    return server
