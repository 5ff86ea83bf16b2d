"""The turn scheduler on its own: the real steps, replies, spool, store and sandbox API, wired as
`Gateway.start` wires them but without the SMTP listener or the outbox loop (`tests.components`).

Messages enter through `Admission.accept`. What is asserted is what the API saw (the sandbox's turns, and
each request's wall-clock time from `ApiLog`) against what the store committed and when.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from mailgate.models import InboundState
from mailgate.sandbox import RunningSandbox
from mailgate.turns import steps
from tests.components import TurnStack, turn_stack
from tests.conftest import DOMAIN
from tests.mail import make_mail, until

pytestmark = pytest.mark.anyio

RESEARCH = f"research@{DOMAIN}"
ALICE = "alice@example.org"


async def admit(stack: TurnStack, subject: str, body: str, **mail: str) -> str:
    """Admit one mail from alice to research@ (as DATA would) and wake the scheduler; its queue id."""
    raw = make_mail(subject=subject, body=body, **mail).as_bytes()
    [reply] = await stack.admission.accept(ALICE, [RESEARCH], raw)
    assert reply.code == 250, reply
    stack.scheduler.wake()
    return reply.text.rsplit(" ", 1)[1]


def at(iso: str | None) -> float:
    """A sandbox timestamp ("...T12:00:00.123Z", whole milliseconds) as epoch seconds."""
    assert iso is not None
    return datetime.fromisoformat(iso).timestamp()


async def test_two_messages_of_one_task_are_posted_in_arrival_order(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """The second message of a task is posted after the first, and only once the first is answered."""
    async with turn_stack(tmp_path, sandbox, run=False) as stack:
        first = await admit(stack, "Plan", "First question [sandbox:slow=0.2]", message_id="<p1@example.org>")
        second = await admit(stack, "Re: Plan", "Second question", in_reply_to="<p1@example.org>")
        task_id = (await stack.row(first)).task_id
        assert task_id is not None and (await stack.row(second)).task_id == task_id
        stack.start_scheduler()
        answered_second = await stack.reached(second, InboundState.ANSWERED)
        answered_first = await stack.row(first)
    posts = [c for c in stack.api_log.calls if c.method == "POST"]
    turns = sandbox.state.turns_of(task_id)
    assert [r.task_id for r in sandbox.state.requests] == [task_id, task_id]
    assert "First question" in turns[0].input and "Second question" in turns[1].input
    assert (answered_first.state, answered_first.turn_seq, answered_second.turn_seq) == ("answered", 0, 1)
    assert len(posts) == 2
    assert posts[1].started >= answered_first.updated_at  # after the first's answer was committed
    assert at(turns[1].started_at) >= at(turns[0].completed_at)


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_concurrency_bounds_how_many_tasks_run_at_once(
    tmp_path: Path, sandbox: RunningSandbox, concurrency: int
) -> None:
    """With MAILGATE_CONCURRENCY=1 a quick task waits for a slow one; with 2 it runs beside it, ends first."""
    async with turn_stack(tmp_path, sandbox, run=False, MAILGATE_CONCURRENCY=str(concurrency)) as stack:
        slow = await admit(stack, "Slow", "The slow task [sandbox:slow=0.8]")
        quick = await admit(stack, "Quick", "The quick task")
        stack.start_scheduler()
        slow_row = await stack.reached(slow, InboundState.ANSWERED)
        quick_row = await stack.reached(quick, InboundState.ANSWERED)
    posts = sorted((c for c in stack.api_log.calls if c.method == "POST"), key=lambda c: c.started)
    [slow_turn] = sandbox.state.turns_of(slow_row.task_id or "")
    [quick_turn] = sandbox.state.turns_of(quick_row.task_id or "")
    assert len(posts) == 2
    if concurrency == 1:
        assert posts[1].started >= slow_row.updated_at  # posted once the slow one was answered
        assert at(quick_turn.started_at) >= at(slow_turn.completed_at)
    else:
        assert posts[1].started < at(slow_turn.completed_at)  # posted while the slow one ran
        assert quick_row.updated_at < slow_row.updated_at  # and answered first


async def test_a_burst_starts_a_few_at_a_time_and_every_turn_runs_at_once(
    tmp_path: Path, sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages are prepared and posted a few at a time (`steps.STARTING`, 2 here), and a slot is given
    back once the API has taken the turn: five slow turns all run at the same time."""
    monkeypatch.setattr(steps, "STARTING", 2)
    async with turn_stack(tmp_path, sandbox, run=False, MAILGATE_CONCURRENCY="10") as stack:
        ids = [await admit(stack, f"Burst {i}", "Take your time [sandbox:slow=1.5]") for i in range(5)]
        stack.start_scheduler()
        rows = [await stack.reached(i, InboundState.ANSWERED) for i in ids]
    posts = [c for c in stack.api_log.calls if c.method == "POST"]
    ended = min(at(t.completed_at) for row in rows for t in sandbox.state.turns_of(row.task_id or ""))
    assert len(posts) == 5
    assert all(p.answered < ended for p in posts)  # every turn was taken before the first one ended
    most = max(sum(1 for q in posts if q.started <= p.started < q.answered) for p in posts)
    assert most <= 2  # never more POSTs awaiting their answer than slots


