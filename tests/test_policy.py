"""Pure sender policy: mail never to answer, the allow-list, budgets and rate limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.admission import policy
from mailgate.admission.policy import LOOP_HEADER, automatic_reason, requested_budget, sender_allowed
from mailgate.mail.headers import Headers, read_signals

DATA = Path(__file__).parent / "data"
OWN = "agents.example.com"
HUMAN = "ann@example.com"


def headers(*lines: str, subject: str = "Quarterly numbers") -> Headers:
    text = "\r\n".join(["From: Ann <ann@example.com>", "To: research@agents.example.com", *lines])
    if subject is not None:
        text += f"\r\nSubject: {subject}"
    raw = text.encode("utf-8") + b"\r\n\r\nbody\r\n"
    return Headers.parse(raw)


def reason(msg: Headers, envelope: str = HUMAN) -> str | None:
    return automatic_reason(read_signals(msg), envelope, own_domain=OWN)


def data(name: str) -> Headers:
    raw = (DATA / name).read_bytes()
    return Headers.parse(raw)


# --- human mail stays human -------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["X-Auto-Response-Suppress: All"],
        ["X-Auto-Response-Suppress: DR, RN, NRN, OOF, AutoReply"],
        ["Auto-Submitted: no"],
        ["Precedence: first-class"],
        ["X-Mailer: Microsoft Outlook 16.0"],
        ["Feedback-ID: 123:456:gmail"],
        ["Message-ID: <abc@example.com>", "In-Reply-To: <reply.1@agents.example.com>"],
        ["Content-Type: multipart/mixed; boundary=x"],
        ["Message-ID: <x.mailgate@notagents.example.com>"],
        ["Message-ID: <8A1F-22C0@agents.example.com>"],
    ],
)
def test_human_headers(lines: list[str]) -> None:
    """Ordinary client headers (including Outlook's X-Auto-Response-Suppress) are not automatic."""
    assert reason(headers(*lines)) is None


@pytest.mark.parametrize(
    "subject",
    [
        "Fwd: Undelivered Mail Returned to Sender",
        "Why did my mail bounce? Delivery Status Notification attached",
        "Undelivered package from the courier",
        "Out of office next week, please draft my replies",
        "Read this article and summarise it",
        "Read: chapter 3 notes",
        "Auto: insurance renewal quote",
        "Autor: Kafka",
        "Absence policy draft",
        "Re: Automatic replies are annoying",
        "Delivery failure rates in Q3",
        "Returned mail room keys",
        "",
    ],
)
def test_human_subjects(subject: str) -> None:
    """Subjects that only resemble automatic ones are left alone."""
    assert reason(headers(subject=subject)) is None


def test_outlook_human_file() -> None:
    """A real-looking Outlook mail with X-Auto-Response-Suppress: All is human."""
    assert reason(data("policy-outlook-human.eml")) is None


def test_malformed_headers_never_raise() -> None:
    """Broken header values are tolerated (no exception, a sensible answer)."""
    raw = (
        b"From: \xff\xfe <<<@@@\r\nSubject: =?bogus?Q?=ZZ?= \x80\r\n"
        b"Content-Type: multipart/report; report-type=\r\n"
        b"Message-ID: <<>>\r\nAuto-Submitted: \r\n\r\n"
    )
    msg = Headers.parse(raw)
    assert reason(msg) == "report: multipart/report without report-type"


def test_no_headers_at_all() -> None:
    """An empty message with a real envelope sender is not automatic."""
    msg = Headers.parse(b"\r\n")
    assert reason(msg) is None


# --- every signal --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "envelope", "expected"),
    [
        ([], "", "bounce: null envelope sender"),
        ([], "<>", "bounce: null envelope sender"),
        ([], "MAILER-DAEMON@mx.example.net", "bounce: envelope sender MAILER-DAEMON"),
        (["From: Mail Delivery System <Mailer-Daemon@mx.example.net>"], HUMAN, "bounce: From MAILER-DAEMON"),
        (["From: postmaster@example.net"], HUMAN, "bounce: postmaster sender"),
        ([], "postmaster@example.net", "bounce: postmaster sender"),
        (
            ['Content-Type: multipart/report; report-type="delivery-status"; boundary=b'],
            HUMAN,
            "bounce: multipart/report delivery-status",
        ),
        (
            ["Content-Type: multipart/report; boundary=b; report-type=disposition-notification"],
            HUMAN,
            "read receipt: disposition-notification",
        ),
        (
            ["Content-Type: multipart/report; report-type=feedback-report; boundary=b"],
            HUMAN,
            "complaint: ARF feedback-report",
        ),
        (["Content-Type: message/delivery-status"], HUMAN, "bounce: message/delivery-status"),
        (
            ["Content-Type: multipart/report; boundary=b"],
            HUMAN,
            "report: multipart/report without report-type",
        ),
        (["X-Failed-Recipients: bob@example.org"], HUMAN, "bounce: X-Failed-Recipients"),
        (["X-MS-Exchange-Message-Is-Ndr: True"], HUMAN, "bounce: X-MS-Exchange-Message-Is-Ndr"),
        (["Auto-Submitted: auto-replied"], HUMAN, "auto-reply: Auto-Submitted auto-replied"),
        (["Auto-Submitted: Auto-Generated (failure)"], HUMAN, "automatic: Auto-Submitted auto-generated"),
        (
            ["Auto-Submitted: auto-notified; owner-email=x@example.com"],
            HUMAN,
            "automatic: Auto-Submitted auto-notified",
        ),
        (["X-Autoreply: yes"], HUMAN, "auto-reply: X-Autoreply"),
        (["X-Autorespond: Vacation"], HUMAN, "auto-reply: X-Autorespond"),
        (["X-Auto-Response: yes"], HUMAN, "auto-reply: X-Auto-Response"),
        (["X-AutoReply-From: ann@example.com"], HUMAN, "auto-reply: X-Autoreply-From"),
        (["X-Autogenerated: Reply"], HUMAN, "auto-reply: X-Autogenerated: Reply"),
        (["X-Mailer: vacation 1.2.7"], HUMAN, "auto-reply: vacation X-Mailer"),
        (["Precedence: bulk"], HUMAN, "bulk: Precedence: bulk"),
        (["Precedence: JUNK"], HUMAN, "bulk: Precedence: junk"),
        (["Precedence: list"], HUMAN, "bulk: Precedence: list"),
        (["Precedence: auto_reply"], HUMAN, "bulk: Precedence: auto_reply"),
        (["List-Id: Team <team.lists.example.com>"], HUMAN, "bulk: mailing list (List-Id)"),
        (["List-Unsubscribe: <mailto:u@example.com>"], HUMAN, "bulk: mailing list (List-Unsubscribe)"),
        (["X-Loop: ann@example.com"], HUMAN, "loop: X-Loop"),
        ([], "team-bounces@lists.example.com", "bulk: mailing-list envelope sender"),
        ([], "owner-team@lists.example.com", "bulk: mailing-list envelope sender"),
        ([f"{LOOP_HEADER}: 1"], HUMAN, "loop: our own mail (X-Mailgate-Loop)"),
        (["Message-ID: <01J.mailgate@agents.example.com>"], HUMAN, "loop: our own mail (Message-ID)"),
        (
            ["Message-ID: <01J.MailGate@mx.AGENTS.example.com.>"],
            HUMAN,
            "loop: our own mail (Message-ID)",
        ),
    ],
)
def test_signals(lines: list[str], envelope: str, expected: str) -> None:
    """Each header or envelope signal gives its own reason."""
    msg = headers(*lines) if not any(line.startswith("From:") for line in lines) else _replace_from(lines)
    assert reason(msg, envelope) == expected


