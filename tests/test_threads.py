"""Threads end to end: replies continue the same task, safely, from the mail clients people use.

Every test runs the gateway, the sandbox API and a recording relay on real sockets, and asserts on what a
user would see: the turn the API received, the SMTP codes, and the reply's headers and text.
"""

from __future__ import annotations

import email
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from mailgate.models import InboundState
from tests.conftest import DOMAIN
from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent / "data"
WORKER = f"research@{DOMAIN}"
NEW_TEXT = "Thanks! Now break the Q3 numbers down by region."
QUOTED = "Echo from the sandbox"  # what every client quotes of mailgate's answer


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=email.policy.default)


def body_text(msg: Any) -> str:
    return str(msg.get_body(preferencelist=("plain",)).get_content())


def ids(value: Any) -> list[str]:
    return str(value or "").split()


async def start_task(gw: Any, relay: Any, **mail: Any) -> tuple[EmailMessage, Any]:
    """Send a first message and wait for mailgate's answer; return both."""
    first = make_mail(**mail)
    seen = await smtp_send(gw.smtp_port, first, mail_from=str(first["From"]))
    assert seen.accepted, seen
    before = len(relay.messages)
    messages = await relay.wait_for(before + 1, timeout=15)
    return first, parse(messages[before][2])


def client_reply(
    name: str, answer: Any, *, sender: str = "alice@example.org", to: str | None = None
) -> bytes:
    """A reply shaped like `tests/data/thread-<name>.eml`, answering mailgate's `answer`."""
    chain = [*ids(answer["References"]), str(answer["Message-ID"])]
    fields = {
        "{MESSAGE_ID}": make_msgid(domain="example.org"),
        "{IN_REPLY_TO}": str(answer["Message-ID"]),
        "{REFERENCES}": " ".join(dict.fromkeys(chain)),
        "{SUBJECT}": f"Re: {answer['Subject']}",
        "{FROM}": sender,
        "{TO}": to or str(answer["Reply-To"]),
    }
    text = (DATA / f"thread-{name}.eml").read_text()
    for key, value in fields.items():
        text = text.replace(key, value)
    return text.encode()


def reply_to(answer: Any, *, sender: str = "alice@example.org", **mail: Any) -> EmailMessage:
    """A plain reply to `answer` (In-Reply-To and References, sent to the worker address)."""
    chain = [*ids(answer["References"]), str(answer["Message-ID"])]
    mail.setdefault("in_reply_to", str(answer["Message-ID"]))
    mail.setdefault("references", list(dict.fromkeys(chain)))
    mail.setdefault("subject", str(answer["Subject"]))
    return make_mail(sender=sender, **mail)


async def send(
    gw: Any, mail: EmailMessage | bytes, *, sender: str = "alice@example.org", to: str = WORKER
) -> None:
    rcpts = [to] if isinstance(mail, bytes) else None
    seen = await smtp_send(gw.smtp_port, mail, mail_from=sender, rcpts=rcpts)
    assert seen.accepted, seen


# --- thread resolution from real clients ------------------------------------------------------------


@pytest.mark.parametrize("client", ["gmail", "outlook", "outlook-html", "apple", "thunderbird", "ios"])
async def test_client_reply_continues_the_task_with_only_the_new_text(
    make_gateway: Any, sandbox: Any, relay: Any, client: str
) -> None:
    """A reply from a common client (sent to the Reply-To) is turn 1 of the same task, quotes trimmed."""
    async with make_gateway() as gw:
        first, answer = await start_task(gw, relay)
        reply = client_reply(client, answer)
        await send(gw, reply, to=str(answer["Reply-To"]))
        [_, (_, rcpts, data)] = await relay.wait_for(2, timeout=15)

    task_id = sandbox.state.requests[0].task_id
    assert [(r.task_id, r.seq) for r in sandbox.state.requests] == [(task_id, 0), (task_id, 1)]
    turn = sandbox.state.requests[1].input
    assert NEW_TEXT.replace("region.", "") in turn
    for leftover in (QUOTED, "wrote:", "Sent from my iPhone", "From: research", "Head of Numbers", "> "):
        assert leftover not in turn
    second = parse(data)
    sent_id = str(parse(reply)["Message-ID"])
    assert rcpts == ["alice@example.org"]
    assert second["Subject"] == "Re: Quarterly numbers"
    assert second["In-Reply-To"] == sent_id
    assert ids(second["References"])[0] == first["Message-ID"]
    assert ids(second["References"])[-1] == sent_id
    if client.startswith("outlook"):  # no References from Outlook: the chain still holds the answer
        assert str(answer["Message-ID"]) in ids(second["References"])
    assert "turn 2 of task" in body_text(second)


