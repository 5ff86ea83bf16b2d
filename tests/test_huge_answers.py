"""Huge answers end to end (issue 12.2): the gateway keeps answering SMTP while a 10 MB answer renders,
the reply stays under MAILGATE_MAX_REPLY_SIZE with the answer cut in the body and attached whole, the
worker's files become links (largest first) when they do not fit, and a relay's 552 gets the links-only
version of the same reply.

Real sockets throughout: the gateway, the sandbox (`answer-bytes`, `file-bytes`) and the recording relay.
"""

from __future__ import annotations

import email
import logging
import os
import time
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from bench._loopprobe import SmtpNoopProbe
from mailgate.sandbox import long_answer, served_file_bytes
from tests.conftest import env_for
from tests.daemon import Serve, write_env
from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def plain(reply: Any) -> str:
    return str(reply.get_body(preferencelist=("plain",)).get_content())


def attachments(reply: Any) -> dict[str, Any]:
    return {p.get_filename(): p for p in reply.iter_attachments()}


def lf(text: str) -> str:
    return text.replace("\r\n", "\n")


async def one_reply(gw: Any, relay: Any, body: str, timeout: float = 40) -> tuple[bytes, Any]:
    assert (await smtp_send(gw.smtp_port, make_mail(body=body))).accepted
    [(_, _, data)] = await relay.wait_for(1, timeout=timeout)
    return data, parse(data)


