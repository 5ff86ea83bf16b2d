"""`Type=notify`: the real `mailgate serve` speaking systemd's notify protocol to a datagram socket.

The test plays the service manager: it binds an AF_UNIX SOCK_DGRAM socket, passes it as NOTIFY_SOCKET
(a path, or an abstract `@name`), and reads what the daemon sends: READY=1 once the port answers,
WATCHDOG=1 every half of WATCHDOG_USEC, STOPPING=1 after SIGTERM, then exit 0.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mailgate.sandbox import RunningSandbox
from mailgate.systemd import Notifier
from tests.mail import make_mail, smtp_send

pytestmark = pytest.mark.anyio


class Manager:
    """The service manager's end of NOTIFY_SOCKET: every datagram, in order, as `{key: value}`."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.seen: list[dict[str, str]] = []

    async def next(self, timeout: float = 15.0) -> dict[str, str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout)
        state = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        self.seen.append(state)
        return state

    async def until(self, key: str, timeout: float = 15.0) -> dict[str, str]:
        """Read datagrams until one carries `key`; fail after `timeout` seconds in all."""
        async with asyncio.timeout(timeout):
            while key not in (state := await self.next(timeout)):
                pass
        return state


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if request.param == "path":
        address = str(short_dir / "notify")
        sock.bind(address)
    else:
        address = f"@mailgate-test-{uuid.uuid4().hex}"
        sock.bind("\0" + address[1:])
    with sock:
        yield Manager(sock, address)


def env_file(tmp_path: Path, sandbox: RunningSandbox) -> Path:
    path = tmp_path / "mailgate.env"
    path.write_text(
        "\n".join(
            [
                f"HANDINGER_BASE_URL={sandbox.url}",
                "HANDINGER_API_KEY=test-key",
                "MAILGATE_DOMAIN=agents.example.com",
                "MAILGATE_WORKERS=research=wrk_research",
                "MAILGATE_ALLOWED_SENDERS=@example.org",
                "MAILGATE_AUTH=none",
                "MAILGATE_LISTEN=127.0.0.1:0",
                f"MAILGATE_DATABASE={tmp_path / 'mailgate.db'}",
                f"MAILGATE_OUTBOX_DIR={tmp_path / 'outbox'}",
                f"MAILGATE_SPOOL_DIR={tmp_path / 'spool'}",
                "MAILGATE_SECRET=test-secret-0123456789abcdef",
                "",
            ]
        )
    )
    return path


@pytest.fixture
async def daemon(
    tmp_path: Path, sandbox: RunningSandbox, manager: Manager
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m mailgate serve` under our NOTIFY_SOCKET, WATCHDOG_USEC=200000 (a ping every 0.1 s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILGATE_", "HANDINGER_"))}
    env |= {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "200000"}
    env.pop("WATCHDOG_PID", None)
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailgate",
            "serve",
            "--env-file",
            str(env_file(tmp_path, sandbox)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    daemon: asyncio.subprocess.Process, manager: Manager, tmp_path: Path
) -> None:
    """READY=1 comes once the SMTP port answers; WATCHDOG=1 repeats; SIGTERM sends STOPPING=1, exit 0."""
    ready = await manager.until("READY")
    assert ready["READY"] == "1"
    match = re.search(r"smtp 127\.0\.0\.1:(\d+)", ready.get("STATUS", ""))
    assert match, f"STATUS names the bound port: {ready}"
    # READY=1 promises a listening port: the very first connection after it is served
    seen = await smtp_send(int(match.group(1)), make_mail())
    assert seen.accepted, seen
    assert not any("WATCHDOG" in state for state in manager.seen[:-1]), "no ping before READY"

    pings = 0
    async with asyncio.timeout(10):
        while pings < 3:
            pings += (await manager.next()).get("WATCHDOG") == "1"

    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGTERM)
    stopping = await manager.until("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert await asyncio.wait_for(daemon.wait(), 20) == 0, (tmp_path / "gateway.log").read_text()


@pytest.mark.parametrize(
    ("environ", "address", "interval"),
    [
        ({}, None, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, "/run/systemd/notify", None),
        ({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000"}, "@sd", 15.0),
        ({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, "@sd", 15.0),
        ({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, "@sd", None),
        ({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "soon"}, "@sd", None),
        ({"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "0"}, "@sd", None),
        ({"WATCHDOG_USEC": "30000000"}, None, None),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, None, None),
        ({"NOTIFY_SOCKET": "relative/path"}, None, None),
    ],
)
def test_environment_decides_where_and_how_often(
    environ: dict[str, str], address: str | None, interval: float | None
) -> None:
    """The watchdog runs only for our own pid and a positive WATCHDOG_USEC; odd addresses turn it off."""
    notifier = Notifier.from_environ(environ, pid=4242)
    assert (notifier.address, notifier.watchdog_interval) == (address, interval)


async def test_without_notify_socket_nothing_is_sent_and_the_watchdog_returns() -> None:
    """Outside systemd `notify` reports False and `watchdog()` ends at once instead of looping."""
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "200000"})
    assert notifier.notify("READY=1") is False
    await asyncio.wait_for(notifier.watchdog(), 1)


def test_a_manager_that_went_away_is_logged_not_raised(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NOTIFY_SOCKET nobody listens on costs one warning line, not an exception in the gateway."""
    notifier = Notifier(str(short_dir / "gone"))
    with caplog.at_level("WARNING", logger="mailgate.systemd"):
        assert notifier.notify("WATCHDOG=1") is False
        assert notifier.notify("WATCHDOG=1") is False
    assert [r.getMessage() for r in caplog.records] == ["notify_failed"]