async def test_reply_through_references_only_continues(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A reply with no In-Reply-To and no token, only References, reaches the same task."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        chain = ["<unrelated-1@example.org>", str(answer["Message-ID"]), "<unrelated-2@example.org>"]
        await send(
            gw, make_mail(subject="Re: Quarterly numbers", body="More detail, please.", references=chain)
        )
        await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert (second.task_id, second.seq) == (first.task_id, 1)
    assert "More detail, please." in second.input


async def test_reply_to_the_reply_is_turn_two(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """Replying to mailgate's second answer adds turn 2; the reply's References keep the whole chain."""
    async with make_gateway() as gw:
        first, answer = await start_task(gw, relay)
        one = reply_to(answer, body="Turn one question.")
        await send(gw, one)
        answers = await relay.wait_for(2, timeout=15)
        answer2 = parse(answers[1][2])
        two = reply_to(answer2, body="Turn two question.", subject="RE: AW: Re: Quarterly numbers")
        await send(gw, two)
        answers = await relay.wait_for(3, timeout=15)

    task_id = sandbox.state.requests[0].task_id
    assert [(r.task_id, r.seq) for r in sandbox.state.requests] == [(task_id, 0), (task_id, 1), (task_id, 2)]
    assert "Turn two question." in sandbox.state.requests[2].input
    assert "Turn one question." not in sandbox.state.requests[2].input
    third = parse(answers[2][2])
    assert third["Subject"] == "Re: Quarterly numbers"
    assert ids(third["References"]) == [
        first["Message-ID"],
        answer["Message-ID"],
        one["Message-ID"],
        answer2["Message-ID"],
        two["Message-ID"],
    ]
    assert third["In-Reply-To"] == two["Message-ID"]


async def test_long_reference_chains_are_trimmed(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A chain of 40 References keeps the root and the newest ids, ending with the message answered."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        chain = [f"<old-{i}@example.org>" for i in range(40)] + [str(answer["Message-ID"])]
        reply = make_mail(subject="Re: Quarterly numbers", body="Long thread.", references=chain)
        await send(gw, reply)
        answers = await relay.wait_for(2, timeout=15)

    assert sandbox.state.requests[1].seq == 1
    refs = ids(parse(answers[1][2])["References"])
    assert 2 < len(refs) <= 11
    assert refs[0] == "<old-0@example.org>"
    assert refs[-2:] == [str(answer["Message-ID"]), str(reply["Message-ID"])]


async def test_token_alone_continues_the_task(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A fresh message (no In-Reply-To, no References) to the Reply-To token address continues the task."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        token_addr = str(answer["Reply-To"])
        assert len(token_addr.partition("@")[0]) <= 64
        await send(gw, make_mail(to=token_addr, subject="One more thing", body="Add Q4 too."), to=token_addr)
        await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert (second.task_id, second.seq) == (first.task_id, 1)
    assert "Add Q4 too." in second.input


async def test_token_survives_an_upper_cased_local_part(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """Some MTAs fold the case of local parts: the token still verifies."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        local, _, domain = str(answer["Reply-To"]).partition("@")
        token_addr = f"{local.upper()}@{domain}"
        await send(
            gw, make_mail(to=token_addr, subject="Re: Quarterly numbers", body="Shouting."), to=token_addr
        )
        await relay.wait_for(2, timeout=15)

    assert sandbox.state.requests[1].task_id == sandbox.state.requests[0].task_id


async def test_re_subject_that_matches_nothing_starts_a_new_task(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A "Re:" subject with unknown In-Reply-To is a new task that keeps the whole body."""
    async with make_gateway() as gw:
        await start_task(gw, relay)
        body = "See below.\n\nOn Mon, 3 Jun 2024, Bob <bob@example.org> wrote:\n> The forwarded figures: 42."
        mail = make_mail(subject="Re: Quarterly numbers", body=body, in_reply_to="<elsewhere@example.org>")
        await send(gw, mail)
        await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert second.task_id != first.task_id and second.seq == 0
    assert "The forwarded figures: 42." in second.input


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: Re: RE: Quarterly numbers", "Re: Quarterly numbers"),
        ("AW: SV: Quarterly numbers", "Re: Quarterly numbers"),
        ("Fwd: Quarterly numbers", "Re: Fwd: Quarterly numbers"),
        ("Re: Fwd: Quarterly numbers", "Re: Fwd: Quarterly numbers"),
        ("", "Re: (no subject)"),
    ],
)
async def test_reply_subjects_are_not_stacked(
    make_gateway: Any, relay: Any, subject: str, expected: str
) -> None:
    """However many reply prefixes came in, the answer has one "Re: " (a forward stays visible)."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay, subject=subject)
    assert answer["Subject"] == expected


# --- who may continue --------------------------------------------------------------------------------


async def test_non_participant_starts_a_new_task_with_a_note(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """An allowed sender who was never on the thread gets a new task, and the answer says why."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        await send(
            gw, reply_to(answer, sender="bob@example.org", body="Let me in."), sender="bob@example.org"
        )
        answers = await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert second.task_id != first.task_id and second.seq == 0
    _, rcpts, data = answers[1]
    assert rcpts == ["bob@example.org"]
    assert "not part of" in body_text(parse(data))


async def test_non_participant_using_the_token_starts_a_new_task(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """Knowing the reply address is not enough: a non-participant writing to it starts a new task."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        token_addr = str(answer["Reply-To"])
        mail = reply_to(answer, sender="bob@example.org", to=token_addr, body="Let me in.")
        await send(gw, mail, sender="bob@example.org", to=token_addr)
        answers = await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert second.task_id != first.task_id
    assert "not part of" in body_text(parse(answers[1][2]))


async def test_cc_participant_continues_and_everyone_stays_on_the_thread(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A Cc'd allowed sender replying continues the task; To is them, Cc the others, never an outsider."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay, cc=["carol@example.org", "mallory@evil.example"])
        assert ids(answer["Cc"]) == ["carol@example.org"]
        assert relay.messages[0][1] == ["alice@example.org", "carol@example.org"]
        reply = reply_to(
            answer,
            sender="carol@example.org",
            to=[WORKER, "alice@example.org"],
            cc=["mallory@evil.example"],
            body="Carol here: add the margins.",
        )
        await send(gw, reply, sender="carol@example.org")
        answers = await relay.wait_for(2, timeout=15)

    first, second = sandbox.state.requests
    assert (second.task_id, second.seq) == (first.task_id, 1)
    assert "carol@example.org" in second.input and "Carol here: add the margins." in second.input
    _, rcpts, data = answers[1]
    sent = parse(data)
    assert rcpts == ["carol@example.org", "alice@example.org"]
    assert sent["To"] == "carol@example.org"
    assert sent["Cc"] == "alice@example.org"
    assert "mallory" not in data.decode()


# --- tokens that do not verify -----------------------------------------------------------------------


def _alter(token_addr: str, where: str) -> str:
    local, _, domain = token_addr.partition("@")
    alias, _, token = local.partition("+")
    i = {"ulid": 5, "mac": len(token) - 3}[where]
    swapped = "b" if token[i] != "b" else "c"
    return f"{alias}+{token[:i]}{swapped}{token[i + 1 :]}@{domain}"


@pytest.mark.parametrize("how", ["forged", "ulid", "mac"])
async def test_forged_or_altered_token_is_refused_at_rcpt(
    make_gateway: Any, sandbox: Any, relay: Any, how: str
) -> None:
    """A made-up token, or a real one with one character changed, gets 550 5.1.1 and reaches no task."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        real = str(answer["Reply-To"])
        bad = (
            f"research+{'0123456789abcdefghjkmnpqrs'}{'a' * 13}@{DOMAIN}"
            if how == "forged"
            else _alter(real, how)
        )
        assert bad != real
        # the headers would match the thread: the refused token must win over them
        seen = await smtp_send(gw.smtp_port, reply_to(answer, to=bad, body="Sneaky."), rcpts=[bad])
        assert seen.rcpt[0][0] == 550 and seen.rcpt[0][1].startswith("5.1.1")
        assert seen.data is None

    assert len(sandbox.state.requests) == 1
    assert len(relay.messages) == 1


# --- order -------------------------------------------------------------------------------------------


async def test_replies_during_a_running_turn_wait_their_turn(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """Two replies sent back to back while turn 0 runs become turns 1 and 2; other tasks are not held up."""
    async with make_gateway() as gw:
        first = make_mail(body="Slow one, please. [sandbox:slow=1]")
        await send(gw, first)
        await until(lambda: len(sandbox.state.requests) == 1, timeout=10, what="turn 0 posted")
        task_id = sandbox.state.requests[0].task_id
        one = make_mail(subject="Re: Quarterly numbers", body="Reply one.", in_reply_to=first["Message-ID"])
        two = make_mail(subject="Re: Quarterly numbers", body="Reply two.", in_reply_to=first["Message-ID"])
        await send(gw, one)
        await send(gw, two)
        other = make_mail(subject="Unrelated", body="Something else entirely.")
        await send(gw, other)
        answers = await relay.wait_for(4, timeout=20)
        # the other task was answered while turn 0 still ran
        assert parse(answers[0][2])["In-Reply-To"] == other["Message-ID"]

    turns = sandbox.state.turns_of(task_id)
    assert [(t.seq, t.input) for t in turns][1:] == [
        (1, sandbox.state.requests[-2].input),
        (2, sandbox.state.requests[-1].input),
    ]
    assert "Reply one." in turns[1].input and "Reply two." in turns[2].input
    assert all(t.status == "completed" for t in turns)
    assert turns[0].completed_at is not None
    assert turns[0].completed_at <= turns[1].started_at
    in_reply_to = [parse(data)["In-Reply-To"] for _, _, data in answers[1:]]
    assert in_reply_to == [first["Message-ID"], one["Message-ID"], two["Message-ID"]]


# --- budget ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rcpt", "env", "budget"),
    [
        (f"research@{DOMAIN}", {}, "standard"),
        (f"research+low@{DOMAIN}", {}, "low"),
        (f"research+HIGH@{DOMAIN}", {}, "high"),
        (f"research+unlimited@{DOMAIN}", {}, "high"),
        (f"research+unlimited@{DOMAIN}", {"MAILGATE_MAX_BUDGET": "unlimited"}, "unlimited"),
        (f"research+high@{DOMAIN}", {"MAILGATE_MAX_BUDGET": "standard"}, "standard"),
        (f"writer@{DOMAIN}", {}, "low"),
        (f"writer+standard@{DOMAIN}", {}, "standard"),
    ],
)
async def test_budget_tags(
    make_gateway: Any, sandbox: Any, relay: Any, rcpt: str, env: dict[str, str], budget: str
) -> None:
    """`alias+budget` picks a new task's budget, the worker's default otherwise, capped by the maximum."""
    async with make_gateway(**env) as gw:
        await send(gw, make_mail(to=rcpt), to=rcpt)
        await until(lambda: len(sandbox.state.requests) == 1, timeout=10, what="the turn")
    assert sandbox.state.requests[0].budget == budget


async def test_budget_tag_on_a_reply_keeps_the_task(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A reply sent to `alias+high` still continues its task, with the task's own budget."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        rcpt = f"research+high@{DOMAIN}"
        await send(gw, reply_to(answer, to=rcpt, body="Go deeper."), to=rcpt)
        await relay.wait_for(2, timeout=15)
    first, second = sandbox.state.requests
    assert (second.task_id, second.seq, second.budget) == (first.task_id, 1, "standard")


# --- notices instead of turns ------------------------------------------------------------------------


async def test_reply_with_nothing_new_gets_a_notice(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A reply with no text of its own (only quoted lines) sends no turn; the thread gets a short notice."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        quoted = "\n".join("> " + line for line in body_text(answer).splitlines())
        body = f"\n\n> On Mon, 3 Jun 2024 at 10:12, research (mailgate) <{WORKER}> wrote:\n{quoted}\n"
        await send(gw, reply_to(answer, body=body))
        answers = await relay.wait_for(2, timeout=15)
        [row] = [r for r in await gw.store.list_inbound() if not r.new_task]

    assert len(sandbox.state.requests) == 1
    notice = parse(answers[1][2])
    assert notice["Subject"] == "Re: Quarterly numbers"
    assert notice["In-Reply-To"] is not None
    assert "no text of its own" in body_text(notice)
    assert row.state == InboundState.FAILED and row.reason


def _reassign(sandbox: Any, task_id: str) -> None:
    sandbox.state.tasks[task_id].worker_id = "wrk_someone_else"


def _delete(sandbox: Any, task_id: str) -> None:
    del sandbox.state.tasks[task_id]


def _archive(sandbox: Any, task_id: str) -> None:
    sandbox.state.tasks[task_id].archived = True


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        (_reassign, 403, "belongs to a task of a different worker"),
        (_delete, 404, "no longer exists"),
        (_archive, 404, "no longer exists"),
    ],
)
async def test_api_refusals_of_a_continuation_are_explained(
    make_gateway: Any, sandbox: Any, relay: Any, change: Any, status: int, says: str
) -> None:
    """403 (another worker's task) and 404 (deleted or archived) become a notice; the message keeps why."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        task_id = sandbox.state.requests[0].task_id
        change(sandbox, task_id)
        reply = reply_to(answer, body="Are you still there?")
        await send(gw, reply)
        answers = await relay.wait_for(2, timeout=15)
        [row] = [r for r in await gw.store.list_inbound() if r.message_id == reply["Message-ID"]]

    assert len(sandbox.state.requests) == 1
    notice = parse(answers[1][2])
    assert notice["In-Reply-To"] == reply["Message-ID"]
    assert notice["Subject"] == "Re: Quarterly numbers"
    assert says in " ".join(body_text(notice).split())
    assert row.state == InboundState.FAILED
    assert row.reason is not None and row.reason.startswith(f"API {status}")


async def test_reply_to_both_the_token_and_the_plain_address_is_one_turn(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A reply-all reaching the worker twice (token and plain address) still adds a single turn."""
    async with make_gateway() as gw:
        _, answer = await start_task(gw, relay)
        token_addr = str(answer["Reply-To"])
        mail = reply_to(answer, to=[token_addr, WORKER], body="Just once, please.")
        seen = await smtp_send(gw.smtp_port, mail, rcpts=[token_addr, WORKER])
        assert seen.accepted
        await relay.wait_for(2, timeout=15)
        rows = [r for r in await gw.store.list_inbound() if r.message_id == mail["Message-ID"]]

    assert [(r.seq, "Just once" in r.input) for r in sandbox.state.requests] == [(0, False), (1, True)]
    assert len(relay.messages) == 2
    assert sorted(r.state for r in rows) == [InboundState.ANSWERED, InboundState.IGNORED]
