"""The real daemon as a subprocess (`python -m mailgate serve --env-file F`): SIGKILL at random moments,
SIGTERM, bad configuration and a busy port.

The sandbox API and the recording relay run in the test's own loop, so they outlive every kill and are
where the outcome is checked: one turn per accepted mail, one reply Message-ID per turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import aiosmtplib
import pytest

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from tests.conftest import DOMAIN
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

SEED = 20260505
MAILS = 30
KILLS = 7


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_env(path: Path, values: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def base_env(tmp_path: Path, api_url: str, relay_port: int, smtp_port: int) -> dict[str, str]:
    return {
        "HANDINGER_BASE_URL": api_url,
        "HANDINGER_API_KEY": "test-key",
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "@example.org",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": f"127.0.0.1:{smtp_port}",
        "MAILGATE_DATABASE": str(tmp_path / "mailgate.db"),
        "MAILGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay_port}",
        "MAILGATE_SECRET": "crash-test-secret-0123456789",
        "MAILGATE_MAX_NEW_TASKS_PER_HOUR": "1000",
        "MAILGATE_MAX_NOTICES_PER_DAY": "1000",
        "MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR": "1000",  # one sender, many mails
        "MAILGATE_MAX_REPLIES_PER_MINUTE": "100000",
        "MAILGATE_MAX_PROCESSING_ATTEMPTS": str(KILLS + 5),  # kills alone must never quarantine a mail
    }


class Daemon:
    """`python -m mailgate serve` with a clean environment; each start logs to its own file."""

    def __init__(self, env_file: Path, logs: Path) -> None:
        self.env_file = env_file
        self.logs = logs
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILGATE_", "HANDINGER_"))}
        with (self.logs / f"gateway-{self.starts}.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mailgate",
                "serve",
                "--env-file",
                str(self.env_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def signal(self, sig: int) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.proc.wait()

    async def listening(self, port: int) -> bool:
        """True once the gateway greets on `port`; a gateway that exited instead fails the test at once,
        with its log (not after the wait's timeout, saying only that it never listened)."""
        if self.proc is not None and self.proc.returncode is not None:
            raise AssertionError(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
        return await smtp_ready(port)

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for n in range(1, self.starts + 1):
            text = (self.logs / f"gateway-{n}.log").read_text(errors="replace").splitlines()
            out.append(f"--- start {n} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


async def smtp_ready(port: int) -> bool:
    """True once something on `port` greets with 220."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        return (await asyncio.wait_for(reader.readline(), 2)).startswith(b"220")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def daemon(env_file: Path, logs: Path) -> AsyncIterator[Daemon]:
    d = Daemon(env_file, logs)
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.returncode is None:
            await d.signal(signal.SIGKILL)


@pytest.fixture
async def sandbox_crash() -> AsyncIterator[RunningSandbox]:
    async with run_sandbox(SandboxOptions(api_key="test-key", turn_seconds=0.2)) as sb:
        yield sb


def mail_number(data: bytes) -> int:
    """Which test mail a reply answers, from its quoted input ("crash-mail-07")."""
    marker = data.split(b"crash-mail-", 1)[1][:2]
    return int(marker)


def body_for(n: int, rng: random.Random) -> str:
    switch = rng.choice(["", "", "", "[sandbox:slow=1.2]", "[sandbox:cut]", "[sandbox:status=503 times=1]"])
    return f"Question crash-mail-{n:02d}, please answer. {switch}"


@pytest.mark.timeout(180)
async def test_kill_9_at_random_moments_loses_nothing_and_doubles_nothing(
    tmp_path: Path, sandbox_crash: RunningSandbox, relay: RecordingRelay
) -> None:
    """30 mails, SIGKILL and restart at seeded random moments: one turn and one reply per accepted mail."""
    sandbox = sandbox_crash
    rng = random.Random(SEED)
    port = free_port()
    env_file = write_env(tmp_path / "gateway.env", base_env(tmp_path, sandbox.url, relay.port, port))
    mails: list[EmailMessage] = [
        make_mail(subject=f"Crash test {n:02d}", body=body_for(n, rng)) for n in range(MAILS)
    ]
    accepted: set[int] = set()
    retried_sends = 0
    kills = 0
    all_sent = asyncio.Event()

    async with daemon(env_file, tmp_path) as gw:
        await gw.start()
        await until(lambda: smtp_ready(port), timeout=20, what="the gateway to listen")

        async def send_all() -> None:
            nonlocal retried_sends
            for n, mail in enumerate(mails):
                deadline = time.monotonic() + 30
                while n not in accepted:  # as a sending MTA does: try again until a 250
                    try:
                        seen = await smtp_send(port, mail)
                        if seen.accepted:
                            accepted.add(n)
                            break
                    except (aiosmtplib.SMTPException, OSError):
                        pass
                    retried_sends += 1
                    assert time.monotonic() < deadline, f"mail {n} never accepted"
                    try:
                        await until(lambda: smtp_ready(port), timeout=20, what="the gateway back")
                    except AssertionError as exc:
                        rc = gw.proc.returncode if gw.proc else None
                        raise AssertionError(f"{exc} (exit {rc})\n{gw.log_tail()}") from None
                await asyncio.sleep(rng.uniform(0.05, 0.5))  # paced like real traffic, not waiting for work
            all_sent.set()

        async def kill_randomly() -> None:
            nonlocal kills
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.8))  # the random moment of the kill
                await gw.signal(signal.SIGKILL)
                kills += 1
                await gw.start()
                await until(lambda: smtp_ready(port), timeout=20, what="the gateway to restart")

        killer = asyncio.create_task(kill_randomly())
        await send_all()
        await killer

        def all_answered() -> bool:  # every mail's reply (a resend after a kill must not count twice)
            return {mail_number(data) for _, _, data in relay.messages} == set(range(MAILS))

        try:
            await until(all_answered, timeout=60, what="a reply to every mail")
            await sandbox.state.wait_idle()
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{gw.log_tail()}") from None
        assert await gw.signal(signal.SIGTERM) == 0, gw.log_tail()

    assert accepted == set(range(MAILS))
    # the sandbox: exactly one turn per accepted mail, each completed
    turns = Counter(
        int(t.input.split("crash-mail-", 1)[1][:2])
        for task in sandbox.state.tasks.values()
        for t in task.turns
    )
    assert turns == Counter(range(MAILS)), f"turns per mail: {turns}"
    assert all(t.status == "completed" for task in sandbox.state.tasks.values() for t in task.turns)
    assert len(sandbox.state.requests) == MAILS
    # the relay: one reply Message-ID per turn; a resend of the same id only after a kill
    ids: dict[int, set[str]] = {}
    deliveries = Counter[str]()
    for _, _, data in relay.messages:
        reply = email.message_from_bytes(data, policy=default)
        assert str(reply["Subject"]).startswith("Re: Crash test"), reply["Subject"]
        n = mail_number(data)
        assert reply["In-Reply-To"] == mails[n]["Message-ID"]
        ids.setdefault(n, set()).add(str(reply["Message-ID"]))
        deliveries[str(reply["Message-ID"])] += 1
    assert sorted(ids) == list(range(MAILS))
    assert all(len(v) == 1 for v in ids.values()), ids
    resends = sum(deliveries.values()) - len(deliveries)
    assert resends <= kills
    print(
        f"\ncrash test: {MAILS} mails sent, {len(accepted)} accepted ({retried_sends} SMTP retries), "
        f"{kills} kills, {sum(turns.values())} turns, {len(deliveries)} reply ids, "
        f"{sum(deliveries.values())} deliveries, {resends} resends"
    )


async def test_sigterm_stops_cleanly_with_exit_0(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A mail in, its reply out, then SIGTERM: the daemon stops in order and exits 0."""
    port = free_port()
    env_file = write_env(tmp_path / "gateway.env", base_env(tmp_path, sandbox.url, relay.port, port))
    async with daemon(env_file, tmp_path) as gw:
        await gw.start()
        await until(lambda: smtp_ready(port), timeout=20, what="the gateway to listen")
        assert (await smtp_send(port, make_mail(body="Before the stop"))).accepted
        await relay.wait_for(1, timeout=20)
        assert await gw.signal(signal.SIGTERM) == 0
    log = (tmp_path / "gateway-1.log").read_text()
    assert "event=stopped" in log


async def test_bad_configuration_exits_78_naming_every_key(tmp_path: Path) -> None:
    """Every bad key is named at once, and the exit code is 78."""
    env_file = write_env(
        tmp_path / "bad.env",
        {
            "MAILGATE_DOMAIN": "not a domain",
            "MAILGATE_WORKERS": "research",
            "MAILGATE_LISTEN": "127.0.0.1:notaport",
            "MAILGATE_CONCURRENCY": "-3",
            "HANDINGER_BASE_URL": "ftp://example.com",
        },
    )
    async with daemon(env_file, tmp_path) as gw:
        await gw.start()
        assert await asyncio.wait_for(gw.wait(), 30) == 78
    err = (tmp_path / "gateway-1.log").read_text()
    for key in (
        "MAILGATE_DOMAIN",
        "MAILGATE_WORKERS",
        "MAILGATE_ALLOWED_SENDERS",
        "MAILGATE_LISTEN",
        "MAILGATE_CONCURRENCY",
        "HANDINGER_BASE_URL",
    ):
        assert key in err, f"{key} not named in:\n{err}"


async def test_port_in_use_exits_3(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay) -> None:
    """The SMTP port is taken: start-up fails with exit 3 and says why."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env_file = write_env(tmp_path / "gateway.env", base_env(tmp_path, sandbox.url, relay.port, port))
        async with daemon(env_file, tmp_path) as gw:
            await gw.start()
            assert await asyncio.wait_for(gw.wait(), 30) == 3
    assert "cannot listen" in (tmp_path / "gateway-1.log").read_text()
