"""Replies and notices as a mail client would show them: headers, text and HTML parts, attachments."""

from __future__ import annotations

import copy
import email
import email.policy
import email.utils
from datetime import timedelta
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from mailgate.errors import ConfigError
from mailgate.models import AttachedFile, LinkedFile, ReplyHeaders, SkippedFile, Source
from mailgate.replies.render import NOTICE_KINDS, Renderer, markdown_to_html, reply_subject

TASK_URL = "https://handinger.com/tasks/tsk_01J0000000000000000000000"
EXPECTED_HEADERS = {
    "from", "to", "cc", "reply-to", "subject", "date", "message-id", "in-reply-to", "references",
    "auto-submitted", "x-auto-response-suppress", "x-mailgate-loop", "mime-version", "content-type",
}  # fmt: skip


def make_headers(**changes: object) -> ReplyHeaders:
    values: dict[str, object] = {
        "from_addr": "research@agents.example.com",
        "from_name": "research (mailgate)",
        "to": ["alice@example.com"],
        "cc": ["bob@example.com"],
        "reply_to": "research+tok123@agents.example.com",
        "subject": "Quarterly numbers",
        "message_id": "<reply-1@agents.example.com>",
        "in_reply_to": "<orig-1@example.com>",
        "references": ["<start@example.com>", "<orig-1@example.com>"],
        "loop_header_value": "agents.example.com; v=1",
    }
    values.update(changes)
    return ReplyHeaders(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def roundtrip(msg: EmailMessage) -> EmailMessage:
    """What the recipient's client parses from the bytes we send."""
    raw = msg.as_bytes(policy=email.policy.SMTP).replace(b"\r\n", b"\n")  # as a client stores it
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(msg: EmailMessage) -> tuple[str, str]:
    """The (text, html) bodies."""
    text, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert text is not None
    assert html is not None
    return text.get_content(), html.get_content()


def answer(renderer: Renderer, markdown: str = "Hello", **kwargs: object) -> EmailMessage:
    headers = kwargs.pop("headers", None) or make_headers()
    kwargs.setdefault("sources", [])
    kwargs.setdefault("task_url", TASK_URL)
    return roundtrip(renderer.answer(headers, answer_markdown=markdown, **kwargs))  # type: ignore[arg-type]


# --- subject -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        ("Quarterly numbers", "Re: Quarterly numbers"),
        ("Re: x", "Re: x"),
        ("Re: Re: Re: x", "Re: x"),
        ("RE: AW: x", "Re: x"),
        ("re:x", "Re: x"),
        ("Re[2]: x", "Re: x"),
        ("Aw: Sv: Antw: Vs: x", "Re: x"),
        ("Réf : x", "Re: x"),
        ("回复：会议", "Re: 会议"),
        ("Fwd: x", "Re: Fwd: x"),
        ("FW: x", "Re: FW: x"),
        ("Re: Fwd: x", "Re: Fwd: x"),
        ("Recipe ideas", "Re: Recipe ideas"),
        ("Resume: draft", "Re: Resume: draft"),
        ("", "Re: (no subject)"),
        ("Re:", "Re: (no subject)"),
        ("   lots \t of   space  ", "Re: lots of space"),
        ("Hi\r\nBcc: evil@example.net", "Re: Hi Bcc: evil@example.net"),
    ],
)
def test_reply_subject(original: str, expected: str) -> None:
    """Exactly one "Re: ", reply prefixes never stack, forwards stay, controls become spaces."""
    assert reply_subject(original) == expected


def test_reply_subject_is_capped() -> None:
    """A huge subject is cut with an ellipsis instead of filling the header."""
    subject = reply_subject("word " * 1000)
    assert len(subject) < 300
    assert subject.endswith("…")


# --- headers -----------------------------------------------------------------------------------------