def _replace_from(lines: list[str]) -> Headers:
    raw = "\r\n".join([*lines, "Subject: hello"]).encode() + b"\r\n\r\nbody\r\n"
    return Headers.parse(raw)


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: Quarterly numbers",
        "Out of Office AutoReply: Quarterly numbers",
        "Out of the office",
        "Automatic reply: Re: Quarterly numbers",
        "Auto reply: Re: Quarterly numbers",
        "Autoreply: Quarterly numbers",
        "AutoRespons :Quarterly numbers",
        "Auto: Re: Quarterly numbers",
        "Abwesenheitsnotiz: Re: Quartalszahlen",
        "Automatische Antwort: Quartalszahlen",
        "Réponse automatique : Re: Chiffres",
        "Absence : RE: Chiffres",
        "Respuesta automática: Cifras",
        "Fuera de la oficina: Cifras",
        "Afwezig: Re: Cijfers",
        "Automatisch antwoord: Cijfers",
        "Risposta automatica: Numeri",
        "Resposta automática: Números",
        "Automatiskt svar: Siffror",
        "Автоматический ответ: Цифры",
        "自動返信: 四半期の数字",
        "【自動応答】四半期の数字",
        "自动回复: 季度数据",
        "[Auto-Reply] Quarterly numbers",
    ],
)
def test_out_of_office_subjects(subject: str) -> None:
    """Out-of-office subjects in many languages are auto-replies, even without headers."""
    assert reason(headers(subject=subject)) == "auto-reply: out-of-office subject"


