"""A full disk under the store or the spool: the gateway pauses, logs a little, fails nobody, and answers
every message once when space returns. The disk is a small tmpfs mounted by the test (root only)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from tests.conftest import settings_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk the test can fill without touching the machine's."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; return it (deleting it gives the space back)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) at close
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), filler.open("ab") as f:  # the last bytes the page cache held
        while True:
            f.write(b"\0" * 512)
            f.flush()
            os.fsync(f.fileno())
    return filler


async def states(gw: Gateway) -> list[str]:
    return sorted(row.state for row in await gw.store.list_inbound())


async def test_a_full_store_mid_turn_pauses_and_every_message_is_answered_once(
    tmp_path: Path,
    small_disk: Path,
    sandbox: RunningSandbox,
    relay: RecordingRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Turns end while the store's disk is full: no crash loop, failure or notice; later one answer each."""
    caplog.set_level(logging.INFO, logger="mailgate")
    settings = settings_for(
        tmp_path,
        sandbox.url,
        relay.port,
        MAILGATE_DATABASE=str(small_disk / "mailgate.db"),
        MAILGATE_SPOOL_DIR=str(small_disk / "spool"),
        MAILGATE_MIN_FREE_SPACE="0",  # the 24 MiB disk is under the 60 MiB floor from the start
    )
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, settle_seconds=0.2) as gw:
        for n in range(3):
            seen = await smtp_send(gw.smtp_port, make_mail(body=f"Number {n} [sandbox:slow=1]"))
            assert seen.accepted
        await until(lambda: len(sandbox.state.requests) == 3, timeout=15, what="three turns posted")

        async def all_running() -> bool:  # each POST's 2xx committed (`running`) before the disk fills
            return await states(gw) == ["running"] * 3

        await until(all_running, timeout=15, what="three turns running")
        filler = fill(small_disk)
        caplog.clear()
        await until(lambda: gw.scheduler.storage.trips >= 3, timeout=20, what="the scheduler pausing")
        outage = list(caplog.records)
        assert await states(gw) == ["running"] * 3  # nobody failed, nothing half-written
        filler.unlink()
        await relay.wait_for(3, timeout=30)

        async def answered() -> bool:
            return await states(gw) == ["answered"] * 3

        await until(answered, timeout=15, what="every message answered")
        rows = await gw.store.list_inbound()
    assert len(sandbox.state.requests) == 3  # never posted again
    assert len(relay.messages) == 3  # one answer each, no notice
    assert sorted(text.split(b"Number ")[1][:1] for _, _, text in relay.messages) == [b"0", b"1", b"2"]
    assert all(row.crashes == 0 for row in rows)
    noisy = [r for r in outage if r.levelno >= logging.WARNING]
    assert not [r for r in noisy if r.getMessage() == "message_crashed"]
    assert 1 <= len(noisy) <= 6, [r.getMessage() for r in noisy]  # once a minute, not once a try
    assert any(r.getMessage() == "storage_resumed" for r in caplog.records)


async def test_a_full_spool_holds_the_message_until_space_returns(
    tmp_path: Path,
    small_disk: Path,
    sandbox: RunningSandbox,
    relay: RecordingRelay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attachment cannot be spooled (ENOSPC): the message waits, uncounted, and goes out with its file.
    (The free-space floor is off: with it, this mail would have been refused 452 at MAIL FROM.)"""
    caplog.set_level(logging.INFO, logger="mailgate")
    settings = settings_for(
        tmp_path,
        sandbox.url,
        relay.port,
        MAILGATE_SPOOL_DIR=str(small_disk / "spool"),
        MAILGATE_MIN_FREE_SPACE="0",
    )
    filler = fill(small_disk)
    data = os.urandom(256 * 1024)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05) as gw:
        seen = await smtp_send(
            gw.smtp_port,
            make_mail(body="Read this", attachments=[("data.bin", "application/octet-stream", data)]),
        )
        assert seen.accepted  # the store is on another disk: the mail is safe
        await until(lambda: gw.scheduler.storage.trips >= 3, timeout=20, what="the scheduler pausing")
        [row] = await gw.store.list_inbound()
        assert (row.state, row.crashes) == ("received", 0)
        assert sandbox.state.requests == []
        filler.unlink()
        await relay.wait_for(1, timeout=30)
    [request] = sandbox.state.requests
    assert [f.sha256 for f in request.files] == [hashlib.sha256(data).hexdigest()]
    assert not [r for r in caplog.records if r.getMessage() in ("message_crashed", "message_quarantined")]


async def test_new_mail_waits_452_while_the_spool_disk_is_under_the_floor(
    tmp_path: Path, small_disk: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """With less than MAILGATE_MIN_FREE_SPACE free under the spool, MAIL FROM gets 452 4.3.1 (the sender
    keeps the mail); once space returns the same mail is accepted."""
    settings = settings_for(
        tmp_path,
        sandbox.url,
        relay.port,
        MAILGATE_SPOOL_DIR=str(small_disk / "spool"),
        MAILGATE_MIN_FREE_SPACE=str(8 * 1024 * 1024),
    )
    filler = fill(small_disk)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05) as gw:
        with pytest.raises(Exception, match=r"4\.3\.1 Insufficient system storage") as refused:
            await smtp_send(gw.smtp_port, make_mail())
        assert getattr(refused.value, "code", None) == 452
        filler.unlink()
        assert (await smtp_send(gw.smtp_port, make_mail())).accepted


async def test_a_big_message_that_cannot_be_spooled_gets_452_and_leaves_nothing(
    tmp_path: Path, small_disk: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """DATA over 1 MiB goes to spool/incoming as it arrives; on a full disk (floor off) the end of DATA
    gets 452 4.3.1, nothing is stored and no spool file is left."""
    settings = settings_for(
        tmp_path,
        sandbox.url,
        relay.port,
        MAILGATE_SPOOL_DIR=str(small_disk / "spool"),
        MAILGATE_MIN_FREE_SPACE="0",
    )
    filler = fill(small_disk)
    big = make_mail(attachments=[("big.bin", "application/octet-stream", os.urandom(2 * 1024 * 1024))])
    async with Gateway(settings, poll_base=0.05, retry_base=0.05) as gw:
        seen = await smtp_send(gw.smtp_port, big)
        assert seen.data is not None and seen.data[0] == 452 and seen.data[1].startswith("4.3.1"), seen
        assert await gw.store.list_inbound() == []
        incoming = small_disk / "spool" / "incoming"
        await until(lambda: not incoming.exists() or not any(incoming.iterdir()), what="no spool file left")
        filler.unlink()
        assert (await smtp_send(gw.smtp_port, big)).accepted
