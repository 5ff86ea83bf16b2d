"""Shared pieces of the benchmarks: the processes (gateway, bare sink, sandbox + relay), SMTP load, stats.

Every server runs in its own process (multiprocessing, "spawn"), so the client, mailgate, the sandbox
and the relay never share an interpreter: on a 2-core machine each benchmark says which processes are
busy at the same time. Everything listens on 127.0.0.1 port 0 and stops when the benchmark ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "agents.example.com"
RCPT = f"research@{DOMAIN}"
SENDER = "alice@example.org"
API_KEY = "bench-key"
_ctx = mp.get_context("spawn")


# --- reporting ---------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, {platform.system()}"


def pct(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile (nearest rank) of `values`; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   machine: {machine()}")


def verdict(ok: bool) -> str:
    return "meets target" if ok else "SHORT of target"


# --- mail ----------------------------------------------------------------------------------------------


def make_mail(tag: str, size: int = 4096, body_line: str = "") -> bytes:
    """A `size`-byte RFC 5322 message from SENDER to RCPT, unique through `tag`."""
    head = (
        f"From: Alice <{SENDER}>\r\nTo: {RCPT}\r\nSubject: bench {tag}\r\n"
        f"Message-ID: <{tag}@example.org>\r\nDate: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    text = (
        f"Please look at item {tag}.\r\n{body_line}\r\n" if body_line else f"Please look at item {tag}.\r\n"
    )
    filler = ("The quick brown fox jumps over the lazy dog. " * 2)[:70] + "\r\n"
    out = head + text
    while len(out) + len(filler) < size:
        out += filler
    return out.encode()


def gateway_env(tmp: Path, api_url: str, relay_port: int | None, **extra: str) -> dict[str, str]:
    env = {
        "HANDINGER_BASE_URL": api_url,
        "HANDINGER_API_KEY": API_KEY,
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "@example.org",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": "127.0.0.1:0",
        "MAILGATE_DATABASE": str(tmp / "mailgate.db"),
        "MAILGATE_OUTBOX_DIR": str(tmp / "outbox"),
        "MAILGATE_SPOOL_DIR": str(tmp / "spool"),
        "MAILGATE_SECRET": "bench-secret-0123456789abcdef",
        "MAILGATE_MAX_NEW_TASKS_PER_HOUR": "1000000",
        "MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR": "1000000",  # the loop breakers: one sender, many mails
        "MAILGATE_MAX_REPLIES_PER_MINUTE": "1000000",
        "MAILGATE_MAX_CONNECTIONS": "2000",
        "MAILGATE_MAX_CONNECTIONS_PER_CLIENT": "2000",  # every benchmark client comes from 127.0.0.1
        "MAILGATE_LOG_LEVEL": "INFO",
    }
    for name in ("MAILGATE_RUNNER", "MAILGATE_EVENT_LOOP"):  # how `serve` runs, from the environment
        if name in os.environ:
            env[name] = os.environ[name]
    if relay_port is not None:
        env["MAILGATE_SMTP_RELAY"] = f"smtp://127.0.0.1:{relay_port}"
    env.update(extra)
    return env


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    keep = os.environ.get("MAILGATE_BENCH_KEEP")  # a directory: keep logs and databases there
    if keep:
        path = Path(tempfile.mkdtemp(prefix="run-", dir=keep))
        print(f"   files kept in {path}")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmp:
        yield Path(tmp)


# --- child processes -------------------------------------------------------------------------------


@dataclass
class Child:
    """A server in its own process, driven over a pipe: `call(cmd)` sends a command, returns the answer."""

    process: Any
    conn: Connection
    info: Any = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def call(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"child {self.pid} did not answer {cmd[0]!r}")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self.call("stop", timeout=30)
        self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


@contextlib.contextmanager
def child(target: Any, *args: Any) -> Iterator[Child]:
    mine, theirs = _ctx.Pipe()
    process = _ctx.Process(target=target, args=(theirs, *args), daemon=True)
    process.start()
    if not mine.poll(60):
        process.kill()
        raise RuntimeError(f"{target.__name__} did not start")
    c = Child(process, mine, mine.recv())
    try:
        yield c
    finally:
        c.stop()


async def _serve_commands(conn: Connection, handle: Any) -> None:
    """Answer commands from the parent until "stop" (or the parent goes away)."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        while True:
            await ready.wait()
            ready.clear()
            while conn.poll():
                try:
                    cmd = conn.recv()
                except EOFError:
                    return
                if cmd[0] == "stop":
                    return
                conn.send(await handle(*cmd))
    finally:
        loop.remove_reader(conn.fileno())