@pytest.mark.slow
async def test_a_10_mb_answer_renders_off_the_loop_and_arrives_cut_and_attached(
    make_gateway: Any, sandbox: Any, relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """While a 10 MB answer is composed, NOOPs on another SMTP connection keep being answered (none
    waits half the render: a render on the loop would hold one for all of it; the 100 ms figure is
    bench/huge_answer.py's, not a timed assertion); the reply is under 10 MiB, its body says the answer
    was cut, and answer.md holds all of it (8bit)."""
    caplog.set_level(logging.INFO, logger="mailgate.replies")
    size = 10_000_000
    async with make_gateway() as gw:
        async with SmtpNoopProbe("127.0.0.1", gw.smtp_port, interval=0.01) as probe:
            data, reply = await one_reply(gw, relay, f"Write it all. [sandbox:answer-bytes={size}]")
            composed = next(r for r in caplog.records if r.getMessage() == "reply_composed")
        # the render window, from the log event (wall clock) to the probe's clock (perf_counter)
        end = composed.created - time.time() + time.perf_counter()
        start = end - composed.render_ms / 1000  # type: ignore[attr-defined]
        during = probe.between(start, end)
    render = composed.render_ms / 1000  # type: ignore[attr-defined]
    assert max(during) < render / 2, f"NOOP waited {max(during) * 1000:.0f} ms of a {render:.2f} s render"
    assert len(during) >= 3, f"too few NOOPs in a {composed.render_ms} ms render to say anything"  # type: ignore[attr-defined]
    assert probe.errors == 0

    assert len(data) <= 10 * MiB
    [request] = sandbox.state.requests
    files = attachments(reply)
    assert sorted(files) == ["answer.md"]  # echo.txt (the answer again) could not fit in any reply
    whole = files["answer.md"]
    assert (whole.get_content_type(), whole["Content-Transfer-Encoding"]) == ("text/markdown", "8bit")
    assert lf(whole.get_content()) == long_answer(request.task_id, 0, size)
    assert "BODY=8BITMIME" in relay.mail_options[0]
    text = plain(reply)
    assert "This answer is 9.5 MB, too long for an email: below are its first 63 KB." in text
    assert "The whole answer is attached as answer.md." in text
    assert "[... The answer is cut here; the rest is in answer.md.]" in text
    assert len(text.encode()) < 64 * 1024 + 2048
    assert text.startswith("[This answer is")
    assert "- echo.txt (9.5 MB, too large to attach)" in text
    print(f"render {composed.render_ms} ms; NOOP max {max(during) * 1000:.1f} ms over {len(during)}")  # type: ignore[attr-defined]


async def test_files_over_the_reply_budget_become_links_largest_first(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """With a 600 KB reply limit, the largest of three files is linked with the reason; the others and
    echo.txt stay attached, byte for byte, and the reply is under the limit."""
    body = (
        "Send the data. [sandbox:file-bytes=250000 name=a.bin] "
        "[sandbox:file-bytes=150000 name=b.bin] [sandbox:file-bytes=100000 name=c.bin]"
    )
    async with make_gateway(MAILGATE_MAX_REPLY_SIZE="600000") as gw:
        data, reply = await one_reply(gw, relay, body)
    assert len(data) <= 600_000
    files = attachments(reply)
    assert sorted(files) == ["b.bin", "c.bin", "echo.txt"]
    for name, size in (("b.bin", 150_000), ("c.bin", 100_000)):
        assert files[name].get_content() == served_file_bytes(name, size)
    [request] = sandbox.state.requests
    url = f"{sandbox.url}/files/{request.task_id}/0/a.bin"
    assert f"- a.bin (244 KB, left out to keep this email under 585 KB): {url}" in plain(reply)


async def test_an_answer_too_big_even_alone_points_to_the_task_page(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """When answer.md does not fit even alone, the body, cut, sends the reader to the task page, and the
    files that then fit (smallest first) are attached, the others linked; the reply is under the limit."""
    env = {"MAILGATE_MAX_REPLY_SIZE": "300000", "MAILGATE_MAX_ANSWER_INLINE": "20000"}
    body = (
        "Long one. [sandbox:answer-bytes=400000] "
        "[sandbox:file-bytes=150000 name=a.bin] [sandbox:file-bytes=200000 name=b.bin]"
    )
    async with make_gateway(**env) as gw:
        data, reply = await one_reply(gw, relay, body)
    assert len(data) <= 300_000
    assert sorted(attachments(reply)) == ["a.bin"]  # fits once answer.md is out; b.bin does not
    [request] = sandbox.state.requests
    task_url = f"{sandbox.url}/dashboard/tasks/{request.task_id}"
    text = plain(reply)
    assert f"The whole answer is on the task page: {task_url}" in text
    assert "the rest is on the task page." in text
    assert "- echo.txt (390 KB, too large to attach)" in text  # more than any 300 KB reply can carry
    assert "- b.bin (195 KB, left out to keep this email under 292 KB)" in text
    assert long_answer(request.task_id, 0, 400_000)[:15_000] in lf(text)


async def test_a_relay_552_gets_the_links_only_reply(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """The relay refuses the reply's size at DATA: the same reply (same Message-ID) goes again at once
    without attachments, every file linked, the body cut and pointing to the task page."""
    relay.fail_next("552 5.3.4 Message size exceeds fixed limit", stage="DATA")
    body = "Report please. [sandbox:answer-bytes=200000] [sandbox:file-bytes=300000 name=data.bin]"
    async with make_gateway() as gw:
        data, reply = await one_reply(gw, relay, body)

        async def recorded() -> bool:
            return [r.state for r in await gw.store.list_outbox()] == ["sent"]

        await until(recorded, timeout=5, what="the outbox row to be sent")
        [row] = await gw.store.list_outbox()
    assert row.state == "sent" and row.fallback is None and row.data == data
    assert reply["Message-ID"] == row.message_id
    assert attachments(reply) == {}
    assert len(data) < 300_000  # the capped body in text and HTML; the refused one was ~700 KB
    [request] = sandbox.state.requests
    text = plain(reply)
    why = "not attached: the mail server refused an email this large"
    for name in ("echo.txt", "data.bin"):
        assert f"- {name} ({why}): {sandbox.url}/files/{request.task_id}/0/{name}" in text
    assert "The whole answer is on the task page:" in text
    assert len(relay.messages) == 1


def rss_of(pid: int) -> int:
    """The resident set size of process `pid`, in bytes."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
async def test_after_a_10_mb_answer_the_daemons_memory_returns(
    tmp_path: Path, sandbox: Any, relay: Any
) -> None:
    """`mailgate serve` (a process of its own) sends a 10 MB answer's reply; its RSS then comes back to
    within 50 MB of what it was before the mail."""
    env = write_env(tmp_path / "mailgate.env", env_for(tmp_path, sandbox.url, relay.port))
    daemon = Serve(env, tmp_path / "serve.log")
    await daemon.start()
    try:
        port = await daemon.started()
        assert (await smtp_send(port, make_mail(body="Warm up."))).accepted
        await relay.wait_for(1, timeout=20)
        before = rss_of(daemon.pid)
        body = "Write it all. [sandbox:answer-bytes=10000000]"
        assert (await smtp_send(port, make_mail(body=body))).accepted
        [_, (_, _, data)] = await relay.wait_for(2, timeout=60)
        assert len(data) <= 10 * MiB
        seen: list[int] = []

        def settled() -> bool:
            seen.append(rss_of(daemon.pid) - before)
            return seen[-1] < 50 * MiB

        await until(settled, timeout=20, what="RSS back within 50 MB of where it started")
        assert await daemon.stop() == 0
    finally:
        await daemon.close()
    print(
        f"RSS before {before / MiB:.0f} MiB; after the reply "
        f"+{seen[0] / MiB:.0f} -> +{seen[-1] / MiB:.0f} MiB"
    )
