"""Issue 19 end to end, over real sockets: strangers wait instead of bouncing
(MAILGATE_UNKNOWN_SENDERS=hold, `mailgate approve`/`deny`/`senders`), and the sender steers the task
from the thread (`/status`, `/archive`, `/help`)."""

from __future__ import annotations

import email
import json
import logging
import shutil
import time
from email.policy import default
from pathlib import Path
from typing import Any

import anyio
import pytest

from mailgate import cli
from mailgate.sandbox import RunningSandbox
from tests.conftest import both_stores
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

STRANGER = "stranger@elsewhere.example"
HOLD = {"MAILGATE_UNKNOWN_SENDERS": "hold"}


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def body_text(msg: Any) -> str:
    return str(msg.get_body(preferencelist=("plain",)).get_content())


def queue_id(seen: Any) -> str:
    assert seen.data is not None and seen.data[0] == 250, seen
    return str(seen.data[1]).rsplit(" ", 1)[1]


async def operator(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, database: str, *argv: str
) -> tuple[int, str, str]:
    """Run an operator verb of the real CLI (in a thread: it runs its own event loop) on `database` (an
    SQLite path or a PostgreSQL URL)."""
    env = tmp_path / "operator.env"
    env.write_text(f"MAILGATE_DATABASE={database}\nMAILGATE_LOG_LEVEL=ERROR\n")
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, [*argv, "--env-file", str(env)])
    out, err = capsys.readouterr()
    return code, out, err


async def state_of(gw: Any, inbound_id: str) -> str:
    row = await gw.store.inbound(inbound_id)
    assert row is not None
    return str(row.state)


async def reaches(gw: Any, inbound_id: str, state: str) -> None:
    async def check() -> bool:
        return await state_of(gw, inbound_id) == state

    await until(check, timeout=15, what=f"{inbound_id} {state}")


def from_stranger(subject: str, body: str = "Can you help me?") -> Any:
    return make_mail(sender=STRANGER, subject=subject, body=body)


# --- 4. strangers wait instead of bouncing ----------------------------------------------------------------


async def test_refuse_is_the_default(make_gateway: Any, sandbox: Any) -> None:
    """Without MAILGATE_UNKNOWN_SENDERS a stranger still gets 550 5.7.1, as before."""
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, from_stranger("Hello"), mail_from=STRANGER)
    assert seen.data is not None and seen.data[0] == 550 and seen.data[1].startswith("5.7.1")


