"""Admission on its own: `Admission` with a real store, no SMTP. Each test asserts on the reply a
recipient gets (code, enhanced status, text) and on what was, or was not, committed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailgate import tokens
from mailgate.admission.admit import BAD_TOKEN, Admission
from mailgate.models import InboundState, SmtpReply
from mailgate.smtp.handler import combine
from mailgate.store import InboundRow, SqliteStore, Store
from tests.conftest import DOMAIN, settings_for
from tests.mail import make_mail

pytestmark = pytest.mark.anyio

SECRET = b"test-secret-0123456789abcdef"
RESEARCH = f"research@{DOMAIN}"
WRITER = f"writer@{DOMAIN}"
ALICE = "alice@example.org"

MakeAdmission = Callable[..., Any]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await SqliteStore.open(tmp_path / "admission.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def make_admission(tmp_path: Path, store: Store) -> MakeAdmission:
    """`make_admission(**env)`: an `Admission` on the shared store with the test settings plus `env`."""

    def make(*, clock: Callable[[], float] | None = None, **env: str) -> Admission:
        settings = settings_for(tmp_path, "http://127.0.0.1:9", None, **env)
        if clock is None:
            return Admission(settings, store, SECRET)
        return Admission(settings, store, SECRET, clock=clock)

    return make


@pytest.fixture
def admission(make_admission: MakeAdmission) -> Admission:
    return make_admission()


async def accept(
    admission: Admission,
    mail: EmailMessage | bytes,
    rcpts: Sequence[str] = (RESEARCH,),
    mail_from: str = ALICE,
) -> list[SmtpReply]:
    raw = mail if isinstance(mail, bytes) else mail.as_bytes()
    return await admission.accept(mail_from, list(rcpts), raw)


def queue_id(reply: SmtpReply) -> str:
    assert reply.code == 250 and "queued as " in reply.text, reply
    return reply.text.rsplit(" ", 1)[1]


async def row_of(store: Store, reply: SmtpReply) -> InboundRow:
    row = await store.inbound(queue_id(reply))
    assert row is not None
    return row


async def start_task(admission: Admission, store: Store, **mail: Any) -> InboundRow:
    """A first message to research@, accepted: its row (with the new task's id)."""
    [reply] = await accept(admission, make_mail(**mail))
    row = await row_of(store, reply)
    assert row.task_id is not None and row.new_task == 1
    return row


def token_address(task_id: str, owner: str = ALICE, alias: str = "research") -> str:
    return f"{alias}+{tokens.reply_token(SECRET, task_id, owner)}@{DOMAIN}"


def altered(address: str) -> str:
    """`address` with the last character of its token changed (its MAC no longer verifies)."""
    local, _, domain = address.rpartition("@")
    return f"{local[:-1]}{'b' if local[-1] == 'a' else 'a'}@{domain}"


# --- RCPT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "code", "text"),
    [
        ("someone@elsewhere.example", 550, "5.7.1 Relaying denied"),
        (f"nobody@{DOMAIN}", 550, "5.1.1 No such worker here"),
        (f"research@{DOMAIN.upper()}", 250, "2.1.5 Ok"),
        (f"research+high@{DOMAIN}", 250, "2.1.5 Ok"),
        (f"writer+low@{DOMAIN}", 250, "2.1.5 Ok"),
        (f"research+{'0' * 26}{'a' * 13}@{DOMAIN}", 550, BAD_TOKEN),  # well formed, no such task
    ],
    ids=["relay", "unknown-worker", "plain", "budget-word", "budget-word-other", "unknown-task"],
)
async def test_check_recipient_without_a_task(
    admission: Admission, address: str, code: int, text: str
) -> None:
    """Addresses off our domain, unknown workers and tokens of no task are refused; worker addresses pass."""
    reply = await admission.check_recipient(address)
    assert reply.code == code
    assert reply.text.startswith(text)


