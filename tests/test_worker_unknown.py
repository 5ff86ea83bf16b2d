"""A worker id the API does not know is the operator's mistake, not the sender's: that alias's new mail
is held (queued, retried with back-off, the reason on the row), each sender is told once that the
address is not ready, the operator gets one ERROR line per alias, and after the configuration is fixed
and the gateway restarted every held message is answered. `serve` also checks the key and the worker
ids at start, in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from mailgate.service import Gateway
from tests.conftest import settings_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

WRONG = "research=wrk_research,writer=wrk_writer"  # the API knows wrk_writer and wrk_research_v2
FIXED = "research=wrk_research_v2,writer=wrk_writer"


@pytest.fixture
async def api() -> AsyncIterator[RunningSandbox]:
    options = SandboxOptions(api_key="test-key", workers=frozenset({"wrk_writer", "wrk_research_v2"}))
    async with run_sandbox(options) as sb:
        yield sb


def gateway(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, **env: str) -> Gateway:
    settings = settings_for(tmp_path, api.url, relay.port, **env)
    return Gateway(settings, poll_base=0.05, retry_base=0.05, settle_seconds=0.2, shutdown_deadline=2.0)


def queue_id(data: tuple[int, str] | None) -> str:
    assert data is not None and data[0] == 250, data
    return data[1].rsplit(" ", 1)[1]


def parsed(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(("plain",))
    assert body is not None
    return str(body.get_content())


async def test_held_told_once_and_answered_after_the_fix(
    tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """Two mails to the misconfigured alias stay queued through several 404s with one notice each and
    one ERROR in all; another alias works meanwhile; after the fix and a restart both are answered."""
    caplog.set_level(logging.INFO, logger="mailgate")
    first = make_mail(subject="First question", body="first")
    second = make_mail(subject="Second question", body="second")
    async with gateway(tmp_path, api, relay, MAILGATE_WORKERS=WRONG) as gw:
        held = [queue_id((await smtp_send(gw.smtp_port, m)).data) for m in (first, second)]
        other = queue_id((await smtp_send(gw.smtp_port, make_mail(to="writer@agents.example.com"))).data)

        async def retried() -> bool:
            rows = [await gw.store.inbound(i) for i in held]
            return all(r is not None and r.state == "queued" and r.attempts >= 3 for r in rows)

        await until(retried, timeout=20, what="both held messages tried three times")
        for inbound_id in held:
            row = await gw.store.inbound(inbound_id)
            assert row is not None and row.state == "queued" and row.reason is None
            assert row.last_error is not None
            assert "worker wrk_research not found" in row.last_error
            assert "MAILGATE_WORKERS: research=wrk_research" in row.last_error
            assert row.next_attempt_at > 0
        await relay.wait_for(3, timeout=15)  # two notices and the writer's answer

        async def writer_answered() -> bool:
            row = await gw.store.inbound(other)
            return row is not None and row.state == "answered"

        await until(writer_answered, timeout=15, what="the other alias answered")
        notices = [o for i in held for o in await gw.store.outbox_for(i)]
        assert [(o.kind, o.notice) for o in notices] == [("notice", "address_not_ready")] * 2

    unknown = [r for r in caplog.records if r.getMessage().startswith("worker_unknown")]
    assert len(unknown) == 1 and unknown[0].levelno == logging.ERROR
    assert (unknown[0].alias, unknown[0].worker) == ("research", "wrk_research")  # type: ignore[attr-defined]
    assert len(relay.messages) == 3
    told = {parsed(data)["In-Reply-To"]: parsed(data) for _, _, data in relay.messages}
    for original in (first, second):
        notice = told[original["Message-ID"]]
        assert notice["Subject"] == f"Re: {original['Subject']}"
        text = text_of(notice)
        assert "this address is not set up correctly" in text
        assert "You don't need to send it again" in text
        assert "wrk_research" not in text and "404" not in text  # operator details stay with the operator
    assert {r.worker_id for r in api.state.requests} == {"wrk_writer"}

    async with gateway(tmp_path, api, relay, MAILGATE_WORKERS=FIXED) as gw:

        async def all_answered() -> bool:
            rows = [await gw.store.inbound(i) for i in held]
            return all(r is not None and r.state == "answered" for r in rows)

        await until(all_answered, timeout=20, what="the held messages answered after the fix")
        await relay.wait_for(5, timeout=15)
        for inbound_id in held:
            row = await gw.store.inbound(inbound_id)
            assert row is not None and row.task_id is not None
            task = await gw.store.task_row(row.task_id)
            assert task is not None and task.worker_id == "wrk_research_v2"
    posted = [r.worker_id for r in api.state.requests if r.worker_id != "wrk_writer"]
    assert posted == ["wrk_research_v2", "wrk_research_v2"]  # one POST each, on the fixed worker
    answers = [parsed(d) for _, _, d in relay.messages[3:]]
    assert sorted(str(m["In-Reply-To"]) for m in answers) == sorted(
        [first["Message-ID"], second["Message-ID"]]
    )
    assert all("not set up" not in text_of(m) for m in answers)


async def test_serve_checks_the_key_and_the_workers_at_start(
    tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """One ERROR line per unknown worker id, or one for a refused key; the gateway accepts mail anyway."""
    caplog.set_level(logging.INFO, logger="mailgate")

    def problems() -> list[str]:
        return [
            r.problem  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "startup_check_failed" and r.levelno == logging.ERROR
        ]

    env = {"MAILGATE_WORKERS": "research=wrk_nope,writer=wrk_writer,extra=wrk_gone"}
    async with gateway(tmp_path, api, relay, **env) as gw:
        await until(lambda: len(problems()) == 2, what="two ERROR lines")
        assert (await smtp_send(gw.smtp_port, make_mail(to="writer@agents.example.com"))).accepted
    assert sorted(problems()) == [
        "worker extra=wrk_gone: unknown to the API (404): fix MAILGATE_WORKERS",
        "worker research=wrk_nope: unknown to the API (404): fix MAILGATE_WORKERS",
    ]

    caplog.clear()
    async with gateway(tmp_path, api, relay, HANDINGER_API_KEY="revoked") as gw:
        await until(lambda: len(problems()) == 1, what="one ERROR line for the key")
        assert (await smtp_send(gw.smtp_port, make_mail())).accepted
    assert problems() == [f"API {api.url}: the key was refused (401): check HANDINGER_API_KEY"]


async def test_the_start_up_check_does_not_delay_the_listeners(
    tmp_path: Path, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """An API that accepts the connection and never answers: start returns and mail is accepted while
    the check still waits for its answer."""
    waiting: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        waiting.append(writer)
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        settings = settings_for(tmp_path, url, relay.port)
        async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=0.5) as gw:
            await until(lambda: len(waiting) >= 1, what="the check's request at the silent API")
            assert (await smtp_send(gw.smtp_port, make_mail())).accepted
            assert not any(r.getMessage() == "startup_check_failed" for r in caplog.records)
    finally:
        server.close()
        for writer in waiting:
            writer.close()
        await server.wait_closed()
