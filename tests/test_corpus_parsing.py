"""Every real-world message in the shared corpus parses, quickly, into clean fields; known files come out."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mailgate.mail.parse import parse_message
from tests.conftest import CORPUS, needs_corpus

FOLDERS = ("mikel+mail", "mailgun+flanker", "mailgun+talon", "sisimai+set-of-emails")
_BAD_HEADER_CHARS = re.compile(r"[\r\n\x00]")

pytestmark = needs_corpus


def _messages() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return [
        f
        for folder in FOLDERS
        for f in sorted((CORPUS / folder).iterdir())
        if f.is_file() and f.name != "LICENSE"
    ]


@pytest.mark.parametrize("path", _messages(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_message_parses_cleanly(path: Path) -> None:
    """The message parses without an exception, within a bound, into str fields without CR/LF in headers."""
    started = time.perf_counter()
    mail = parse_message(path.read_bytes())
    assert time.perf_counter() - started < 5
    assert isinstance(mail.text, str)
    assert isinstance(mail.reply_text, str)
    assert not _BAD_HEADER_CHARS.search(mail.subject)
    addresses = [*mail.to, *mail.cc, *([mail.from_] if mail.from_ else [])]
    for address in addresses:
        assert not _BAD_HEADER_CHARS.search(address.addr + address.name)
        assert address.addr == address.addr.lower()
    for ident in (mail.message_id or "<x>", *mail.in_reply_to, *mail.references):
        assert ident.startswith("<")
        assert ident.endswith(">")
    for att in mail.attachments:
        assert att.size > 0
        assert "/" not in att.filename
        assert "\\" not in att.filename
        assert not att.filename.startswith(".")
        assert len(att.filename.encode()) <= 150
    assert len({a.data for a in mail.attachments}) == len(mail.attachments)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_pdf.eml",
            [("broken.pdf", "application/pdf", 1026)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_pdf_lf.eml",
            [("broken.pdf", "application/pdf", 1026)],
        ),
        (
            "mailgun+flanker/tests__fixtures__messages__attached-pdf.eml",
            [("test.pdf", "application/pdf", 6940)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_message_rfc822.eml",
            [("ForwardedMessage.eml", "message/rfc822", 3668)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_nonascii_filename.eml",
            [("ciële.txt", "text/plain", 11)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_with_quoted_filename.eml",
            [("Eelanalüüsi päring.jpg", "image/jpeg", 1952)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_content_location.eml",
            [("Photo25.jpg", "image/jpeg", 227)],
        ),
        (
            "mikel+mail/spec__fixtures__emails__multi_charset__japanese_attachment_long_name.eml",
            [("かきくけこかきくけこかきくけこかきくけこかきくけこ.txt", "text/plain", 18)],
        ),
        (
            "mailgun+flanker/tests__fixtures__messages__russian-attachment-yahoo.eml",
            [
                (
                    "Картинка с очень, очень длинным предлинным именем преименем таким чт\ufffd",
                    "image/png",
                    178213,
                )
            ],
        ),
        (
            "sisimai+set-of-emails/maildir__bsd__lhost-amazonworkmail-01.eml",
            [("Nyaaaaan.eml", "message/rfc822", 1308), ("winmail.dat", "application/ms-tnef", 3441)],
        ),
    ],
    ids=lambda v: v.rsplit("__", 1)[-1] if isinstance(v, str) else "",
)
def test_known_attachments(name: str, expected: list[tuple[str, str, int]]) -> None:
    """Files checked by hand come out with their names, types and sizes (a TNEF without files stays whole)."""
    mail = parse_message((CORPUS / name).read_bytes())
    assert [(a.filename, a.content_type, a.size) for a in mail.attachments] == expected
    assert mail.unreadable == ()


def test_rfc822_attachment_is_the_forwarded_message() -> None:
    """An attached message is handed on as an .eml that itself parses."""
    mail = parse_message(
        (
            CORPUS / "mikel+mail/spec__fixtures__emails__attachment_emails__attachment_message_rfc822.eml"
        ).read_bytes()
    )
    (eml,) = mail.attachments
    inner = parse_message(eml.data)
    assert inner.subject
    assert inner.from_ is not None