@pytest.mark.parametrize(
    "subject",
    [
        "Undelivered Mail Returned to Sender",
        "Undeliverable: Quarterly numbers",
        "Delivery Status Notification (Failure)",
        "Mail delivery failed: returning message to sender",
        "failure notice",
        "Returned mail: see transcript for details",
        "Delivery Notification: Delivery has failed",
        "Warning: could not send message for past 4 hours",
        "**Message you sent blocked by our bulk email filter**",
        "[Postmaster] Email Delivery Failure",
        "Unzustellbar: Quartalszahlen",
        "Non remis : Chiffres",
        "Недоставленное сообщение",
        "メッセージを配信できません。",
    ],
)
def test_bounce_subjects(subject: str) -> None:
    """Delivery-failure subjects from many MTAs are bounces, even without other signals."""
    assert reason(headers(subject=subject)) == "bounce: delivery-failure subject"


@pytest.mark.parametrize(
    "subject",
    [
        "Read: Re: Quarterly numbers",
        "Gelesen: AW: Quartalszahlen",
        "Lu : RE : Chiffres",
        "Read receipt: plan",
    ],
)
def test_read_receipt_subjects(subject: str) -> None:
    """Read receipts for our replies are recognised by subject."""
    assert reason(headers(subject=subject)) == "read receipt: subject"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("policy-exchange-oof.eml", "auto-reply: out-of-office subject"),
        ("policy-german-oof.eml", "auto-reply: out-of-office subject"),
        ("policy-gmail-vacation.eml", "auto-reply: Auto-Submitted auto-replied"),
    ],
)
def test_auto_reply_files(name: str, expected: str) -> None:
    """Made-up auto-replies as Exchange, a German client and Gmail write them."""
    assert reason(data(name)) == expected


def test_own_domain_case_insensitive() -> None:
    """own_domain may be given in any case."""
    msg = headers("Message-ID: <x.mailgate@agents.example.com>")
    assert automatic_reason(read_signals(msg), HUMAN, own_domain="Agents.Example.COM.") is not None


# --- allow-list -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "allowed", "expected"),
    [
        ("ann@example.com", ["ann@example.com"], True),
        ("Ann@Example.COM", ["ann@example.com"], True),
        ("ann@example.com", ["ANN@EXAMPLE.COM"], True),
        ("bob@example.com", ["ann@example.com"], False),
        ("ann@example.com", ["@example.com"], True),
        ("ann@sub.example.com", ["@example.com"], False),
        ("ann@notexample.com", ["@example.com"], False),
        ("ann@example.com.evil.test", ["@example.com"], False),
        ("anyone@anywhere.test", ["*"], True),
        ("ann@example.com", [], False),
        ("", ["*"], False),
        ("no-at-sign", ["*"], False),
        ("ann@example.com", ["bob@example.com", "@example.com"], True),
    ],
)
def test_sender_allowed(addr: str, allowed: list[str], expected: bool) -> None:
    """Exact addresses, exact domains (no subdomains) and the wildcard."""
    assert sender_allowed(addr, allowed) is expected


# --- budgets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "default", "max_budget", "expected"),
    [
        (None, "standard", "high", "standard"),
        ("high", "standard", "high", "high"),
        ("HIGH", "standard", "high", "high"),
        ("low", "standard", "high", "low"),
        ("unlimited", "standard", "high", "high"),
        ("unlimited", "standard", "unlimited", "unlimited"),
        ("high", "standard", "standard", "standard"),
        ("tsk01abcdef", "standard", "high", "standard"),
        ("", "low", "high", "low"),
        (None, "high", "low", "low"),
    ],
)
def test_requested_budget(tag: str | None, default: str, max_budget: str, expected: str) -> None:
    """A budget tag is honoured up to the cap; anything else means the default, also capped."""
    assert requested_budget(tag, default, max_budget) == expected


@pytest.mark.parametrize(("default", "max_budget"), [("huge", "high"), ("standard", "max")])
def test_requested_budget_rejects_unknown(default: str, max_budget: str) -> None:
    """An unknown default or cap is a programming error."""
    with pytest.raises(ValueError, match="must be one of"):
        requested_budget(None, default, max_budget)


@pytest.mark.parametrize(
    ("message_id", "expected"),
    [
        ("<01J0ABCDEF.mailgate@agents.example.com>", True),
        ("01J0ABCDEF.mailgate@agents.example.com", True),
        ("<01J0ABCDEF.mailgate@other.example.com>", False),
        ("<CAF=x@mail.gmail.com>", False),
        ("<6B7EC235-5B17@agents.example.com>", False),
        ("", False),
    ],
)
def test_is_own_message_id(message_id: str, expected: bool) -> None:
    """Only ids in the shape mailgate mints, on its domain, are ours."""
    assert policy.is_own_message_id(message_id, OWN) is expected
