"""Breaking things for real: the sandbox's failure switches, a faulty relay, restarts on the same database.

Every test drives the gateway over SMTP and asserts on what a user or an operator would see: the turns the
API received, the replies and notices at the relay, and the rows an operator would inspect.
"""

from __future__ import annotations

import email
import logging
import sqlite3
import time
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from mailgate.service import Gateway
from mailgate.store import InboundRow, OutboxRow
from tests.conftest import settings_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def text_of(data: bytes) -> str:
    return str(parse(data).get_body(preferencelist=("plain",)).get_content())


def queue_id(seen: Any) -> str:
    assert seen.accepted, seen
    return str(seen.data[1].rsplit(" ", 1)[1])


async def row_of(gw: Gateway, inbound_id: str) -> InboundRow:
    row = await gw.store.inbound(inbound_id)
    assert row is not None
    return row


async def reached(gw: Gateway, inbound_id: str, *states: str, timeout: float = 15) -> InboundRow:
    """Wait until the message is in one of `states`; return its row."""

    async def check() -> bool:
        return (await row_of(gw, inbound_id)).state in states

    await until(check, timeout=timeout, what=f"{inbound_id} in {states}")
    return await row_of(gw, inbound_id)


async def outbox_of(gw: Gateway, inbound_id: str) -> list[OutboxRow]:
    return list(await gw.store.outbox_for(inbound_id))


def turns_with(sandbox: RunningSandbox, marker: str) -> list[Any]:
    return [t for task in sandbox.state.tasks.values() for t in task.turns if marker in t.input]


# --- API failures ----------------------------------------------------------------------------------


async def test_503s_are_retried_and_the_turn_is_posted_once(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Two 503s then success: one turn at the API, one reply, and the row counts three attempts."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Numbers please [sandbox:status=503 times=2]"))
        row = await reached(gw, queue_id(seen), "answered")
        [(_, _, data)] = await relay.wait_for(1, timeout=15)
    assert row.attempts == 3
    assert row.last_error is None and row.reason is None
    assert len(sandbox.state.requests) == 1
    assert "Numbers please" in text_of(data)


