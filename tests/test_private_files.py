"""Files that hold mail are the owner's alone: the real `mailgate serve` under umask 022 (a shell's
default) creates its database, WAL and SHM 0600, the database's directory, the spool and the outbox
Maildir 0700 and their files 0600; files that already exist are not changed but named in a WARNING.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mailgate.sandbox import RunningSandbox
from tests.conftest import env_for, settings_for
from tests.daemon import Serve, write_env
from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_serve_creates_everything_owner_only_under_umask_022(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """Database (+ -wal, -shm) 0600 in a new 0700 directory; spool folders 0700 and files 0600 while a
    turn waits; the Maildir, its tmp/new/cur 0700 and the reply in it 0600."""
    state = tmp_path / "state" / "db"
    env = env_for(
        tmp_path,
        sandbox.url,
        None,  # replies go to the outbox Maildir
        MAILGATE_DATABASE=str(state / "mailgate.db"),
        MAILGATE_SPOOL_DIR=str(tmp_path / "spool"),
        MAILGATE_OUTBOX_DIR=str(tmp_path / "outbox"),
    )
    daemon = Serve(write_env(tmp_path / "mailgate.env", env), tmp_path / "serve.log", umask=0o022)
    sandbox.state.faults.push(status=503, times=2, path="POST /api/tasks")  # the turn waits a while
    await daemon.start()
    try:
        port = await daemon.started()
        mail = make_mail(attachments=[("numbers.csv", "text/csv", b"q1,q2\n1,2\n")])
        assert (await smtp_send(port, mail)).accepted

        spooled: list[Path] = []

        def spool_written() -> bool:
            spooled[:] = list((tmp_path / "spool").glob("*/*"))
            return bool(spooled)

        await until(spool_written, timeout=15, what="the attachment in the spool")
        assert mode(tmp_path / "spool") == 0o700
        assert {mode(p.parent) for p in spooled} == {0o700}
        assert {mode(p) for p in spooled} == {0o600}

        new = tmp_path / "outbox" / "new"
        await until(lambda: new.is_dir() and any(new.iterdir()), timeout=30, what="the reply in the Maildir")
        for folder in ("outbox", "outbox/tmp", "outbox/new", "outbox/cur"):
            assert mode(tmp_path / folder) == 0o700, folder
        assert {mode(p) for p in new.iterdir()} == {0o600}

        assert mode(tmp_path / "state") == 0o700 and mode(state) == 0o700
        for name in ("mailgate.db", "mailgate.db-wal", "mailgate.db-shm", "mailgate.db.lock"):
            assert mode(state / name) == 0o600, name
        assert await daemon.stop() == 0
    finally:
        await daemon.close()
    assert "private_file_exposed" not in daemon.text()


async def test_exposed_files_are_named_in_a_warning_and_left_alone(
    tmp_path: Path, sandbox: RunningSandbox, make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A database made 0644 by hand (its -wal and -shm follow it) and a 0755 spool: one WARNING per
    path, naming it and its mode; the modes are not changed behind the operator's back."""
    settings = settings_for(tmp_path, sandbox.url, None)
    settings.database.write_bytes(b"")
    os.chmod(settings.database, 0o644)
    settings.spool_dir.mkdir(mode=0o755)
    os.chmod(settings.spool_dir, 0o755)  # noqa: S103 (the exposed folder under test)
    caplog.set_level(logging.WARNING, logger="mailgate")
    async with make_gateway(with_relay=False):
        pass
    warned = {
        (r.path, r.mode)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("private_file_exposed") and r.levelno == logging.WARNING
    }
    db = str(settings.database)
    assert warned == {
        (db, "0644"),
        (db + "-wal", "0644"),
        (db + "-shm", "0644"),
        (str(settings.spool_dir), "0755"),
    }
    assert mode(settings.database) == 0o644 and mode(settings.spool_dir) == 0o755
