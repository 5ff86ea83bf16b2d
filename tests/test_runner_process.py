"""`serve` as two processes (MAILGATE_RUNNER=process): the listener and the runner it starts and watches.

The real daemon as a subprocess, the sandbox API and the recording relay in the test's loop. What must
hold: mail is answered as in one process; the runner shares the instance lock and dies with the
listener; a runner that dies is started again and the mail waits for it; `/metrics` counts both
processes' work once; and the event loop is the one MAILGATE_EVENT_LOOP names.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from mailgate import runner
from mailgate.config import load_settings, usable_cpus
from mailgate.errors import ConfigError
from mailgate.metrics import Metrics
from mailgate.sandbox import RunningSandbox
from mailgate.store.lock import holder, lock_path
from tests.conftest import DOMAIN
from tests.daemon import Serve, write_env
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, **extra: str) -> Path:
    values = {
        "HANDINGER_BASE_URL": sandbox.url,
        "HANDINGER_API_KEY": "test-key",
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "@example.org",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": "127.0.0.1:0",
        "MAILGATE_DATABASE": str(tmp_path / "mailgate.db"),
        "MAILGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay.port}",
        "MAILGATE_SECRET": "runner-test-secret-0123456789",
        "MAILGATE_RUNNER": "process",
        **extra,
    }
    return write_env(tmp_path / "gateway.env", values)


def runner_pids(serve: Serve) -> list[int]:
    """The runner processes the listener started, in order (from its `runner_started` lines)."""
    return [int(pid) for pid in re.findall(r"event=runner_started pid=(\d+)", serve.text())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: its parent has not reaped it yet
    return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.timeout(60)
async def test_mail_is_answered_by_a_runner_process_and_metrics_count_both(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Three mails answered through the runner process; `/metrics` has the listener's 250s and the
    runner's answered turns, each series once; `/readyz` is ready; SIGTERM stops both."""
    metrics_port = free_port()
    env = env_for(tmp_path, sandbox, relay, MAILGATE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    serve = await Serve(env, tmp_path / "serve.log").start()
    try:
        port = await serve.started()
        [runner] = runner_pids(serve)
        assert runner != serve.pid and alive(runner)
        assert "runner=process" in serve.text()
        for n in range(3):
            assert (await smtp_send(port, make_mail(subject=f"Question {n}"))).accepted
        await relay.wait_for(3, timeout=20)
        status, body = await http_get(metrics_port, "/metrics")
        assert status == 200
        assert 'mailgate_turns_total{outcome="answered"} 3.0' in body
        assert re.search(r'mailgate_smtp_replies_total\{[^}]*stage="data"[^}]*\} 3\.0', body)
        assert body.count("# TYPE mailgate_turns_total counter") == 1
        assert (await http_get(metrics_port, "/readyz"))[0] == 200
        assert await serve.stop() == 0
        await until(lambda: not alive(runner), timeout=10, what="the runner to stop")
        assert "event=stopped" in serve.text()
    finally:
        await serve.close()


async def test_a_runner_that_never_says_ready_is_killed_and_the_start_fails(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner hung while starting (here a process that never answers) is killed after START_TIMEOUT
    and the start fails with the reason (`_supervise` then tries again with back-off), instead of the
    listener waiting for it for ever."""
    monkeypatch.setattr(runner, "START_TIMEOUT", 0.5)
    settings = load_settings(env_for(tmp_path, sandbox, relay))
    process = runner.RunnerProcess(settings, None, shutdown_deadline=1.0)
    process.command = ["sleep", "30"]
    with pytest.raises(RuntimeError, match=r"did not say ready within 0\.5 s"):
        await process.start()
    assert process._proc is not None and process._proc.returncode is not None
    assert process.pid is None and not process.running


@pytest.mark.timeout(60)
async def test_a_killed_runner_is_started_again_and_the_mail_waits_for_it(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """SIGKILL the runner: the listener logs it, starts another, and mail accepted meanwhile is answered."""
    serve = await Serve(env_for(tmp_path, sandbox, relay), tmp_path / "serve.log").start()
    try:
        port = await serve.started()
        [first] = runner_pids(serve)
        os.kill(first, signal.SIGKILL)
        assert (await smtp_send(port, make_mail(subject="While the runner is down"))).accepted
        await until(lambda: len(runner_pids(serve)) == 2, timeout=20, what="a second runner")
        assert "runner_exited" in serve.text()
        await relay.wait_for(1, timeout=20)
        assert await serve.stop() == 0
    finally:
        await serve.close()


@pytest.mark.timeout(60)
async def test_the_runner_holds_the_lock_and_dies_with_the_listener(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """The runner has the lock file open (the flock is shared); SIGKILL of the listener takes the runner
    along, and a new `serve` on the same store starts."""
    env = env_for(tmp_path, sandbox, relay)
    serve = await Serve(env, tmp_path / "serve.log").start()
    try:
        await serve.started()
        [runner] = runner_pids(serve)
        lock = lock_path(tmp_path / "mailgate.db").resolve()
        fds = os.listdir(f"/proc/{runner}/fd")
        assert any(os.readlink(f"/proc/{runner}/fd/{fd}") == str(lock) for fd in fds)
        assert holder(tmp_path / "mailgate.db") == serve.pid
        await serve.stop(signal.SIGKILL)
        await until(lambda: not alive(runner), timeout=10, what="the runner to die with its listener")
        again = await Serve(env, tmp_path / "again.log").start()
        try:
            port = await again.started()
            assert (await smtp_send(port, make_mail(subject="After the kill"))).accepted
            await relay.wait_for(1, timeout=20)
            assert await again.stop() == 0
        finally:
            await again.close()
    finally:
        await serve.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.timeout(60)
async def test_serve_runs_on_the_event_loop_it_is_told(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, loop: str
) -> None:
    """MAILGATE_EVENT_LOOP=asyncio or uvloop (one process, MAILGATE_RUNNER=inline): the log names the
    loop, and a mail is answered."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    env = env_for(tmp_path, sandbox, relay, MAILGATE_RUNNER="inline", MAILGATE_EVENT_LOOP=loop)
    serve = await Serve(env, tmp_path / "serve.log").start()
    try:
        port = await serve.started()
        assert f"event_loop={loop}" in serve.text() and "runner=inline" in serve.text()
        assert runner_pids(serve) == []
        assert (await smtp_send(port, make_mail())).accepted
        await relay.wait_for(1, timeout=20)
        assert await serve.stop() == 0
    finally:
        await serve.close()


def test_runner_and_event_loop_settings() -> None:
    """MAILGATE_RUNNER and MAILGATE_EVENT_LOOP take their documented values; anything else is refused."""
    base = {
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "*",
        "HANDINGER_API_KEY": "k",
        "MAILGATE_AUTH": "none",
    }
    assert load_settings(environ={**base, "MAILGATE_RUNNER": "process"}).runner_process
    assert not load_settings(environ={**base, "MAILGATE_RUNNER": "inline"}).runner_process
    auto = load_settings(environ=base)
    assert auto.runner == "auto" and auto.runner_process == (usable_cpus() >= 2)
    assert load_settings(environ={**base, "MAILGATE_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    for name, value in (("MAILGATE_RUNNER", "thread"), ("MAILGATE_EVENT_LOOP", "trio")):
        with pytest.raises(ConfigError, match=name):
            load_settings(environ={**base, name: value})


def test_metrics_of_two_processes_are_summed_series_by_series() -> None:
    """A runner's snapshot merged into the listener's exposition: same series summed, new ones added,
    every family once."""
    listener, runner = Metrics(), Metrics()
    listener.smtp_replies.labels("data", "2xx", "accepted").inc(5)
    listener.turns.labels("answered").inc(1)  # never in practice, but a sum must be a sum
    runner.turns.labels("answered").inc(2)
    runner.turns.labels("failed").inc(1)
    listener.remote = runner.snapshot()
    text = listener.exposition().decode()
    assert 'mailgate_turns_total{outcome="answered"} 3.0' in text
    assert 'mailgate_turns_total{outcome="failed"} 1.0' in text
    assert 'mailgate_smtp_replies_total{class="2xx",reason="accepted",stage="data"} 5.0' in text
    assert text.count("# TYPE mailgate_turns_total counter") == 1
    assert text.count("# HELP mailgate_ready ") == 1


def test_the_runner_freezes_what_outlives_a_full_collection_and_walks_it_again_later() -> None:
    """`SurvivorFreezer`: startup's objects are frozen at once; objects that outlive a later full
    collection are frozen right after it; after `unfreeze_every`, a full collection unfreezes all."""
    from mailgate.runner_main import SurvivorFreezer

    gc.unfreeze()
    freezer = SurvivorFreezer(unfreeze_every=3600)
    try:
        freezer.install()
        startup = gc.get_freeze_count()
        assert startup > 0
        kept = [[n] for n in range(10_000)]  # tracked objects that outlive the next full collection
        gc.collect(1)
        assert gc.get_freeze_count() == startup  # a younger collection freezes nothing
        gc.collect()
        assert gc.get_freeze_count() >= startup + len(kept)
        freezer.unfreeze_every = 0
        gc.collect()
        assert gc.get_freeze_count() == 0
        assert kept[-1] == [9_999]
    finally:
        freezer.remove()
        gc.unfreeze()