def test_answer_headers(renderer: Renderer) -> None:
    """Every reply carries the threading, loop-prevention and addressing headers, and no Precedence."""
    msg = answer(renderer)
    assert {k.lower() for k in msg} == EXPECTED_HEADERS
    assert msg["From"] == '"research (mailgate)" <research@agents.example.com>'
    assert msg["To"] == "alice@example.com"
    assert msg["Cc"] == "bob@example.com"
    assert msg["Reply-To"] == "research+tok123@agents.example.com"
    assert msg["Subject"] == "Re: Quarterly numbers"
    assert msg["Message-ID"] == "<reply-1@agents.example.com>"
    assert msg["In-Reply-To"] == "<orig-1@example.com>"
    assert msg["References"] == "<start@example.com> <orig-1@example.com>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-Mailgate-Loop"] == "agents.example.com; v=1"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).utcoffset() == timedelta(0)
    assert msg.get_content_type() == "multipart/alternative"


def test_no_cc_and_no_parent(renderer: Renderer) -> None:
    """Without Cc or a parent message, those headers are left out rather than left empty."""
    msg = answer(renderer, headers=make_headers(cc=[], in_reply_to=None, references=[]))
    assert {k.lower() for k in msg} == EXPECTED_HEADERS - {"cc", "in-reply-to", "references"}


def test_unusable_message_id_is_refused(renderer: Renderer) -> None:
    """The caller chooses the Message-ID; a malformed one is a bug, not something to send."""
    with pytest.raises(ValueError, match="Message-ID"):
        renderer.notice(make_headers(message_id="no-brackets@example.com"), "gave_up")


def test_non_ascii_display_name_and_domain(renderer: Renderer) -> None:
    """Non-ASCII display names are encoded words, non-ASCII domains go out as IDNA."""
    msg = answer(renderer, headers=make_headers(from_name="Recherche — Jörg", to=["anna@bücher.example"]))
    assert msg["From"].addresses[0].display_name == "Recherche — Jörg"
    assert msg["To"] == "anna@xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("chain", "in_reply_to", "expected"),
    [
        (["<a@x>", "<b@x>"], "<b@x>", ["<a@x>", "<b@x>"]),
        (["<a@x>"], "<b@x>", ["<a@x>", "<b@x>"]),
        ([], "<b@x>", ["<b@x>"]),
        (["<b@x>", "<a@x>"], "<b@x>", ["<a@x>", "<b@x>"]),
        (["<a@x>", "<a@x>", "<b@x>"], None, ["<a@x>", "<b@x>"]),
        (["<a@x>", "garbage", "<with space@x>", "", "<b@x>"], None, ["<a@x>", "<b@x>"]),
        (["<reply-1@agents.example.com>", "<a@x>"], None, ["<a@x>"]),
        ([f"<{i}@x>" for i in range(30)], "<29@x>", ["<0@x>"] + [f"<{i}@x>" for i in range(20, 30)]),
    ],
)
def test_references(
    renderer: Renderer, chain: list[str], in_reply_to: str | None, expected: list[str]
) -> None:
    """References: deduplicated, valid ids only, ending with In-Reply-To, first id plus the last ten."""
    msg = answer(renderer, headers=make_headers(references=chain, in_reply_to=in_reply_to))
    assert msg["References"].split() == expected


def test_long_ids_are_folded_not_encoded(renderer: Renderer) -> None:
    """Long message ids stay byte-exact (folded between ids), and References stays under ~900 chars."""
    ids = [f"<{'x' * 90}.{i}@mail.example.com>" for i in range(40)]
    headers = make_headers(
        references=ids, in_reply_to=ids[-1], message_id=f"<{'m' * 120}@agents.example.com>"
    )
    raw = renderer.answer(headers, answer_markdown="x", sources=[], task_url=None).as_bytes(
        policy=email.policy.SMTP
    )
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    references = parsed["References"].split()
    assert references[0] == ids[0]
    assert references[-1] == ids[-1]
    assert len(" ".join(references)) <= 900
    assert parsed["Message-ID"] == f"<{'m' * 120}@agents.example.com>"
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))


WEIRD = [
    "Hi\r\nBcc: victim@example.net",
    "Hi\nX-Injected: yes",
    "Hi\rX-Injected: yes",
    "nul\x00byte\x1b[31m",
    "line\u2028separator\x85next",
    "🎉🎉 party " * 40,
    "שלום עולם مرحبا",
    "x" * 5000,
    "\ud800 lone surrogate",
    "=?utf-8?q?X-Injected:_yes?=",
    "\t\r\n ",
]