@pytest.mark.parametrize(
    ("make_address", "ok"),
    [
        (lambda task_id: token_address(task_id), True),
        (lambda task_id: token_address(task_id).upper(), True),  # an MTA folded the local part's case
        (
            lambda task_id: token_address(task_id, owner="mallory@example.org"),
            False,
        ),  # forged for another owner
        (lambda task_id: altered(token_address(task_id)), False),
        (lambda task_id: token_address(task_id, alias="writer"), False),  # the token of another alias
    ],
    ids=["valid", "valid-upper-case", "forged-owner", "altered", "other-alias"],
)
async def test_check_recipient_with_a_reply_token(
    admission: Admission, store: Store, make_address: Callable[[str], str], ok: bool
) -> None:
    """A reply token passes only unaltered, for the task's owner, at the task's own alias."""
    row = await start_task(admission, store)
    assert row.task_id is not None
    address = make_address(row.task_id)
    reply = await admission.check_recipient(address)
    assert reply == (SmtpReply(250, "2.1.5 Ok") if ok else SmtpReply(550, BAD_TOKEN))


# --- DATA: mail that is never answered -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "headers", "subject", "reason"),
    [
        ("", {}, "Hello", "bounce: null envelope sender"),
        ("MAILER-DAEMON@mx.example.org", {}, "Hello", "bounce: envelope sender MAILER-DAEMON"),
        (ALICE, {}, "Undelivered Mail Returned to Sender", "bounce: delivery-failure subject"),
        (ALICE, {"X-Failed-Recipients": "x@example.org"}, "Hello", "bounce: X-Failed-Recipients"),
        (ALICE, {"Auto-Submitted": "auto-replied"}, "Hello", "auto-reply: Auto-Submitted auto-replied"),
        (ALICE, {}, "Out of Office: back Monday", "auto-reply: out-of-office subject"),
        (ALICE, {"Precedence": "bulk"}, "Hello", "bulk: "),
    ],
    ids=[
        "null-sender",
        "mailer-daemon",
        "bounce-subject",
        "failed-recipients",
        "auto-submitted",
        "ooo",
        "bulk",
    ],
)
async def test_automatic_mail_is_committed_as_ignored_with_its_reason(
    admission: Admission, store: Store, mail_from: str, headers: dict[str, str], subject: str, reason: str
) -> None:
    """Bounces and auto-replies are accepted (so they are not bounced) and kept as ignored, with why."""
    [reply] = await accept(admission, make_mail(subject=subject, headers=headers), mail_from=mail_from)
    row = await row_of(store, reply)
    assert row.state == InboundState.IGNORED
    assert row.reason is not None and row.reason.startswith(reason)
    assert (row.task_id, row.sender) == (None, None)
    assert await store.list_tasks() == []


# --- DATA: refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "mail", "text"),
    [
        (
            {"MAILGATE_AUTH": "dmarc", "MAILGATE_AUTHSERV_ID": "mx.agents.example.com"},
            make_mail(),
            "5.7.1 Sender not authenticated: no Authentication-Results from mx.agents.example.com",
        ),
        (
            {"MAILGATE_AUTH": "dmarc", "MAILGATE_AUTHSERV_ID": "mx.agents.example.com"},
            make_mail(
                headers={
                    "Authentication-Results": "mx.agents.example.com; dmarc=fail header.from=example.org"
                }
            ),
            "5.7.1 Sender not authenticated: DMARC did not pass for example.org",
        ),
        (
            {"MAILGATE_AUTH": "dmarc", "MAILGATE_AUTHSERV_ID": "mx.agents.example.com"},
            make_mail(
                headers={"Authentication-Results": "mx.elsewhere.example; dmarc=pass header.from=example.org"}
            ),
            "5.7.1 Sender not authenticated: no Authentication-Results from mx.agents.example.com",
        ),
        (
            {},
            make_mail(sender="alice@example.org, bob@example.org"),
            "5.7.1 Sender not authenticated: several",
        ),
        (
            {},
            make_mail(sender="mallory@evil.example"),
            "5.7.1 mallory@evil.example may not send to this gateway",
        ),
        (
            {},
            make_mail(sender="boss@sub.example.net"),
            "5.7.1 boss@sub.example.net may not send to this gateway",
        ),
    ],
    ids=["no-results", "dmarc-fail", "foreign-authserv", "several-from", "not-allowed", "not-allowed-near"],
)
async def test_unauthenticated_or_disallowed_senders_get_550(
    make_admission: MakeAdmission, store: Store, env: dict[str, str], mail: EmailMessage, text: str
) -> None:
    """Every recipient gets 550 with the reason, and nothing is committed."""
    admission = make_admission(**env)
    replies = await accept(admission, mail, rcpts=[RESEARCH, WRITER])
    assert [r.code for r in replies] == [550, 550]
    assert all(r.text.startswith(text) for r in replies), replies
    assert await store.list_inbound() == []