async def test_a_401_holds_every_message_until_the_key_works(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """After a 401 nothing is posted while held (a message arriving then waits too); the refused row is
    `queued`, not `submitting`; once the API accepts the key again, both run."""
    hold = 0.6
    sandbox.state.faults.push(status=401, times=10_000, path="* /api/*")
    async with turn_stack(tmp_path, sandbox, hold_seconds=hold) as stack:
        first = await admit(stack, "Held", "Posted while the key is refused")

        async def refused() -> bool:
            return ((await stack.row(first)).last_error or "").startswith("401")

        await until(refused, what="the first message to meet the 401")
        held = await stack.row(first)
        assert held.state == InboundState.QUEUED and held.attempts == 1
        [refusal] = stack.api_log.calls
        assert (refusal.method, refusal.status) == ("POST", 401)
        second = await admit(stack, "Also held", "Arrives during the hold")

        async def hold_over() -> bool:
            rows = [await stack.row(first), await stack.row(second)]
            if time.time() >= refusal.answered + hold:
                return True
            # read before the hold can have ended: nothing moved, the newcomer was not even read
            assert [r.state for r in rows] == [InboundState.QUEUED, InboundState.RECEIVED]
            return False

        await until(hold_over, what="the hold to end")
        sandbox.state.faults.clear()
        await stack.reached(first, InboundState.ANSWERED)
        await stack.reached(second, InboundState.ANSWERED)
    later = stack.api_log.calls[1:]
    assert later and all(c.started >= refusal.answered + hold for c in later)  # nothing while held
    assert len([c for c in later if c.method == "POST" and c.status == 200]) == 2
    assert len(sandbox.state.requests) == 2  # one turn each


@pytest.mark.parametrize(
    ("stream", "state_at_drain"),
    [("true", InboundState.RUNNING), ("false", InboundState.SUBMITTING)],
    ids=["streamed", "blocking"],
)
async def test_drain_cancels_a_running_job_and_a_restart_resumes_it(
    tmp_path: Path, sandbox: RunningSandbox, stream: str, state_at_drain: str
) -> None:
    """Drain cancels a job mid-turn and leaves its row where a restart resumes it, without a second POST."""
    async with turn_stack(tmp_path, sandbox, MAILGATE_STREAM=stream) as stack:
        queue_id = await admit(stack, "Long", "A long one [sandbox:slow=0.6]")
        await until(lambda: len(sandbox.state.requests) == 1, what="the turn to be posted")
        await stack.reached(queue_id, state_at_drain)
        assert await stack.stop_scheduler(timeout=0.05) == 1
        left = await stack.row(queue_id)
        assert stack.scheduler.in_flight == 0
    assert (left.state, left.attempts, left.turn_seq) == (state_at_drain, 1, 0)
    assert sandbox.state.tasks[left.task_id or ""].turns[0].running  # the API still works on it
    async with turn_stack(tmp_path, sandbox, MAILGATE_STREAM=stream) as restarted:
        done = await restarted.reached(queue_id, InboundState.ANSWERED)
        [answer] = await restarted.store.outbox_for(queue_id)
    assert len(sandbox.state.requests) == 1
    assert (done.turn_seq, answer.kind, answer.recipient_list) == (0, "answer", [ALICE])
    assert b"A long one" in answer.data


async def test_a_draining_scheduler_starts_no_new_job(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """Once `drain` began, due work stays in the store (the store closes next): the loop starts no job."""
    async with turn_stack(tmp_path, sandbox, run=False) as stack:
        assert await stack.scheduler.drain(1.0) == 0
        queue_id = await admit(stack, "Late", "Arrived while stopping")
        await stack.scheduler._start_due()  # the loop's next look, as it would run before its cancel
        assert stack.scheduler.in_flight == 0
        assert (await stack.row(queue_id)).state == InboundState.RECEIVED
    assert sandbox.state.requests == []


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_message_that_always_crashes_is_quarantined_with_one_notice(
    tmp_path: Path, sandbox: RunningSandbox, attempts: int
) -> None:
    """Processing that fails every time ends `failed` after MAILGATE_MAX_PROCESSING_ATTEMPTS, with one
    "gave up" notice in the outbox and nothing sent to the API."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool directory should be")
    env = {"MAILGATE_SPOOL_DIR": str(blocker), "MAILGATE_MAX_PROCESSING_ATTEMPTS": str(attempts)}
    async with turn_stack(tmp_path, sandbox, **env) as stack:
        raw = make_mail(body="With a file", attachments=[("a.txt", "text/plain", b"hello")]).as_bytes()
        [reply] = await stack.admission.accept(ALICE, [RESEARCH], raw)
        queue_id = reply.text.rsplit(" ", 1)[1]
        stack.scheduler.wake()
        row = await stack.reached(queue_id, InboundState.FAILED)
        notices = await stack.store.outbox_for(queue_id)
    assert row.reason is not None and row.reason.startswith(f"quarantined after {attempts} failed attempts: ")
    assert "Error" in row.reason  # the exception's type, for the operator
    assert [(n.kind, n.notice, n.recipient_list) for n in notices] == [("notice", "gave_up", [ALICE])]
    assert stack.api_log.calls == []