@pytest.mark.parametrize("weird", WEIRD)
def test_weird_text_cannot_add_headers(renderer: Renderer, weird: str) -> None:
    """Sender or worker text in subject, names, filenames and reasons never adds a header or crashes."""
    headers = make_headers(subject=weird, from_name=weird, loop_header_value=weird)
    msg = renderer.answer(
        headers,
        answer_markdown=weird,
        sources=[Source(url=weird, title=weird)],
        task_url=weird,
        attached=[AttachedFile(weird, "text/plain\r\nX-Injected: yes", b"data")],
        linked=[LinkedFile(weird, weird, weird)],
        skipped=[SkippedFile(weird, weird)],
        note=weird,
    )
    head = msg.as_bytes(policy=email.policy.SMTP).split(b"\r\n\r\n", 1)[0]
    parsed = roundtrip(msg)
    assert {k.lower() for k in parsed} == EXPECTED_HEADERS
    assert b"\nX-Injected" not in head
    assert b"\nBcc" not in head
    attachments = list(parsed.iter_attachments())
    assert len(attachments) == 1
    assert {k.lower() for k in attachments[0]} == {"content-type", "content-transfer-encoding",
                                                    "content-disposition", "mime-version"}  # fmt: skip
    assert attachments[0].get_content() == b"data"
    notice = renderer.notice(headers, "api_rejected", reason=weird, skipped=[SkippedFile(weird, weird)])
    assert {k.lower() for k in roundtrip(notice)} == EXPECTED_HEADERS


def test_copy_keeps_headers(renderer: Renderer) -> None:
    """A deep copy of a reply (as a queue might make) serialises with the same ids."""
    msg = renderer.answer(make_headers(), answer_markdown="x", sources=[], task_url=None)
    head = msg.as_bytes(policy=email.policy.SMTP).split(b"Content-Type")[0]
    assert copy.deepcopy(msg).as_bytes(policy=email.policy.SMTP).split(b"Content-Type")[0] == head
    assert b"References: <start@example.com> <orig-1@example.com>\r\n" in head


# --- Markdown to HTML ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "forbidden"),
    [
        ("<script>alert(1)</script>", ["<script", "alert(1)"]),
        ('<img src="x" onerror="alert(1)">', ["onerror", "<img"]),
        ("[click](javascript:alert(1))", ['href="javascript']),
        ('<a href="javascript:alert(1)">click</a>', ["javascript:"]),
        ('<a href="JaVaScRiPt:alert(1)">click</a>', ["javascript:"]),
        ('<a href="vbscript:msgbox(1)">click</a>', ["vbscript:"]),
        ('<a href="data:text/html;base64,PHNjcmlwdD4=">click</a>', ["data:"]),
        ("[click](data:text/html;base64,PHNjcmlwdD4=)", ['href="data:']),
        ("![x](data:image/png;base64,iVBORw0KGgo=)", ["<img", 'href="data:']),
        ('<form action="https://evil.example/"><input name="password">Log in</form>', ["<form", "<input"]),
        ('<iframe src="https://evil.example/"></iframe>', ["<iframe", "evil.example"]),
        ("<form><label>Confirm your bank password</label><button>Go</button></form>", ["password", "Go"]),
        (
            "<textarea>pre-filled text</textarea><select><option>pick</option></select>",
            ["pre-filled", "pick"],
        ),
        ("<noscript>no js</noscript><template>tpl</template>", ["no js", "tpl"]),
        ('<object data="https://evil.example/x.swf"></object><embed src="x">', ["<object", "<embed"]),
        ('<p style="position:fixed;top:0">hi</p>', ["position:fixed"]),
        ('<div onclick="steal()">hi</div>', ["onclick", "steal"]),
        ("<svg onload=alert(1)><circle/></svg>", ["<svg", "onload"]),
        ("<style>body{display:none}</style>", ["<style", "display:none"]),
        ('<a href="/relative/path">rel</a>', ["/relative/path"]),
        ('<span class="x" id="y">hi</span>', ["class=", "id="]),
        ("<!-- hidden comment -->visible", ["hidden comment"]),
        ('<meta http-equiv="refresh" content="0;url=https://evil.example">', ["<meta", "refresh"]),
    ],
)
def test_html_is_sanitised(markdown: str, forbidden: list[str]) -> None:
    """Scripts, event handlers, unsafe link schemes, forms, frames and style attributes are removed."""
    html = markdown_to_html(markdown).lower()
    for needle in forbidden:
        assert needle.lower() not in html


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        (
            "[site](https://example.com/a)",
            '<a href="https://example.com/a" rel="noopener noreferrer">site</a>',
        ),
        ("[mail](mailto:a@example.com)", 'href="mailto:a@example.com"'),
        ("see https://example.com/x.", '<a href="https://example.com/x" rel="noopener noreferrer">'),
        ("(https://en.wikipedia.org/wiki/Foo_(bar))", 'href="https://en.wikipedia.org/wiki/Foo_(bar)"'),
        ("`https://example.com/in-code`", "<code"),
        (
            "![chart](https://example.com/c.png)",
            '<a href="https://example.com/c.png" rel="noopener noreferrer">',
        ),
        ("![chart](https://example.com/c.png)", "[Image: chart]"),
        ("| a | b |\n|--:|---|\n| 1 | 2 |", '<td align="right"'),
        ("| a | b |\n|---|---|\n| 1 | 2 |", "<th"),
        ("```python\nprint('hi')\n```", "<pre"),
        ("```python\nprint('hi')\n```", "print('hi')\n</code></pre>"),
        ("~~gone~~", "<s>gone</s>"),
        ("# Title", "<h1"),
        ("> quoted", "<blockquote"),
        ("1. one\n2. two", "<ol>"),
        ("a <b>bold</b> word", "<b>bold</b>"),
    ],
)
def test_markdown_renders(markdown: str, expected: str) -> None:
    """Common Markdown (links, bare URLs, tables, code, strikethrough, lists) renders as readable HTML."""
    assert expected in markdown_to_html(markdown)