async def test_an_authenticated_sender_is_accepted_with_dmarc(
    make_admission: MakeAdmission, store: Store
) -> None:
    """With our MTA's DMARC pass for the From domain, the message is accepted for the From address."""
    admission = make_admission(MAILGATE_AUTH="dmarc", MAILGATE_AUTHSERV_ID="mx.agents.example.com")
    mail = make_mail(
        headers={"Authentication-Results": "mx.agents.example.com; dmarc=pass header.from=example.org"}
    )
    [reply] = await accept(admission, mail)
    row = await row_of(store, reply)
    assert (row.state, row.sender) == (InboundState.RECEIVED, ALICE)


async def test_the_per_sender_new_task_limit_answers_450_and_commits_nothing(
    make_admission: MakeAdmission, store: Store
) -> None:
    """Past MAILGATE_MAX_NEW_TASKS_PER_HOUR new tasks a sender is deferred; an hour later it may go on."""
    now = [1_000_000.0]
    admission = make_admission(MAILGATE_MAX_NEW_TASKS_PER_HOUR="2", clock=lambda: now[0])
    for n in range(2):
        [reply] = await accept(admission, make_mail(subject=f"Task {n}"))
        assert reply.code == 250
    [refused] = await accept(admission, make_mail(subject="One too many"))
    assert refused == SmtpReply(450, "4.7.1 Too many new tasks from you in the last hour; try later")
    assert len(await store.list_inbound()) == 2 and len(await store.list_tasks()) == 2
    [other] = await accept(admission, make_mail(sender="bob@example.org"), mail_from="bob@example.org")
    assert other.code == 250  # the limit is per sender
    now[0] += 3601
    [later] = await accept(admission, make_mail(subject="Next hour"))
    assert later.code == 250


async def test_new_tasks_within_one_message_count_toward_the_limit(
    make_admission: MakeAdmission, store: Store
) -> None:
    """One message starting tasks at two workers, with room for one: the second recipient gets 450."""
    admission = make_admission(MAILGATE_MAX_NEW_TASKS_PER_HOUR="1")
    mail = make_mail(to=[RESEARCH, WRITER])
    replies = await accept(admission, mail, rcpts=[RESEARCH, WRITER])
    assert [r.code for r in replies] == [250, 450]
    assert combine(replies).code == 450  # one SMTP reply: the MTA keeps the message and retries
    [row] = await store.list_inbound()
    assert row.alias == "research"
    retried = await accept(admission, mail, rcpts=[RESEARCH, WRITER])
    assert retried == [SmtpReply(250, f"2.0.0 Ok: already queued as {row.id}"), replies[1]]
    assert len(await store.list_inbound()) == 1


async def test_the_per_thread_limit_answers_450_and_commits_nothing(
    make_admission: MakeAdmission, store: Store
) -> None:
    """Past MAILGATE_MAX_TURNS_PER_THREAD_PER_HOUR messages in one task, replies are deferred."""
    admission = make_admission(MAILGATE_MAX_TURNS_PER_THREAD_PER_HOUR="2")
    first = await start_task(admission, store, message_id="<t1@example.org>")
    [second] = await accept(admission, make_mail(in_reply_to="<t1@example.org>"))
    assert (await row_of(store, second)).task_id == first.task_id
    [third] = await accept(admission, make_mail(in_reply_to="<t1@example.org>"))
    assert third == SmtpReply(450, "4.7.1 Too many messages in this conversation in the last hour; try later")
    assert len(await store.list_inbound()) == 2
    [fresh] = await accept(admission, make_mail(subject="A new task is not limited by the thread"))
    assert fresh.code == 250