def _quiet_stderr(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def gateway_main(conn: Connection, env: dict[str, str], log_path: str, park_runner: bool) -> None:
    """The gateway as `mailgate serve` runs it (logfmt INFO logs, to `log_path`; MAILGATE_RUNNER and
    MAILGATE_EVENT_LOOP as `serve` reads them), driven by the parent."""
    _quiet_stderr(Path(log_path))
    from mailgate import logs
    from mailgate.config import load_settings
    from mailgate.loops import run_loop
    from mailgate.service import Gateway
    from mailgate.turns.scheduler import Scheduler

    settings = load_settings(environ=env)
    logs.setup(settings.log_level)
    if park_runner:  # the acceptance benchmark measures ingress alone; the runner is benchmarked elsewhere

        async def parked(self: Scheduler) -> None:
            await asyncio.Event().wait()

        Scheduler.run = parked  # type: ignore[method-assign]
        settings = dataclasses.replace(settings, runner="inline")  # parked here, in this process

    async def main() -> None:
        role = "listener" if settings.runner_process else "all"
        async with Gateway(settings, role=role) as gw:  # the defaults `mailgate serve` uses

            async def handle(cmd: str, *args: Any) -> Any:
                if cmd == "stats":
                    return {"batches": gw.store.batches}
                if cmd == "pids":  # the gateway's other processes, by name
                    return {"runner": gw.runner.pid} if gw.runner is not None else {}
                if cmd == "lag":  # the loop-lag histograms of every process of the gateway
                    families = gw.metrics.snapshot()
                    if gw.runner is not None and (status := await gw.runner.status()) is not None:
                        families += status["metrics"]
                    return [f for f in families if f[0] == "mailgate_loop_lag_seconds"]
                if cmd == "loop":
                    from mailgate.service import loop_name

                    return loop_name()
                raise ValueError(cmd)

            conn.send(gw.smtp_port)
            await _serve_commands(conn, handle)

    run_loop(main(), settings.event_loop)


def sink_main(conn: Connection) -> None:
    """A bare aiosmtpd server that accepts everything and keeps nothing (the acceptance baseline)."""
    from aiosmtpd.smtp import SMTP

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(Sink(), hostname="sink.test", enable_SMTPUTF8=True), "127.0.0.1", 0
        )
        conn.send(server.sockets[0].getsockname()[1])

        async def handle(cmd: str, *args: Any) -> Any:
            raise ValueError(cmd)

        await _serve_commands(conn, handle)
        server.close()

    asyncio.run(main())


def peers_main(conn: Connection, turn_seconds: float, heartbeat: float, log_path: str) -> None:
    """The sandbox API and a recording SMTP relay, timestamping what they see (time.time()).

    Records: POST /api/tasks arrival per (task, seq) with its input; the end of each turn; each reply's
    arrival at the relay with its In-Reply-To. Also counts stream events emitted, and running turns.
    """
    _quiet_stderr(Path(log_path))
    import email

    from aiosmtpd.smtp import SMTP

    from mailgate.sandbox import SandboxOptions, _state, run_sandbox

    posts: list[tuple[float, str, int, str]] = []
    ends: dict[tuple[str, int], float] = {}
    relayed: list[tuple[float, str]] = []
    original_settle = _state._settle

    def settle(turn: Any, *args: Any) -> None:  # whatever else the sandbox passes, passed on
        ends[(turn.task_id, turn.seq)] = time.time()
        original_settle(turn, *args)

    _state._settle = settle  # type: ignore[attr-defined]

    class Stamped(list):  # type: ignore[type-arg]
        def append(self, request: Any) -> None:
            posts.append((time.time(), request.task_id, request.seq, request.input))
            if len(self) < 100:  # keep only a few: 1,000 requests of inputs are the sandbox's memory
                super().append(request)

    class Relay:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            msg = email.message_from_bytes(envelope.original_content or envelope.content)
            relayed.append((time.time(), str(msg.get("In-Reply-To", ""))))
            return "250 2.0.0 Ok"

    async def main() -> None:
        options = SandboxOptions(api_key=API_KEY, turn_seconds=turn_seconds, heartbeat_seconds=heartbeat)
        async with run_sandbox(options) as sb:
            sb.state.requests = Stamped()
            loop = asyncio.get_running_loop()
            relay = await loop.create_server(
                lambda: SMTP(Relay(), hostname="relay.test", enable_SMTPUTF8=True), "127.0.0.1", 0
            )
            conn.send((sb.url, relay.sockets[0].getsockname()[1]))

            def events() -> int:
                return sum(len(t.events) for task in sb.state.tasks.values() for t in task.turns)

            async def handle(cmd: str, *args: Any) -> Any:
                if cmd == "counts":
                    running = sum(1 for task in sb.state.tasks.values() for t in task.turns if t.running)
                    return {
                        "posts": len(posts),
                        "running": running,
                        "events": events(),
                        "relayed": len(relayed),
                    }
                if cmd == "records":
                    return {"posts": posts, "ends": ends, "relayed": relayed}
                raise ValueError(cmd)

            await _serve_commands(conn, handle)
            relay.close()

    asyncio.run(main())


# --- SMTP load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    sent: int = 0
    refused: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # final dot -> reply
    replies: list[tuple[float, str, bytes]] = field(default_factory=list)  # (time of 250, tag, reply)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


async def _expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"unexpected reply: {line!r}")
            return line