def test_images_are_never_loaded() -> None:
    """No <img> survives, Markdown or raw, so opening a reply fetches nothing remote."""
    html = markdown_to_html('![a](https://t.example/p.gif) <img src="https://t.example/q.gif">')
    assert "<img" not in html
    assert "q.gif" not in html


def test_code_urls_are_not_linked() -> None:
    """A URL inside inline code stays code, not a link."""
    assert "<a" not in markdown_to_html("`https://example.com/in-code`")


# --- the answer ----------------------------------------------------------------------------------------


def test_answer_parts(renderer: Renderer) -> None:
    """Both parts carry the answer, sources, linked and skipped files, the note and the footer."""
    msg = answer(
        renderer,
        "# Findings\n\n| k | v |\n|---|---|\n| a | 1 |\n\nSee **this**.\r\n\r\n\r\n\r\nEnd.   ",
        sources=[Source(url="https://example.com/a", title="Example A"), Source(url="https://b.example/")],
        linked=[
            LinkedFile("report.pdf", "https://files.example/report.pdf", "12 MB, over the 10 MB limit"),
            LinkedFile("data.csv", "https://files.example/data.csv", "couldn't be downloaded"),
        ],
        skipped=[SkippedFile("scan.tiff", "14 MB, over the 10 MB limit")],
        note="You are not a participant of the earlier conversation, so this started a new task.",
    )
    text, html = parts(msg)
    assert text.startswith("# Findings\n\n| k | v |\n")
    assert "See **this**.\n\nEnd.\n" in text
    assert "- Example A: https://example.com/a\n" in text
    assert "- https://b.example/\n" in text
    assert "- report.pdf (12 MB, over the 10 MB limit): https://files.example/report.pdf\n" in text
    assert "- data.csv (couldn't be downloaded): https://files.example/data.csv\n" in text
    assert "- scan.tiff: 14 MB, over the 10 MB limit\n" in text
    assert "Note: You are not a participant" in text
    assert f"\n-- \nOpen this task in Handinger: {TASK_URL}\nReply to this email" in text
    assert text.endswith("\n")
    assert "\r" not in text
    assert "<h1" in html
    assert "<table" in html
    assert "<strong>this</strong>" in html
    assert '<a href="https://example.com/a" style="color:#0969da;">Example A</a>' in html
    assert '<a href="https://files.example/report.pdf" style="color:#0969da;">report.pdf</a>' in html
    assert "(12 MB, over the 10 MB limit)" in html
    assert "scan.tiff: 14 MB, over the 10 MB limit" in html
    assert "You are not a participant" in html
    assert f'<a href="{TASK_URL}"' in html
    assert "Reply to this email to continue" in html