async def test_a_duplicate_gets_250_with_the_first_queue_id(admission: Admission, store: Store) -> None:
    """The same message again (same Message-ID) is answered 250 "already queued as <id>", nothing new."""
    mail = make_mail(message_id="<once@example.org>")
    [first] = await accept(admission, mail)
    [again] = await accept(admission, mail)
    [edited] = await accept(admission, make_mail(message_id="<once@example.org>", body="A different body"))
    assert again == SmtpReply(250, f"2.0.0 Ok: already queued as {queue_id(first)}")
    assert edited == again  # the Message-ID decides when there is one
    assert [r.id for r in await store.list_inbound()] == [queue_id(first)]


async def test_without_message_id_the_bytes_decide(admission: Admission, store: Store) -> None:
    """A message without Message-ID is a duplicate only when its bytes are the same."""
    mail = make_mail()
    del mail["Message-ID"]
    [first] = await accept(admission, mail)
    [again] = await accept(admission, mail)
    mail.set_content("Other words")
    [other] = await accept(admission, mail)
    assert again.text == f"2.0.0 Ok: already queued as {queue_id(first)}"
    assert other.text.startswith("2.0.0 Ok: queued as ")
    assert len(await store.list_inbound()) == 2


async def test_the_row_keeps_what_later_stages_need_of_the_header(admission: Admission, store: Store) -> None:
    """In-Reply-To, References, To/Cc and the From display name are stored on the row at DATA."""
    mail = make_mail(
        sender='"Alice Example" <Alice@Example.org>',
        to=[RESEARCH, "Bob <bob@example.org>"],
        cc=["carol@example.org", "bob@example.org"],
        subject="Re: =?utf-8?q?Caf=C3=A9?= plans",
        message_id="<m3@example.org>",
        in_reply_to="<m2@example.org>",
        references=["<m1@example.org>", "<m2@example.org>"],
    )
    [reply] = await accept(admission, mail)
    row = await row_of(store, reply)
    assert row.in_reply_to_ids == ["<m2@example.org>"]
    assert row.reference_ids == ["<m1@example.org>", "<m2@example.org>"]
    assert row.to_cc_addrs == [RESEARCH, "bob@example.org", "carol@example.org"]
    assert row.sender_name == "Alice Example"
    assert (row.sender, row.message_id, row.rcpt) == (ALICE, "<m3@example.org>", RESEARCH)
    assert row.subject == "Re: Café plans"
    assert await store.participants(row.task_id or "") == [ALICE, "bob@example.org", "carol@example.org"]


async def test_a_task_reached_by_token_and_plain_address_makes_one_turn(
    admission: Admission, store: Store
) -> None:
    """One message to a task's reply address and to the plain address (threading to it) is one turn."""
    first = await start_task(admission, store, message_id="<q@example.org>")
    assert first.task_id is not None
    tokened = token_address(first.task_id)
    mail = make_mail(to=[tokened, RESEARCH], in_reply_to="<q@example.org>")
    replies = await accept(admission, mail, rcpts=[tokened, RESEARCH])
    turn = queue_id(replies[0])
    assert replies[1] == SmtpReply(250, f"2.0.0 Ok: already queued as {turn}")
    rows = {r.rcpt: r for r in await store.list_inbound() if r.id != first.id}
    assert rows[tokened.lower()].state == InboundState.RECEIVED
    assert rows[tokened.lower()].task_id == first.task_id
    assert rows[RESEARCH].state == InboundState.IGNORED
    assert (rows[RESEARCH].reason, rows[RESEARCH].task_id) == (f"same task as {turn}", None)
    facts = await store.admission_facts(
        [], token_task_ids=[first.task_id], sender=first.sender, max_turns=100, max_new_tasks=1
    )
    assert facts.turns[first.task_id] == 2