async def _session(port: int, mails: list[tuple[str, bytes]], out: Load, keep_replies: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _expect(reader, b"220")
    writer.write(b"EHLO client.test\r\n")
    await _expect(reader, b"250")
    for tag, data in mails:
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(f"RCPT TO:<{RCPT}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354")
        writer.write(data + b".\r\n")
        await writer.drain()
        t0 = time.perf_counter()
        line = await reader.readline()
        now = time.perf_counter()
        if line.startswith(b"250"):
            out.sent += 1
            out.latencies.append(now - t0)
            if keep_replies:
                out.replies.append((time.time(), tag, line))
        else:
            out.refused += 1
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


def _client_main(
    conn: Connection, port: int, sessions: int, mails: list[tuple[str, bytes]], keep: bool, pace: float
) -> None:
    async def main() -> Load:
        out = Load()
        per = [mails[i::sessions] for i in range(sessions)]
        t0 = time.perf_counter()
        if pace <= 0:
            await asyncio.gather(*(_session(port, m, out, keep) for m in per if m))
        else:  # one session, one mail every `pace` seconds (latency probes)
            for tag_data in mails:
                await _session(port, [tag_data], out, keep)
                await asyncio.sleep(pace)
        out.seconds = time.perf_counter() - t0
        return out

    conn.send(asyncio.run(main()))


def smtp_load(
    port: int, mails: list[tuple[str, bytes]], sessions: int, *, keep_replies: bool = False, pace: float = 0.0
) -> Load:
    """Send `mails` over `sessions` parallel SMTP sessions from a separate process; wait for the end."""
    mine, theirs = _ctx.Pipe()
    process = _ctx.Process(target=_client_main, args=(theirs, port, sessions, mails, keep_replies, pace))
    process.start()
    load: Load = mine.recv()
    process.join()
    return load


def smtp_source_path() -> str | None:
    """Postfix's smtp-source: $SMTP_SOURCE, PATH, /usr/sbin, or a `dpkg -x` of the postfix package."""
    for candidate in (
        os.environ.get("SMTP_SOURCE"),
        shutil.which("smtp-source"),
        "/usr/sbin/smtp-source",
        "/tmp/pf/usr/sbin/smtp-source",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def smtp_source(binary: str, port: int, *, sessions: int, messages: int, size: int) -> float:
    """Run smtp-source; returns the wall-clock seconds it took (it exits when every mail got 250)."""
    lib = str(Path(binary).parents[1] / "lib" / "postfix")
    env = {**os.environ, "LD_LIBRARY_PATH": lib + ":" + os.environ.get("LD_LIBRARY_PATH", "")}
    args = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", SENDER, "-t", RCPT]
    t0 = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, env=env, capture_output=True, timeout=300)
    return time.perf_counter() - t0


def smtp_source_run(
    binary: str, port: int, *, sessions: int, messages: int, size: int
) -> tuple[float, float]:
    """Run smtp-source; (wall-clock seconds until every mail got 250, its own CPU seconds)."""
    lib = str(Path(binary).parents[1] / "lib" / "postfix")
    env = {**os.environ, "LD_LIBRARY_PATH": lib + ":" + os.environ.get("LD_LIBRARY_PATH", "")}
    args = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size), "-f", SENDER, "-t", RCPT]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*args, f"127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source exited with {proc.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


class RssSampler:
    """The peak RSS of `pid`, sampled every 5 ms in a thread (the probing loop is never held)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


@contextlib.contextmanager
def profiled(pid: int, out: str | None, *, idle: bool = False) -> Iterator[None]:
    """With `out`: py-spy samples `pid` (all threads) meanwhile and writes collapsed stacks to `out`."""
    if not out:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = [spy, "record", "-p", str(pid), "-r", "250", "-f", "raw", "-o", out, "--nonblocking", "--threads"]
    proc = subprocess.Popen([*args, *(["--idle"] if idle else [])], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(30)
        print(f"   profile of pid {pid}: {out} (collapsed stacks; bench/profile_top.py {out})")


def log_count(path: Path, *needles: str) -> int:
    """Lines of the gateway's log that contain any of `needles`."""
    with contextlib.suppress(OSError), path.open(errors="replace") as f:
        return sum(1 for line in f if any(n in line for n in needles))
    return 0


def start_slow_tasks(gate: Child, peers: Child, n: int, seconds: float, sessions: int = 20) -> float:
    """Mail `n` new tasks whose turns stream for `seconds`; wait until all `n` streams are open.

    Returns how long the ramp took."""
    t0 = time.perf_counter()
    line = f"[sandbox:slow={seconds:g}]"
    mails = [(f"slow-{i}", make_mail(f"slow-{i}", body_line=line)) for i in range(n)]
    load = smtp_load(gate.info, mails, sessions)
    if load.refused:
        raise RuntimeError(f"{load.refused} of the load mails were refused")
    try:
        wait_until(lambda: peers.call("counts")["running"] >= n, 100, f"{n} running turns", every=0.5)
    except TimeoutError:
        print(f"   stuck at {peers.call('counts')} (gateway: {gate.call('stats')})")
        raise
    return time.perf_counter() - t0