async def test_429_retry_after_is_honoured(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A 429 with Retry-After: 1 waits at least that long before posting again (backoff alone is 0.05 s)."""
    async with make_gateway() as gw:
        started = time.monotonic()
        seen = await smtp_send(
            gw.smtp_port, make_mail(body="Slow down [sandbox:status=429 times=1 retry-after=1]")
        )

        async def refused_once() -> bool:
            return "429" in ((await row_of(gw, queue_id(seen))).last_error or "")

        await until(refused_once, timeout=15, what="the 429 recorded on the row")
        waiting = await row_of(gw, queue_id(seen))
        await reached(gw, queue_id(seen), "answered")
        elapsed = time.monotonic() - started
        await relay.wait_for(1, timeout=15)
    assert waiting.state == "queued"  # a 429 is an answer: nothing was created, nothing to settle
    assert waiting.next_attempt_at - waiting.updated_at >= 0.95
    assert elapsed >= 0.95
    assert len(sandbox.state.requests) == 1


async def test_global_faults_on_every_endpoint_are_ridden_out(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """503/409/429 on POST and on the GET that reconciles: still one turn and one reply."""
    sandbox.state.faults.push(status=409, times=1, path="POST /api/tasks")
    sandbox.state.faults.push(status=429, times=1, retry_after=0.1, path="POST /api/tasks")
    sandbox.state.faults.push(status=503, times=3, path="GET /api/tasks/*")
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Through the storm"))
        await reached(gw, queue_id(seen), "answered")
        await relay.wait_for(1, timeout=15)
    assert len(sandbox.state.requests) == 1
    assert len(relay.messages) == 1


@pytest.mark.parametrize("switch", ["[sandbox:cut]", "[sandbox:json]", "[sandbox:slow=0.4]"])
async def test_odd_streams_end_with_the_full_answer(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay, switch: str
) -> None:
    """A cut stream, a plain JSON answer and a slow turn all end in one reply with the whole answer."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body=f"Tell me {switch}"))
        await reached(gw, queue_id(seen), "answered")
        [(_, _, data)] = await relay.wait_for(1, timeout=15)
    [turn] = turns_with(sandbox, "Tell me")
    assert turn.status == "completed"
    assert turn.output_text.strip().splitlines()[-1].strip("> ") in text_of(data)
    assert len(sandbox.state.requests) == 1


async def test_a_refused_stream_falls_back_to_the_blocking_form(
    tmp_path: Path, relay: RecordingRelay
) -> None:
    """Against the newer API (stream refused with 400), the turn is posted once, blocking, and answered."""
    async with run_sandbox(SandboxOptions(api_key="test-key", era="new")) as sb:
        settings = settings_for(tmp_path, sb.url, relay.port)
        async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
            seen = await smtp_send(gw.smtp_port, make_mail(body="New era"))
            await reached(gw, queue_id(seen), "answered")
            await relay.wait_for(1, timeout=15)
        [request] = sb.state.requests
    assert request.stream is False
    assert "New era" in text_of(relay.messages[0][2])


async def test_an_unreachable_api_is_waited_for(tmp_path: Path, relay: RecordingRelay) -> None:
    """The API is down (connection refused) when the mail arrives; once it is back the turn runs once."""
    async with run_sandbox(SandboxOptions(api_key="test-key")) as first:
        url, port = first.url, first.port
    settings = settings_for(tmp_path, url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Anyone there?"))

        async def failed_once() -> bool:
            return (await row_of(gw, queue_id(seen))).last_error is not None

        await until(failed_once, what="a failed connection attempt")
        assert "Connect" in str((await row_of(gw, queue_id(seen))).last_error)
        async with run_sandbox(SandboxOptions(api_key="test-key"), port=port) as second:
            gw.scheduler.wake()
            await reached(gw, queue_id(seen), "answered", timeout=20)
            assert len(second.state.requests) == 1
        await relay.wait_for(1, timeout=15)


async def test_401_holds_everything_quietly_and_resumes_by_itself(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """A revoked key holds every message (no notice, one loud log line); it resumes once calls succeed."""
    caplog.set_level(logging.INFO, logger="mailgate")
    sandbox.state.faults.push(status=401, times=4, path="* /api/*")
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, hold_seconds=0.3) as gw:
        ids = [
            queue_id(await smtp_send(gw.smtp_port, make_mail(body=f"held {n}", subject=f"Held {n}")))
            for n in range(3)
        ]
        for inbound_id in ids:
            await reached(gw, inbound_id, "answered", timeout=20)
        await relay.wait_for(3, timeout=15)
    loud = [r for r in caplog.records if r.getMessage().startswith("api_key_rejected")]
    assert len(loud) == 1 and loud[0].levelno == logging.ERROR
    assert any(r.getMessage().startswith("api_key_accepted") for r in caplog.records)
    assert len(sandbox.state.faults) == 0  # every 401 was met
    assert sorted(r.input.split("\nheld ", 1)[1][:1] for r in sandbox.state.requests) == ["0", "1", "2"]
    for _, _, data in relay.messages:
        assert parse(data)["Subject"].startswith("Re: Held")  # answers only: senders hear nothing of keys
        assert "401" not in text_of(data)


async def test_402_notice_once_per_thread_and_replay_after_top_up(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Out of credits: one notice per thread per day, rows kept failed; a replay then runs the turn."""
    sandbox.state.faults.push(status=402, times=2)
    async with make_gateway() as gw:
        first = make_mail(subject="Budget", body="First question")
        one = queue_id(await smtp_send(gw.smtp_port, first))
        row1 = await reached(gw, one, "failed")
        [(_, _, notice)] = await relay.wait_for(1, timeout=15)
        follow = make_mail(
            subject="Re: Budget",
            body="Second question",
            in_reply_to=first["Message-ID"],
            references=[first["Message-ID"]],
        )
        two = queue_id(await smtp_send(gw.smtp_port, follow))
        row2 = await reached(gw, two, "failed")
        assert row2.task_id == row1.task_id
        assert await gw.store.replay_inbound(one)
        gw.scheduler.wake()
        await reached(gw, one, "answered")
        await relay.wait_for(2, timeout=15)
    assert row1.reason is not None and row1.reason.startswith("API 402")
    assert row2.reason is not None and row2.reason.startswith("API 402")
    assert parse(notice)["Subject"] == "Re: Budget"
    assert "credit" in text_of(notice).lower()
    assert len(relay.messages) == 2  # the second 402 sent no notice; the replay's answer did arrive
    assert "First question" in text_of(relay.messages[1][2])
    [request] = sandbox.state.requests
    assert "First question" in request.input


@pytest.mark.parametrize("status", [400, 422])
async def test_bad_request_notice_carries_the_api_reason(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay, status: int
) -> None:
    """400 and 422 fail the message at once with a notice quoting the API's own reason."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body=f"Refuse me [sandbox:status={status}]"))
        row = await reached(gw, queue_id(seen), "failed")
        [(_, _, notice)] = await relay.wait_for(1, timeout=15)
    assert row.reason == f"API {status}: sandbox directive: HTTP {status}"
    assert row.attempts == 1
    assert f"sandbox directive: HTTP {status}" in text_of(notice)
    assert sandbox.state.requests == []


async def test_a_task_that_ends_in_error_gets_a_notice_with_the_dashboard_link(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """`[sandbox:error]`: the turn ends `error`; the sender gets a notice that links the task."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Fail please [sandbox:error]"))
        row = await reached(gw, queue_id(seen), "failed")
        [(_, _, notice)] = await relay.wait_for(1, timeout=15)
    assert row.reason == "task error"
    assert f"/dashboard/tasks/{row.task_id}" in text_of(notice)
    assert "error" in text_of(notice).lower()
    assert len(sandbox.state.requests) == 1


async def test_retry_horizon_ends_in_a_notice_and_replay_runs_it(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """With MAILGATE_RETRY_HORIZON=0.5 an API that keeps answering 503 gives up with a notice."""
    sandbox.state.faults.push(status=503, times=10_000)
    async with make_gateway(MAILGATE_RETRY_HORIZON="0.5") as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Never mind"))
        row = await reached(gw, queue_id(seen), "failed")
        [(_, _, notice)] = await relay.wait_for(1, timeout=15)
        assert row.reason is not None and "retry horizon" in row.reason
        assert row.attempts >= 2
        assert "could not" in text_of(notice).lower()
        sandbox.state.faults.clear()
        assert await gw.store.replay_inbound(row.id)
        gw.scheduler.wake()
        await reached(gw, row.id, "answered")
        await relay.wait_for(2, timeout=15)
    assert len(sandbox.state.requests) == 1


# --- duplicates ----------------------------------------------------------------------------------


async def test_the_same_message_id_twice_is_one_turn(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A redelivery with the same Message-ID gets 250 naming the first queue id and creates nothing."""
    mail = make_mail(body="Once only")
    async with make_gateway() as gw:
        first = await smtp_send(gw.smtp_port, mail)
        again = await smtp_send(gw.smtp_port, mail)
        await reached(gw, queue_id(first), "answered")
        await relay.wait_for(1, timeout=15)
        assert again.accepted and again.data is not None
        assert again.data[1] == f"2.0.0 Ok: already queued as {queue_id(first)}"
        assert len(await gw.store.list_inbound()) == 1
    assert len(sandbox.state.requests) == 1
    assert len(relay.messages) == 1


async def test_without_message_id_the_content_hash_dedupes_per_recipient(
    make_gateway: Any, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """No Message-ID: identical bytes dedupe by hash; the same bytes to another worker are a new task."""
    mail = make_mail(body="No id here")
    del mail["Message-ID"]
    raw = mail.as_bytes()
    async with make_gateway() as gw:
        first = await smtp_send(gw.smtp_port, raw, rcpts=["research@agents.example.com"])
        again = await smtp_send(gw.smtp_port, raw, rcpts=["research@agents.example.com"])
        other = await smtp_send(gw.smtp_port, raw, rcpts=["writer@agents.example.com"])
        assert again.data is not None and "already queued as " + queue_id(first) in again.data[1]
        assert queue_id(other) != queue_id(first)
        await reached(gw, queue_id(first), "answered")
        await reached(gw, queue_id(other), "answered")
        await relay.wait_for(2, timeout=15)
        rows = await gw.store.list_inbound()
    assert len(rows) == 2
    assert sorted(str(r.worker_id) for r in sandbox.state.requests) == ["wrk_research", "wrk_writer"]


# --- the relay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["RCPT", "DATA"])
async def test_relay_451_then_250_delivers_one_reply_with_the_stored_message_id(
    make_gateway: Any, relay: RecordingRelay, stage: Any
) -> None:
    """The relay defers once: the row retries and delivers the Message-ID it stored before the first try."""
    relay.fail_next("451 4.3.0 Try again later", times=1, stage=stage)
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Deferred reply"))
        await reached(gw, queue_id(seen), "answered")
        [(_, _, data)] = await relay.wait_for(1, timeout=15)

        async def sent() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["sent"]

        await until(sent, what="the outbox row sent")
        [row] = await outbox_of(gw, queue_id(seen))
    assert row.attempts == 2
    assert row.message_id == parse(data)["Message-ID"]
    assert row.last_error is None and (row.relay_reply or "").startswith("250")
    assert len(relay.messages) == 1


async def test_relay_5xx_is_dead_with_the_reason_and_replay_sends_it(
    make_gateway: Any, relay: RecordingRelay
) -> None:
    """A 554 at DATA ends the row `dead` with the relay's words; an operator's replay delivers it."""
    relay.fail_next("554 5.7.1 Content refused", times=1, stage="DATA")
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Refused reply"))
        await reached(gw, queue_id(seen), "answered")

        async def dead() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["dead"]

        await until(dead, what="the outbox row dead")
        [row] = await outbox_of(gw, queue_id(seen))
        assert row.last_error is not None and "554 5.7.1 Content refused" in row.last_error
        assert relay.messages == []
        assert await gw.store.replay_outbox(row.id)
        gw.outbox.wake()
        [(_, _, data)] = await relay.wait_for(1, timeout=15)
    assert parse(data)["Message-ID"] == row.message_id


async def test_relay_horizon_ends_dead(make_gateway: Any, relay: RecordingRelay) -> None:
    """A relay that keeps deferring: past MAILGATE_RETRY_HORIZON the row is `dead` with the last reply."""
    relay.fail_next("421 4.3.2 Busy", times=10_000, stage="MAIL")
    async with make_gateway(MAILGATE_RETRY_HORIZON="1") as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Busy relay"))

        async def dead() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["dead"]

        await until(dead, timeout=20, what="the outbox row dead")
        [row] = await outbox_of(gw, queue_id(seen))
    assert row.attempts >= 2
    assert row.last_error is not None and "421 4.3.2 Busy" in row.last_error


async def test_partial_recipient_refusals_are_recorded_and_4xx_retried(
    make_gateway: Any, relay: RecordingRelay
) -> None:
    """Cc refused with 550 is recorded; a Cc deferred with 450 gets the same message on a later try."""
    relay.refuse("bob@example.org", "550 5.1.1 No such user")
    relay.refuse("carol@example.org", "450 4.2.1 Mailbox busy")
    async with make_gateway() as gw:
        mail = make_mail(body="For the team", cc=["bob@example.org", "carol@example.org"])
        seen = await smtp_send(gw.smtp_port, mail, rcpts=["research@agents.example.com"])
        await reached(gw, queue_id(seen), "answered")
        await relay.wait_for(1, timeout=15)

        async def retrying() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["retry"]

        await until(retrying, what="a retry for the deferred recipient")
        relay.accept("carol@example.org")
        gw.outbox.wake()
        await relay.wait_for(2, timeout=15)

        async def sent() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["sent"]

        await until(sent, what="the outbox row sent")
        [row] = await outbox_of(gw, queue_id(seen))
    assert relay.messages[0][1] == ["alice@example.org"]
    assert relay.messages[1][1] == ["carol@example.org"]
    assert parse(relay.messages[0][2])["Message-ID"] == parse(relay.messages[1][2])["Message-ID"]
    assert row.refused is not None
    assert "bob@example.org" in row.refused and "550 5.1.1" in row.refused
    assert "carol@example.org" not in row.refused


# --- restarts and quarantine ----------------------------------------------------------------------


async def test_restart_waits_for_a_running_turn_without_posting_again(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Stopped while the turn runs, restarted on the same database: the turn is waited for, not reposted."""
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=0.05) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Long one [sandbox:slow=3]"))
        await reached(gw, queue_id(seen), "running")  # the API answered 2xx: the turn runs there
    # the stop cut the turn's stream: the turn is still running at the API and the row says so
    with sqlite3.connect(settings.database) as db:
        (state,) = db.execute("SELECT state FROM inbound WHERE id=?", (queue_id(seen),)).fetchone()
    db.close()
    [turn] = turns_with(sandbox, "Long one")
    assert (state, turn.status) == ("running", "running")
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        await reached(gw, queue_id(seen), "answered")
        await relay.wait_for(1, timeout=15)
    assert len(sandbox.state.requests) == 1
    assert len(relay.messages) == 1
    assert "Long one" in text_of(relay.messages[0][2])


async def test_restart_reconciles_a_submitting_row_with_get(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A row left `submitting` (the POST reached the API, then a crash before the commit) is not reposted."""
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Posted before the crash [sandbox:slow=1]"))
        await reached(gw, queue_id(seen), "running")
    with sqlite3.connect(settings.database) as db:  # what a kill between POST and commit leaves behind
        db.execute("UPDATE inbound SET state='submitting' WHERE id=?", (queue_id(seen),))
    db.close()
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        await reached(gw, queue_id(seen), "answered")
        await relay.wait_for(1, timeout=15)
    assert len(sandbox.state.requests) == 1


async def test_restart_sends_a_pending_reply_with_the_same_message_id(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A reply that could not be delivered before the stop is delivered after the restart, unchanged."""
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    relay.fail_next("451 4.3.0 Not now", times=10_000, stage="MAIL")
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Deliver me later"))
        await reached(gw, queue_id(seen), "answered")

        async def retrying() -> bool:
            return [o.state for o in await outbox_of(gw, queue_id(seen))] == ["retry"]

        await until(retrying, what="the reply waiting for a retry")
        [stored] = await outbox_of(gw, queue_id(seen))
    relay._faults.clear()
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        gw.outbox.wake()
        [(_, _, data)] = await relay.wait_for(1, timeout=20)
    assert parse(data)["Message-ID"] == stored.message_id
    assert len(sandbox.state.requests) == 1


async def test_a_message_that_keeps_crashing_is_quarantined(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Processing that fails every time (the spool is unusable) stops after N attempts with the error."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool directory should be")
    settings = settings_for(
        tmp_path,
        sandbox.url,
        relay.port,
        MAILGATE_SPOOL_DIR=str(blocker),
        MAILGATE_MAX_PROCESSING_ATTEMPTS="3",
    )
    mail = make_mail(body="With a file", attachments=[("a.txt", "text/plain", b"hello")])
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        row = await reached(gw, queue_id(await smtp_send(gw.smtp_port, mail)), "failed")
        [(_, _, notice)] = await relay.wait_for(1, timeout=15)
    assert row.reason is not None and row.reason.startswith("quarantined after 3 failed attempts")
    assert "Error" in row.reason  # the error's type is kept for the operator
    assert "could not" in text_of(notice).lower()
    assert sandbox.state.requests == []


async def test_a_message_that_kills_the_process_is_quarantined_on_start(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A row whose composing was started N times without finishing (the process died) is not tried again."""
    settings = settings_for(tmp_path, sandbox.url, relay.port, MAILGATE_MAX_PROCESSING_ATTEMPTS="2")
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Deadly"))
        await reached(gw, queue_id(seen), "answered")
        await relay.wait_for(1, timeout=15)
    with sqlite3.connect(settings.database) as db:  # as two deaths mid-compose would leave it
        db.execute("UPDATE inbound SET state='received', crashes=2, input=NULL WHERE id=?", (queue_id(seen),))
    db.close()
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        row = await reached(gw, queue_id(seen), "failed")
        await relay.wait_for(2, timeout=15)
    assert row.reason is not None and row.reason.startswith("quarantined after 2 failed attempts")
    assert len(sandbox.state.requests) == 1


async def test_a_message_whose_notice_also_fails_still_comes_to_rest(
    tmp_path: Path, sandbox: Any, relay: Any
) -> None:
    """Quarantine ends in `failed` even when the gave-up notice cannot be rendered: no endless retry."""
    templates = tmp_path / "templates"
    templates.mkdir()
    for name in ("answer.txt", "notice_gave_up.txt"):
        (templates / name).write_text("{{ no_such_variable }}\n")  # renders only by raising
    settings = settings_for(
        tmp_path, sandbox.url, relay.port,
        MAILGATE_TEMPLATES_DIR=str(templates), MAILGATE_MAX_PROCESSING_ATTEMPTS="2",
    )  # fmt: skip
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        assert (await smtp_send(gw.smtp_port, make_mail(subject="Poison"))).accepted

        async def failed() -> bool:
            rows = await gw.store.list_inbound()
            return bool(rows) and rows[0].state == "failed"

        await until(failed, timeout=20, what="the message to be quarantined")
        [row] = await gw.store.list_inbound()
    assert row.reason is not None and row.reason.startswith("quarantined after 2 failed attempts")
    assert relay.messages == []