async def test_a_bad_token_at_data_is_refused_for_that_recipient_only(
    admission: Admission, store: Store
) -> None:
    """A token that fails at DATA (its task is another owner's) refuses that recipient; the other is kept."""
    first = await start_task(admission, store, sender="bob@example.org")
    assert first.task_id is not None
    forged = token_address(first.task_id)  # minted for alice, but the task is bob's
    replies = await accept(admission, make_mail(to=[forged, WRITER]), rcpts=[forged, WRITER])
    assert replies[0] == SmtpReply(550, "5.1.1 This reply address is not valid (altered or unknown)")
    assert replies[1].code == 250
    assert combine(replies) == replies[0]


@pytest.mark.parametrize(("padding", "code"), [(1500, 250), (5000, 552)])
async def test_a_header_block_over_the_limit_is_552(
    make_admission: MakeAdmission, store: Store, padding: int, code: int
) -> None:
    """A header block over MAILGATE_MAX_HEADER_SIZE is refused 552 5.3.4 for every recipient."""
    admission = make_admission(MAILGATE_MAX_HEADER_SIZE="4096")
    mail = make_mail(headers={"X-Padding": " ".join(["x" * 70] * (padding // 71))})
    replies = await accept(admission, mail, rcpts=[RESEARCH, WRITER])
    assert [r.code for r in replies] == [code, code]
    if code == 552:
        assert replies[0].text == "5.3.4 Message header too large"
        assert await store.list_inbound() == []
    else:
        assert len(await store.list_inbound()) == 2


# --- one reply for several recipients ----------------------------------------------------------------------

OK = SmtpReply(250, "2.0.0 Ok: queued as A")
OK2 = SmtpReply(250, "2.0.0 Ok: queued as B")
LATER = SmtpReply(450, "4.7.1 Too many")
STORE = SmtpReply(451, "4.3.0 Try later")
NO = SmtpReply(550, "5.7.1 No")


@pytest.mark.parametrize(
    ("replies", "combined"),
    [
        ([OK], OK),
        ([OK, OK2], OK),
        ([OK, NO], NO),
        ([NO, OK], NO),
        ([OK, LATER, NO], LATER),
        ([NO, LATER], LATER),
        ([NO, STORE, LATER], STORE),
        ([OK2, OK, NO, NO], NO),
    ],
)
def test_combine_picks_the_reply_for_all_recipients(replies: list[SmtpReply], combined: SmtpReply) -> None:
    """A temporary failure wins (the MTA retries), then a permanent one, else the first success."""
    assert combine(replies) == combined


async def test_a_big_header_of_encoded_words_is_read_off_the_loop_with_the_same_result(
    admission: Admission, store: Store
) -> None:
    """A Subject of encoded words just under the 100 KiB header limit (read off the loop) is decided and
    recorded like a small one: accepted, its subject decoded on the row, an auto-reply still ignored."""
    word = "=?utf-8?q?caf=C3=A9?="
    subject = "\r\n ".join(" ".join([word] * 4) for _ in range(1130))
    raw = (
        f"From: {ALICE}\r\nTo: {RESEARCH}\r\nSubject: {subject}\r\nMessage-ID: <big-head@example.org>\r\n"
        "\r\nHello.\r\n"
    ).encode()
    assert 95_000 < len(raw) < 102_400
    [reply] = await accept(admission, raw)
    row = await row_of(store, reply)
    assert row.state == InboundState.RECEIVED
    assert row.subject.startswith("cafécafé") and "=?utf-8" not in row.subject
    auto = raw.replace(b"Message-ID: <big-head", b"Auto-Submitted: auto-replied\r\nMessage-ID: <big-auto")
    [ignored] = await accept(admission, auto)
    assert ignored.why == "ignored" and (await row_of(store, ignored)).state == InboundState.IGNORED