def test_answer_html_escapes_everything_else(renderer: Renderer) -> None:
    """Titles, filenames, reasons and notes are text in the HTML, never markup."""
    evil = '<script>alert("x")</script>'
    msg = answer(
        renderer,
        sources=[Source(url="https://example.com/", title=evil)],
        linked=[LinkedFile(evil, "javascript:alert(1)", evil)],
        skipped=[SkippedFile(evil, evil)],
        note=evil,
    )
    _, html = parts(msg)
    assert "<script" not in html
    assert "&lt;script&gt;" in html
    assert 'href="javascript' not in html


def test_empty_answer(renderer: Renderer) -> None:
    """A turn with no text still gets a readable reply."""
    text, html = parts(answer(renderer, "  \n\n "))
    assert text.startswith("(The worker finished without writing an answer.)")
    assert "without writing an answer" in html


def test_no_task_url_no_dangling_link(renderer: Renderer) -> None:
    """Without a task URL the footer has no link, and unsafe task URLs are not linked."""
    for url in (None, "javascript:alert(1)"):
        text, html = parts(answer(renderer, task_url=url))
        assert "Open this task" not in text
        assert "Open this task" not in html
        assert "Reply to this email to continue" in text


@pytest.mark.parametrize(
    ("filename", "content_type", "expected_name", "expected_type"),
    [
        ("report.pdf", "application/pdf", "report.pdf", "application/pdf"),
        ("résumé 📄.pdf", "application/pdf", "résumé 📄.pdf", "application/pdf"),
        ("отчёт.xlsx", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", "отчёт.xlsx",
         "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ("notes.txt", "text/plain; charset=utf-8", "notes.txt", "text/plain"),
        ("", "image/png", "attachment", "image/png"),
        ("../../etc/passwd", "text/plain", ".._.._etc_passwd", "text/plain"),
        ("invoice\u202efdp.exe", "application/x-msdownload", "invoicefdp.exe", "application/x-msdownload"),
        ("a\r\nb.bin", "nonsense", "a b.bin", "application/octet-stream"),
        ("mail.eml", "message/rfc822", "mail.eml", "application/octet-stream"),
        ("x" * 400 + ".pdf", "application/pdf", "x" * 175 + "….pdf", "application/pdf"),
    ],
)  # fmt: skip
def test_attachments(
    renderer: Renderer, filename: str, content_type: str, expected_name: str, expected_type: str
) -> None:
    """Attached files arrive with their (safe) names, a usable type and the exact bytes."""
    data = bytes(range(256)) * 3
    msg = answer(renderer, attached=[AttachedFile(filename, content_type, data)])
    assert msg.get_content_type() == "multipart/mixed"
    (attachment,) = msg.iter_attachments()
    assert isinstance(attachment, Message)
    assert attachment.get_filename() == expected_name
    assert attachment.get_content_type() == expected_type
    assert attachment.get_payload(decode=True) == data
    assert parts(msg)[0].startswith("Hello")


def test_non_ascii_filename_uses_rfc2231(renderer: Renderer) -> None:
    """Non-ASCII filenames go out as RFC 2231 parameters that clients decode."""
    msg = renderer.answer(
        make_headers(), answer_markdown="x", sources=[], task_url=None,
        attached=[AttachedFile("résumé.pdf", "application/pdf", b"%PDF")],
    )  # fmt: skip
    assert b"filename*=utf-8''r%C3%A9sum%C3%A9.pdf" in msg.as_bytes(policy=email.policy.SMTP)


def test_several_attachments_keep_order(renderer: Renderer) -> None:
    """Several files are attached in the given order."""
    files = [AttachedFile(f"f{i}.txt", "text/plain", f"file {i}".encode()) for i in range(3)]
    msg = answer(renderer, attached=files)
    got = [(a.get_filename(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    assert got == [(f.filename, f.data) for f in files]


# --- notices -------------------------------------------------------------------------------------------

NOTICE_PHRASES = {
    "empty_reply": "nothing was sent to the worker",
    "api_rejected": "did not accept your message",
    "wrong_worker": "belongs to a task of a different worker",
    "task_not_found": "no longer exists",
    "out_of_credits": "run out of Handinger credits",
    "task_failed": "ended without an answer",
    "gave_up": "could not be reached",
    "too_many_requests": "too many new tasks",
    "address_not_ready": "this address is not set up correctly",
    "working": "is being worked on",
    "held": "is waiting for approval",
    "status": "stands",
    "archived": "was not archived",
    "help": "/archive",
}


@pytest.mark.parametrize("kind", NOTICE_KINDS)
def test_notice(renderer: Renderer, kind: str) -> None:
    """Each notice names the message's subject, says what happened, and shows the reason in both parts."""
    msg = roundtrip(
        renderer.notice(
            make_headers(subject="Re: Budget <2025>"), kind, reason="input is too long & odd",
            task_url=TASK_URL, skipped=[SkippedFile("big.zip", "40 MB, over the 30 MB limit")],
        )
    )  # fmt: skip
    assert {k.lower() for k in msg} == EXPECTED_HEADERS
    assert msg["Subject"] == "Re: Budget <2025>"
    text, html = parts(msg)
    assert NOTICE_PHRASES[kind] in text
    assert NOTICE_PHRASES[kind] in html
    assert "“Re: Budget <2025>”" in text
    assert "“Re: Budget &lt;2025&gt;”" in html
    assert "input is too long & odd" in text
    assert "input is too long &amp; odd" in html
    assert "- big.zip: 40 MB, over the 30 MB limit" in text
    assert "big.zip: 40 MB, over the 30 MB limit" in html
    assert TASK_URL in text
    assert f'href="{TASK_URL}"' in html


@pytest.mark.parametrize("kind", NOTICE_KINDS)
def test_notice_without_extras(renderer: Renderer, kind: str) -> None:
    """A notice without reason, task link or files has no empty "Details:" line or dangling signature."""
    text, html = parts(roundtrip(renderer.notice(make_headers(subject=""), kind)))
    assert "“(no subject)”" in text
    assert "Details" not in text
    assert "None" not in text
    assert "None" not in html
    assert not text.rstrip().endswith("--")
    assert "\n\n\n" not in text


def test_task_failed_shows_status(renderer: Renderer) -> None:
    """For task_failed the reason is the task's status."""
    text, _ = parts(renderer.notice(make_headers(), "task_failed", reason="aborted"))
    assert "ended without an answer (status: aborted)." in text


def test_unknown_notice_kind(renderer: Renderer) -> None:
    """A typo in a notice kind fails loudly instead of sending an empty mail."""
    with pytest.raises(ValueError, match="unknown notice kind"):
        renderer.notice(make_headers(), "rejected_files")


# --- templates -----------------------------------------------------------------------------------------


def test_custom_templates_override_file_by_file(tmp_path: Path) -> None:
    """Files in templates_dir replace the packaged ones; the rest still come from the package."""
    (tmp_path / "answer.txt").write_text("CUSTOM {{ subject }}\n{{ answer_text }}\n", encoding="utf-8")
    (tmp_path / "notice_gave_up.html").write_text("<p>custom {{ subject }}</p>", encoding="utf-8")
    custom = Renderer(tmp_path)
    text, html = parts(answer(custom, "Body"))
    assert text == "CUSTOM Quarterly numbers\nBody\n"
    assert "Body" in html
    assert "Reply to this email" in html
    _, notice_html = parts(custom.notice(make_headers(subject="<x>"), "gave_up"))
    assert notice_html.strip() == "<p>custom &lt;x&gt;</p>"


def test_broken_custom_template_fails_at_start(tmp_path: Path) -> None:
    """A template with a syntax error is reported when the renderer is built, not after a task ran."""
    (tmp_path / "answer.html").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        Renderer(tmp_path)
    assert caught.value.problems[0].startswith("MAILGATE_TEMPLATES_DIR: template answer.html: ")


def test_templates_are_shipped_next_to_the_package() -> None:
    """The packaged templates include every notice kind in both formats (the wheel ships this folder)."""
    folder = Path(__file__).resolve().parent.parent / "templates"
    names = {p.name for p in folder.iterdir()}
    for kind in NOTICE_KINDS:
        assert {f"notice_{kind}.txt", f"notice_{kind}.html"} <= names
    assert {"answer.txt", "answer.html"} <= names
