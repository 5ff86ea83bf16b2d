"""The real `mailgate` command as a subprocess: `run_cli` for verbs that exit, `Serve` for the daemon.

Each gets a clean environment (no MAILGATE_/HANDINGER_ names from the developer's shell) and its
settings from an env file, as an operator runs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def write_env(path: Path, values: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MAILGATE_", "HANDINGER_", "NOTIFY_"))}


async def run_cli(*argv: str, env_file: Path, timeout: float = 30.0) -> tuple[int, str, str]:
    """`python -m mailgate ARGV --env-file F` to its end: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailgate",
        *argv,
        "--env-file",
        str(env_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_environ(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Serve:
    """`python -m mailgate serve --env-file F`, its stderr in `log` (a file, read while it runs)."""

    def __init__(self, env_file: Path, log: Path, *, umask: int = 0o022) -> None:
        self.env_file = env_file
        self.log = log
        self.umask = umask
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Serve:
        with self.log.open("wb") as log:
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
                env=clean_environ(),
                umask=self.umask,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def started(self, timeout: float = 20.0) -> int:
        """Wait for the `started` log line; return the SMTP port it names. Fails if the process exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (match := re.search(r"event=started smtp=[\d.]+:(\d+)", self.text())) is None:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"mailgate serve did not start:\n{self.text()}")
            await asyncio.sleep(0.05)
        return int(match.group(1))

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        """Kill it if it still runs (a test's cleanup)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
