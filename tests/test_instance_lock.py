"""One gateway per store: a second `mailgate serve` on the same database exits 3 naming the first one's
pid; the operator verbs run beside it; the lock goes with the process, however it ends."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mailgate.sandbox import RunningSandbox
from tests.conftest import env_for
from tests.daemon import Serve, run_cli, write_env

pytestmark = pytest.mark.anyio


async def test_a_second_serve_on_the_same_store_exits_3(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """The second `serve` (on its own port) says `already running (pid N)` with the first's pid, exit 3;
    `messages` runs beside the first; after the first is killed with SIGKILL a new one starts."""
    env = write_env(tmp_path / "mailgate.env", env_for(tmp_path, sandbox.url, None))
    first = await Serve(env, tmp_path / "first.log").start()
    second = Serve(env, tmp_path / "second.log")
    third = Serve(env, tmp_path / "third.log")
    try:
        await first.started()
        await second.start()
        assert await second.wait() == 3, second.text()
        assert f"mailgate: cannot start: already running (pid {first.pid})" in second.text()
        assert (tmp_path / "mailgate.db.lock").read_text().strip() == str(first.pid)

        code, out, err = await run_cli("messages", env_file=env)
        assert (code, out.strip()) == (0, "(none)"), err

        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        await third.start()
        await third.started()
        assert await third.stop() == 0
    finally:
        for daemon in (first, second, third):
            await daemon.close()
    assert "event=started" not in second.text()


async def test_a_clean_stop_releases_the_store(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """After SIGTERM (exit 0) the next `serve` starts at once and writes its own pid in the lock file."""
    env = write_env(tmp_path / "mailgate.env", env_for(tmp_path, sandbox.url, None))
    first = await Serve(env, tmp_path / "first.log").start()
    second = Serve(env, tmp_path / "second.log")
    try:
        await first.started()
        assert await first.stop() == 0
        await second.start()
        await second.started()
        assert (tmp_path / "mailgate.db.lock").read_text().strip() == str(second.pid)
        assert await second.stop() == 0
    finally:
        await first.close()
        await second.close()
