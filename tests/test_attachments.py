"""Attachments both ways, end to end: mail files reach the API byte for byte, worker files come back.

Everything runs over real sockets: the gateway, the sandbox API (which records the sha256 of every file
part it receives) and a recording relay. Corpus mail is read in place from `../shared/corpus`.
"""

from __future__ import annotations

import base64
import email
import hashlib
import json
import re
from email.message import EmailMessage, Message
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from mailgate.admission import policy
from mailgate.mail import bodies
from mailgate.mail import parse as parsing
from mailgate.mail.headers import Headers, read_signals
from mailgate.turns import turn_input
from tests.conftest import CORPUS, needs_corpus
from tests.mail import make_mail, smtp_send, until

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent / "data"
SOURCE_URL = "https://example.com/sandbox/source"


def parse(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def body_text(msg: Any) -> str:
    return str(msg.get_body(preferencelist=("plain",)).get_content())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, size: int) -> bytes:
    """`size` bytes that differ for each `n` (so no two files are exact duplicates)."""
    seed = hashlib.sha256(str(n).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def run(gw: Any, relay: Any, *mails: EmailMessage | bytes, replies: int | None = None) -> list[Any]:
    """Send `mails` and return the parsed replies once `replies` (default: one per mail) arrived."""
    for mail in mails:
        rcpts = None if isinstance(mail, EmailMessage) else ["research@agents.example.com"]
        seen = await smtp_send(gw.smtp_port, mail, rcpts=rcpts)
        assert seen.accepted, seen
    got = await relay.wait_for(len(mails) if replies is None else replies, timeout=20)
    return [parse(data) for _, _, data in got]


def reply_files(reply: Any) -> dict[str, tuple[str, bytes]]:
    return {
        p.get_filename(): (p.get_content_type(), p.get_payload(decode=True)) for p in reply.iter_attachments()
    }


# --- inbound: mail -> task files -------------------------------------------------------------------------


async def test_three_attachments_arrive_byte_for_byte(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """Three attachments reach the API as file parts named `files`, in order, with names, types and sha256."""
    files = [
        ("report.pdf", "application/pdf", blob(1, 200_000)),
        ("numbers.csv", "text/csv", b"q,revenue\nQ3,12\n"),
        ("photo.jpg", "image/jpeg", blob(3, 70_000)),
    ]
    async with make_gateway() as gw:
        [reply] = await run(gw, relay, make_mail(attachments=files))

    [request] = sandbox.state.requests
    assert request.multipart and request.files_field == "files"
    assert [(f.filename, f.content_type, f.size, f.sha256) for f in request.files] == [
        (name, ctype, len(data), sha(data)) for name, ctype, data in files
    ]
    sent = '"report.pdf" (195 KB), "numbers.csv" (16 bytes), "photo.jpg" (68 KB)'
    assert f"\nFiles sent: {sent}\n" in request.input
    assert "not passed on" not in body_text(reply)


async def test_six_attachments_send_five_and_list_the_sixth(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """Only 5 files go to the API, in message order; the reply names the sixth and why."""
    files = [(f"file{n}.txt", "text/plain", f"file number {n}\n".encode()) for n in range(1, 7)]
    async with make_gateway() as gw:
        [reply] = await run(gw, relay, make_mail(attachments=files))

    [request] = sandbox.state.requests
    assert [f.filename for f in request.files] == [f"file{n}.txt" for n in range(1, 6)]
    assert [f.sha256 for f in request.files] == [sha(data) for _, _, data in files[:5]]
    text = body_text(reply)
    assert "Attachments that were not passed on:" in text
    assert "- file6.txt: over the limit of 5 files per message" in text


async def test_file_over_10_mb_is_skipped_and_the_text_still_runs(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A 12 MB file is not sent; the turn runs with the text, and the reply says which file and why."""
    big = blob(12, 12 * 1024 * 1024)
    async with make_gateway() as gw:
        mail = make_mail(
            body="Summarise the report please.", attachments=[("report.pdf", "application/pdf", big)]
        )
        [reply] = await run(gw, relay, mail)

    [request] = sandbox.state.requests
    assert request.files == [] and not request.multipart
    assert "Summarise the report please." in request.input
    assert "report.pdf: 12 MB, over the 10 MB limit" in body_text(reply)
    assert "Echo from the sandbox" in body_text(reply)


async def test_duplicate_and_empty_files_are_dropped(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """A zero-byte file and an exact duplicate (under another name) are not sent; nothing is skipped."""
    data = blob(4, 5000)
    files = [("a.bin", "application/octet-stream", data), ("empty.txt", "text/plain", b""),
             ("copy-of-a.bin", "application/octet-stream", data)]  # fmt: skip
    async with make_gateway() as gw:
        [reply] = await run(gw, relay, make_mail(attachments=files))

    [request] = sandbox.state.requests
    assert [(f.filename, f.sha256) for f in request.files] == [("a.bin", sha(data))]
    assert "not passed on" not in body_text(reply)


async def test_winmail_dat_is_sent_as_the_files_it_wraps(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """Outlook's winmail.dat (TNEF) reaches the API as the two files inside it, not as winmail.dat."""
    raw = (DATA / "parse-winmail.eml").read_bytes()
    raw = re.sub(rb"(?m)^From: .*$", b"From: Outlook User <alice@example.org>", raw, count=1)
    raw = re.sub(rb"(?m)^In-Reply-To: .*\r?\n", b"", raw, count=1)
    async with make_gateway() as gw:
        await run(gw, relay, raw)

    [request] = sandbox.state.requests
    assert [(f.filename, f.sha256) for f in request.files] == [
        ("report.txt", sha(b"quarterly numbers: 1, 2, 3\n")),
        ("notes.csv", sha(b"a,b\n1,2\n")),
    ]
    assert "Please summarise the attached report." in request.input


async def test_forwarded_message_is_sent_as_eml(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """An attached message (message/rfc822) becomes `<subject>.eml` with the whole message inside."""
    inner = make_mail(sender="carol@example.com", subject="Budget draft", body="The draft is attached.",
                      attachments=[("budget.xlsx", "application/octet-stream", blob(5, 3000))])  # fmt: skip
    outer = make_mail(subject="Fwd: Budget draft", body="See the forwarded mail.")
    outer.add_attachment(inner)
    async with make_gateway() as gw:
        await run(gw, relay, outer)

    [request] = sandbox.state.requests
    [sent] = request.files
    assert (sent.filename, sent.content_type) == ("Budget draft.eml", "message/rfc822")
    expected = parsing.parse_message(outer.as_bytes()).attachments[0].data
    assert sent.sha256 == sha(expected)
    again = email.message_from_bytes(expected, policy=default)
    assert again["Subject"] == "Budget draft" and again["From"] == "carol@example.com"
    [budget] = list(again.iter_attachments())
    assert budget.get_payload(decode=True) == blob(5, 3000)


async def test_inline_image_with_a_name_is_sent(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """An image shown inline in an HTML body, with a file name, is a file; one without a name is not."""
    png, logo = b"\x89PNG\r\n\x1a\n" + blob(6, 4000), b"\x89PNG\r\n\x1a\n" + blob(7, 900)
    mail = make_mail(body="See the chart below.")
    mail.add_alternative(
        '<p>See the chart below.</p><img src="cid:chart"><img src="cid:logo">', subtype="html"
    )
    parts: Any = mail.get_payload()
    html = parts[1]
    html.add_related(png, "image", "png", cid="<chart>", filename="chart.png", disposition="inline")
    html.add_related(logo, "image", "png", cid="<logo>")
    async with make_gateway() as gw:
        await run(gw, relay, mail)

    [request] = sandbox.state.requests
    assert [(f.filename, f.content_type, f.sha256) for f in request.files] == [
        ("chart.png", "image/png", sha(png))
    ]


async def test_encoded_file_names_are_decoded_and_made_safe(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """RFC 2231 and RFC 2047 names arrive decoded; a path in a name is cut to its last part."""
    raw = (
        b"From: alice@example.org\r\nTo: research@agents.example.com\r\nSubject: names\r\n"
        b"Message-ID: <names@example.org>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nTwo files.\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%E2%82%AC.pdf\r\n\r\nPDF\r\n"
        b'--b\r\nContent-Type: text/plain; name="=?utf-8?b?w7xiZXIudHh0?="\r\n'
        b'Content-Disposition: attachment; filename="..\\\\..\\\\etc\\\\=?utf-8?b?w7xiZXIudHh0?="\r\n'
        b"\r\nhi\r\n"
        b"--b--\r\n"
    )
    async with make_gateway() as gw:
        await run(gw, relay, raw)

    [request] = sandbox.state.requests
    assert [(f.filename, f.content_type) for f in request.files] == [
        ("Grüße €.pdf", "application/pdf"),
        ("über.txt", "text/plain"),
    ]


async def test_part_name_is_a_setting(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """MAILGATE_FILES_FIELD=files[] names every file part `files[]`."""
    async with make_gateway(MAILGATE_FILES_FIELD="files[]") as gw:
        await run(
            gw,
            relay,
            make_mail(attachments=[("a.txt", "text/plain", b"a\n"), ("b.txt", "text/plain", b"b\n")]),
        )

    [request] = sandbox.state.requests
    assert request.files_field == "files[]"
    assert [f.sha256 for f in request.files] == [sha(b"a\n"), sha(b"b\n")]


async def test_follow_up_does_not_resend_files_the_task_has(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """A reply that carries the same attachment again sends only its new file to the same task."""
    old, new = blob(8, 3000), blob(9, 3000)
    async with make_gateway() as gw:
        first = make_mail(attachments=[("data.csv", "text/csv", old)])
        [answer] = await run(gw, relay, first)
        chain = [str(first["Message-ID"]), str(answer["Message-ID"])]
        again = make_mail(
            to=str(answer["Reply-To"]), subject="Re: Quarterly numbers", body="And this one too.",
            in_reply_to=chain[-1], references=chain,
            attachments=[("data.csv", "text/csv", old), ("more.csv", "text/csv", new)],
        )  # fmt: skip
        await run(gw, relay, again, replies=2)

    one, two = sandbox.state.requests
    assert (two.task_id, two.seq) == (one.task_id, 1)
    assert [f.sha256 for f in one.files] == [sha(old)]
    assert [(f.filename, f.sha256) for f in two.files] == [("more.csv", sha(new))]


# --- outbound: worker output -> reply ------------------------------------------------------------------


async def test_output_file_sources_and_dashboard_link_in_the_reply(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """The worker's echo.txt is attached with its type; sources show title and URL; the task link ends it."""
    async with make_gateway() as gw:
        [reply] = await run(gw, relay, make_mail(body="Hello worker."))

    [request] = sandbox.state.requests
    [turn] = sandbox.state.turns_of(request.task_id)
    files = reply_files(reply)
    assert files == {"echo.txt": ("text/plain", turn.output_text.encode())}
    text = body_text(reply)
    assert f"Sandbox source: {SOURCE_URL}" in text
    task = sandbox.state.tasks[request.task_id]
    assert task.url in text
    assert text.rstrip().splitlines()[-2].endswith(task.url)
    html = str(reply.get_body(preferencelist=("html",)).get_content())
    assert SOURCE_URL in html and task.url in html


@pytest.mark.parametrize(
    "env",
    [{"MAILGATE_OUTPUT_FILE_MAX": "10"}, {"MAILGATE_OUTPUT_TOTAL_MAX": "10"}],
    ids=["per-file", "per-reply"],
)
async def test_output_file_over_the_cap_is_linked(
    make_gateway: Any, sandbox: Any, relay: Any, env: dict[str, str]
) -> None:
    """An output file over the per-file or per-reply cap is linked (name, reason, URL), not attached."""
    async with make_gateway(**env) as gw:
        [reply] = await run(gw, relay, make_mail(body="Hello worker."))

    [request] = sandbox.state.requests
    assert reply_files(reply) == {}
    text = body_text(reply)
    assert "Files not attached:" in text
    url = f"{sandbox.url}/files/{request.task_id}/0/echo.txt"
    assert re.search(rf"- echo\.txt \([^)]*too large to attach\): {re.escape(url)}", text), text


async def test_output_file_that_fails_to_download_is_linked(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """An output file the API will not serve is linked with a reason; the answer still arrives."""
    sandbox.state.faults.push(status=500, times=10, path="GET /files/*")
    async with make_gateway() as gw:
        [reply] = await run(gw, relay, make_mail(body="Hello worker."))

    assert reply_files(reply) == {}
    assert "echo.txt (could not be downloaded)" in body_text(reply)
    assert "Echo from the sandbox" in body_text(reply)


# --- real mail from the corpus -------------------------------------------------------------------------


def _leaf_payloads(msg: Message) -> set[str]:
    """sha256 of every decoded leaf body (and every attached message's bytes) in `msg`."""
    found: set[str] = set()
    for part in msg.walk():
        if part.get_content_type() == "message/rfc822":
            continue
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            found.add(sha(data))
    return found


def _corpus_with_files() -> list[Path]:
    chosen = []
    for path in sorted(CORPUS.rglob("*.eml")):
        raw = path.read_bytes()
        if b"\r" in raw.replace(b"\r\n", b"") or raw.startswith(b"From ") or len(raw) > 2_000_000:
            continue  # CR-only or mbox lines do not survive SMTP as they are; keep the test quick
        if any(len(line) > 990 for line in raw.splitlines()):
            continue  # SMTP refuses lines over 1000 octets
        signals = read_signals(Headers.parse(raw))
        if policy.automatic_reason(signals, "alice@example.org", own_domain="agents.example.com"):
            continue
        mail = parsing.parse_message(raw)
        sent, _ = turn_input.pick_files(mail.attachments)
        kinds = {f.content_type for f in sent}
        if (
            sent
            and "message/rfc822" not in kinds
            and "application/ms-tnef" not in kinds
            and mail.text.strip()
        ):
            chosen.append(path)
    return chosen[:12]


@needs_corpus
async def test_corpus_attachments_arrive_byte_for_byte(make_gateway: Any, sandbox: Any, relay: Any) -> None:
    """Real messages with attachments: each file at the API is exactly a decoded part of that message."""
    paths = _corpus_with_files()
    if not paths:
        pytest.skip(f"no corpus messages with attachments found under {CORPUS}")
    mails = []
    for n, path in enumerate(paths):
        raw = path.read_bytes()
        raw = re.sub(rb"(?mi)^(from|sender|reply-to):[^\n]*\n(?:[ \t][^\n]*\n)*", b"", raw)
        raw = re.sub(rb"(?mi)^message-id:[^\n]*\n(?:[ \t][^\n]*\n)*", b"", raw)
        nl = b"\r\n" if b"\r\n" in raw else b"\n"
        mails.append(
            b"From: alice@example.org" + nl + f"Message-ID: <corpus-{n}@example.org>".encode() + nl + raw
        )
    async with make_gateway(MAILGATE_MAX_NEW_TASKS_PER_HOUR="100") as gw:
        await run(gw, relay, *mails)
        await until(
            lambda: len(sandbox.state.requests) == len(mails), timeout=60, what="one request per message"
        )

    for path, raw in zip(paths, mails, strict=True):
        mail = parsing.parse_message(raw)
        expected, _ = turn_input.pick_files(mail.attachments)
        subject = f"Subject: {json.dumps(mail.subject, ensure_ascii=False) if mail.subject else '(none)'}"
        [request] = [
            r for r in sandbox.state.requests
            if subject in r.input and [f.filename for f in r.files] == [f.filename for f in expected]
        ][:1]  # fmt: skip
        assert [(f.filename, f.sha256) for f in request.files] == [
            (f.filename, sha(f.data)) for f in expected
        ]
        decoded = _leaf_payloads(email.message_from_bytes(raw))
        for f in request.files:
            assert f.sha256 in decoded, f"{path.name}: {f.filename} is not a part of the message"


@needs_corpus
def test_big_bodies_parse_exactly_as_small_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every base64-looking body kept out of the parser, corpus mail parses exactly the same."""
    paths = sorted(CORPUS.rglob("*.eml")) + sorted(DATA.glob("*.eml"))
    normal = [parsing.parse_message(p.read_bytes()) for p in paths]
    monkeypatch.setattr(bodies, "LARGE", 1)
    cut = sum(bool(bodies.LargeBodies(p.read_bytes()).spans) for p in paths)
    assert cut > 100
    for path, before in zip(paths, normal, strict=True):
        assert parsing.parse_message(path.read_bytes()) == before, path.name


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 299, 300, 301, 302])
@pytest.mark.parametrize("width", [1, 3, 76, 77])
@pytest.mark.parametrize("padding", ["kept", "dropped", "doubled"])
def test_streamed_runs_decode_as_the_whole(
    monkeypatch: pytest.MonkeyPatch, size: int, width: int, padding: str
) -> None:
    """A big base64 body read a chunk at a time gives exactly the bytes, size and hash of decoding it
    whole, whatever its line width, padding and where the chunks fall."""
    monkeypatch.setattr(bodies, "CHUNK", 7)
    data = bytes(range(256)) * 2
    encoded = base64.b64encode(data[:size]).decode()
    if padding == "dropped":
        encoded = encoded.rstrip("=")
    elif padding == "doubled":
        encoded += "=="
    lines = "\r\n".join(encoded[i : i + width] for i in range(0, len(encoded), width)) or "===="
    raw = f"Content-Type: text/plain\r\n\r\n{lines}\r\n".encode()
    found = bodies.LargeBodies(raw, large=1)
    [_] = found.spans
    content = found.content(0)
    assert isinstance(content, bodies.DecodedRun)
    whole = found.decode(0)
    assert whole == data[:size]
    assert b"".join(content.chunks()) == whole
    assert (content.size, content.sha256) == (len(whole), hashlib.sha256(whole).hexdigest())


def test_odd_runs_decode_as_the_whole() -> None:
    """A run with padding inside it is decoded whole, as before; one of a broken length is broken."""
    raw = b"Content-Type: text/plain\r\n\r\nQUJDRA=\r\nRUZH\r\n"
    inside = bodies.LargeBodies(raw, large=1)
    assert inside.content(0) == inside.decode(0) == b"ABCD\x04Td"  # binascii goes on past a lone "="
    broken = bodies.LargeBodies(b"Content-Type: text/plain\r\n\r\nQUJDR\r\n", large=1)
    assert broken.content(0) is None
    assert broken.decode(0) is None