@both_stores
async def test_hold_approve_always_deny_and_the_allow_list_survives_a_restart(
    make_gateway: Any,
    sandbox: RunningSandbox,
    relay: RecordingRelay,
    database: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """A stranger's mail gets 250 and waits `held`; the sender is told once; `approve --always` runs it
    and allows the sender (listed by `senders`, still there after a restart, when new mail runs at
    once); `deny` ends the other held message; neither verb takes a message that is not held (exit 1)."""
    async with make_gateway(**HOLD) as gw:
        first = await smtp_send(gw.smtp_port, from_stranger("First"), mail_from=STRANGER)
        second = await smtp_send(gw.smtp_port, from_stranger("Second"), mail_from=STRANGER)
        held = [queue_id(first), queue_id(second)]
        assert [await state_of(gw, i) for i in held] == ["held", "held"]
        [(_, rcpts, told)] = await relay.wait_for(1, timeout=15)

        async def both_told() -> bool:
            rows = [await gw.store.inbound(i) for i in held]
            return all(row is not None and row.told_at is not None for row in rows)

        await until(both_told, what="both held messages looked at")
        assert len(relay.messages) == 1  # told once, not once per message
        code, out, _ = await operator(capsys, tmp_path, database, "messages", "--state", "held", "--json")
        assert code == 0 and sorted(json.loads(line)["id"] for line in out.splitlines()) == sorted(held)

        code, out, _ = await operator(capsys, tmp_path, database, "approve", held[0], "--always")
        assert code == 0 and f"{STRANGER}: allowed from now on" in out
        gw.scheduler.wake()
        await reaches(gw, held[0], "answered")
        await relay.wait_for(2, timeout=15)
        assert (await operator(capsys, tmp_path, database, "approve", held[0]))[0] == 1

        code, out, _ = await operator(capsys, tmp_path, database, "deny", held[1])
        assert code == 0 and "denied" in out
        assert await state_of(gw, held[1]) == "ignored"
        assert (await operator(capsys, tmp_path, database, "deny", held[1]))[0] == 1

    assert rcpts == [STRANGER]
    assert "waiting for approval" in body_text(parse(told))
    assert len(sandbox.state.requests) == 1 and "Can you help me?" in sandbox.state.requests[0].input

    code, out, _ = await operator(capsys, tmp_path, database, "senders", "--json")
    [allowed] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and allowed["addr"] == STRANGER and held[0] in allowed["note"]
    async with make_gateway(**HOLD) as gw:  # a restart: the allow list is in the store
        third = await smtp_send(gw.smtp_port, from_stranger("Third"), mail_from=STRANGER)
        await reaches(gw, queue_id(third), "answered")
    assert len(sandbox.state.requests) == 2


async def test_a_held_notice_that_cannot_be_made_does_not_stop_the_loop(
    make_gateway: Any, relay: RecordingRelay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When the "held" notice cannot be rendered, the message is logged, marked told and still waits for
    the operator; the loop goes on (it is not tried again on every pass)."""
    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).parents[1] / "templates", templates)
    (templates / "notice_held.txt").write_text("{{ 1 // 0 }}\n")  # fails when rendered
    caplog.set_level(logging.WARNING, logger="mailgate")
    async with make_gateway(**HOLD, MAILGATE_TEMPLATES_DIR=str(templates)) as gw:
        reply = await smtp_send(gw.smtp_port, from_stranger("Broken"), mail_from=STRANGER)
        held = queue_id(reply)

        async def told() -> bool:
            row = await gw.store.inbound(held)
            return row is not None and row.told_at is not None

        await until(told, what="the held message marked told")
        assert await state_of(gw, held) == "held"
        assert [r.inbound for r in caplog.records if r.getMessage() == "held_notice_failed"] == [held]  # type: ignore[attr-defined]
        assert not any(r.getMessage() == "held_mail_failed" for r in caplog.records)
    assert relay.messages == []


@both_stores
async def test_held_mail_is_dropped_after_seven_days_with_a_log_line(
    make_gateway: Any, sandbox: Any, relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A held message neither approved nor denied within 7 days ends `ignored`, with one WARNING."""
    caplog.set_level(logging.INFO, logger="mailgate")
    async with make_gateway(**HOLD) as gw:
        seen = await smtp_send(gw.smtp_port, from_stranger("Forgotten"), mail_from=STRANGER)
        await relay.wait_for(1, timeout=15)  # told it waits
        gw.held_mail.clock = lambda: time.time() + 8 * 86400
        gw.held_mail._swept = float("-inf")
        gw.held_mail.wake()
        await reaches(gw, queue_id(seen), "ignored")
        row = await gw.store.inbound(queue_id(seen))
    assert row is not None and "7 days" in (row.reason or "")
    [line] = [r for r in caplog.records if r.getMessage().startswith("held_dropped")]
    assert line.levelno == logging.WARNING and line.__dict__["inbound"] == queue_id(seen)
    assert sandbox.state.requests == []


async def test_in_a_reply_storm_a_held_sender_is_told_after_it_not_never(
    make_gateway: Any, relay: RecordingRelay
) -> None:
    """Notices pause in a reply storm; a held message's sender is not marked told meanwhile (that would
    be never), and is told once the storm is over."""
    async with make_gateway(**HOLD, MAILGATE_MAX_REPLIES_PER_MINUTE="1") as gw:
        assert (await smtp_send(gw.smtp_port, make_mail())).accepted
        await relay.wait_for(1, timeout=15)  # one reply in the last minute: the limit, a storm
        held = queue_id(await smtp_send(gw.smtp_port, from_stranger("Waiting"), mail_from=STRANGER))
        limits = gw.held_mail.replies.limits
        for _ in range(3):
            await gw.held_mail.tick()
        row = await gw.store.inbound(held)
        assert row is not None and row.told_at is None and limits.storming
        limits.clock = lambda: time.time() + 120  # a minute later: the storm is over
        limits._counted = (float("-inf"), 0)
        gw.held_mail.clock = limits.clock
        await gw.held_mail.tick()
        [(_, rcpts, told)] = (await relay.wait_for(2, timeout=15))[1:]
    assert rcpts == [STRANGER] and "waiting for approval" in body_text(parse(told))


@both_stores
async def test_past_max_held_a_strangers_new_mail_gets_452_and_a_retry_still_gets_its_250(
    make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """MAILGATE_MAX_HELD bounds the mail waiting for an operator: the next stranger's new mail gets
    452 4.3.1 (kept by its MTA) with a `held_full` warning; a retry of a held one still gets its 250
    (already queued); once one is denied there is room again."""
    caplog.set_level(logging.WARNING, logger="mailgate")
    async with make_gateway(**HOLD, MAILGATE_MAX_HELD="2") as gw:
        first = from_stranger("One")
        held = [queue_id(await smtp_send(gw.smtp_port, first, mail_from=STRANGER))]
        held.append(queue_id(await smtp_send(gw.smtp_port, from_stranger("Two"), mail_from=STRANGER)))
        full = await smtp_send(gw.smtp_port, from_stranger("Three"), mail_from=STRANGER)
        assert full.data == (452, "4.3.1 Too many messages are waiting for approval; try again later")
        again = await smtp_send(gw.smtp_port, first, mail_from=STRANGER)
        assert again.data is not None and f"already queued as {held[0]}" in str(again.data[1])
        assert await gw.store.deny_held(held[1])
        third = await smtp_send(gw.smtp_port, from_stranger("Three"), mail_from=STRANGER)
        assert await state_of(gw, queue_id(third)) == "held"
    assert [r.getMessage() for r in caplog.records].count("held_full") == 1


# --- 5. the sender steers the task from the thread ------------------------------------------------------


def reply_in(answer: Any, body: str, **mail: Any) -> Any:
    """A reply to mailgate's `answer`, to its Reply-To."""
    references = [*str(answer["References"] or "").split(), str(answer["Message-ID"])]
    return make_mail(
        to=str(answer["Reply-To"]),
        subject=str(answer["Subject"]),
        body=body,
        in_reply_to=str(answer["Message-ID"]),
        references=references,
        **mail,
    )


@both_stores
async def test_status_answers_from_the_api_while_the_turn_runs_without_a_turn(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """`/status` in a reply to the "working on it" notice, while the task's turn runs: the gateway
    answers at once (status, turns, usage, link) and posts nothing; the message is `answered`."""
    async with make_gateway(MAILGATE_ACK_AFTER="0.2") as gw:
        first = await smtp_send(gw.smtp_port, make_mail(body="Take your time. [sandbox:slow=30]"))
        [(_, _, working)] = await relay.wait_for(1, timeout=15)
        seen = await smtp_send(gw.smtp_port, reply_in(parse(working), "/status\n\nThanks!"))
        [_, (_, rcpts, data)] = await relay.wait_for(2, timeout=15)
        await reaches(gw, queue_id(seen), "answered")
        assert await state_of(gw, queue_id(first)) == "running"
    [request] = sandbox.state.requests  # no turn for the command
    text = body_text(parse(data))
    assert rcpts == ["alice@example.org"]
    assert "- Status: running" in text and "- Turns: 1 (1 running)" in text and "- Usage:" in text
    assert str(sandbox.state.tasks[request.task_id].url) in text


@both_stores
async def test_archive_then_a_reply_starts_a_new_task(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """`/archive` archives the task at the API and confirms in the thread; the next reply in the same
    thread starts a new task, and its answer says why."""
    async with make_gateway() as gw:
        assert (await smtp_send(gw.smtp_port, make_mail(body="First question"))).accepted
        [(_, _, answer)] = await relay.wait_for(1, timeout=15)
        assert (await smtp_send(gw.smtp_port, reply_in(parse(answer), "/Archive"))).accepted
        [_, (_, _, confirmed)] = await relay.wait_for(2, timeout=15)
        later = reply_in(parse(confirmed), "A new question, please.")
        assert (await smtp_send(gw.smtp_port, later)).accepted
        [*_, (_, _, third)] = await relay.wait_for(3, timeout=15)
    first_task = sandbox.state.requests[0].task_id
    assert sandbox.state.tasks[first_task].archived
    assert "is archived" in body_text(parse(confirmed))
    assert [r.seq for r in sandbox.state.requests] == [0, 0]
    assert sandbox.state.requests[1].task_id != first_task
    assert "was archived, so this message started a new task" in body_text(parse(third))


@both_stores
async def test_help_lists_the_commands_and_counts_against_the_notice_limit(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """`/help` is answered with the list of commands, without a turn; with one notice a day allowed,
    a second `/help` gets nothing (and still ends `answered`)."""
    async with make_gateway(MAILGATE_MAX_NOTICES_PER_DAY="1") as gw:
        one = await smtp_send(gw.smtp_port, make_mail(body="/help"))
        [(_, _, data)] = await relay.wait_for(1, timeout=15)
        await reaches(gw, queue_id(one), "answered")
        two = await smtp_send(gw.smtp_port, make_mail(body="/help"))
        await reaches(gw, queue_id(two), "answered")
        assert await gw.store.outbox_for(queue_id(two)) == []
        second = await gw.store.inbound(queue_id(two))
        assert second is not None and "no reply sent" in (second.reason or "")
        first = await gw.store.inbound(queue_id(one))
        assert first is not None and "no reply sent" not in (first.reason or "")
    text = body_text(parse(data))
    assert "/status" in text and "/archive" in text and "/help" in text
    assert sandbox.state.requests == []


@both_stores
@pytest.mark.parametrize(
    "body",
    [
        "One more question about Q3.\n\nOn Mon, Bob wrote:\n> /archive\n> old text\n",
        "One more question about Q3.\n/archive\n",
    ],
    ids=["quoted", "not-first-line"],
)
async def test_a_command_not_at_the_start_of_the_new_text_does_nothing(
    make_gateway: Any, sandbox: Any, relay: Any, body: str
) -> None:
    """`/archive` in quoted material, or below the first line, is just text: the turn runs, nothing is
    archived."""
    async with make_gateway() as gw:
        assert (await smtp_send(gw.smtp_port, make_mail(body="First question"))).accepted
        [(_, _, answer)] = await relay.wait_for(1, timeout=15)
        assert (await smtp_send(gw.smtp_port, reply_in(parse(answer), body))).accepted
        await relay.wait_for(2, timeout=15)
    task_id = sandbox.state.requests[0].task_id
    assert [(r.task_id, r.seq) for r in sandbox.state.requests] == [(task_id, 0), (task_id, 1)]
    assert not sandbox.state.tasks[task_id].archived
