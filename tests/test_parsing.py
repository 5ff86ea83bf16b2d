"""parse_message and the header toolkit: headers, bodies, attachments and file names, on made-up mail."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from mailgate.mail.headers import Headers, msgid_list
from mailgate.mail.parse import _safe_filename, html_to_text, parse_message
from mailgate.models import Address

DATA = Path(__file__).resolve().parent / "data"


def _mail(headers: str, body: str = "hello\n") -> bytes:
    return (headers.strip("\n") + "\n\n" + body).encode("utf-8")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@x> <b@y>", ("<a@x>", "<b@y>")),
        ("<a@x>\r\n\t<b@y>", ("<a@x>", "<b@y>")),
        ("<a@x> <a@x>", ("<a@x>",)),
        ("a@x", ("<a@x>",)),
        ("<a@x> (Bob's message of Monday)", ("<a@x>",)),
        ("junk", ()),
        ("", ()),
        (None, ()),
    ],
)
def test_msgid_list(value: str | None, expected: tuple[str, ...]) -> None:
    """Ids come out in "<...>" form, in order, deduplicated; missing brackets and junk are tolerated."""
    assert msgid_list(value) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("To: Bob <Bob@Example.COM>", (Address("bob@example.com", "Bob"),)),
        ("To: =?utf-8?q?J=C3=BCrgen?= <j@x.de>, a@b.c", (Address("j@x.de", "Jürgen"), Address("a@b.c"))),
        ("To: undisclosed-recipients:;", ()),
        ("To: garbage, <ok@x.org>", (Address("ok@x.org"),)),
        ('To: "Smith, J" <j@x.org>, j@x.org', (Address("j@x.org", "Smith, J"),)),
        ("To: <a\u202eb@example.org>, ok@example.org", (Address("ok@example.org"),)),
    ],
)
def test_address_list(header: str, expected: tuple[Address, ...]) -> None:
    """Addresses are lower-cased and deduplicated, names decoded, garbage (and an address with a bidi
    control, which would reach a reply's Cc) skipped."""
    assert Headers.parse(_mail(header)).addresses("to") == expected


def test_headers_stop_at_the_body() -> None:
    """Headers.parse reads the header block and decodes on request; the body is not a header."""
    headers = Headers.parse(_mail("From: a@b.c\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "X-Not: a header"))
    assert headers.text("subject") == "Grüße"
    assert headers.values("x-not") == []


def test_html_to_text_keeps_links() -> None:
    """HTML becomes readable text; a link keeps its URL."""
    text = html_to_text('<p>Hi <a href="https://example.org/a">there</a></p><ul><li>one</li></ul>')
    assert "https://example.org/a" in text
    assert "there" in text
    assert "one" in text
    assert "<" not in text


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"From: a@b.c\r\nSubject: x\r\n\r\nCRLF body\r\n", "CRLF body"),
        (b"From: a@b.c\rSubject: x\r\rCR body\r", "CR body"),
        (b"From someone Mon Jan 1 00:00:00 2024\nFrom: a@b.c\nSubject: x\n\nmbox body\n", "mbox body"),
        (
            b"From: a@b.c\nContent-Type: text/plain; charset=klingon\n\nunknown charset \xc3\xa9\n",
            "unknown charset é",
        ),
        (b"From: a@b.c\nContent-Type: text/plain; charset=utf-8\n\nbad \xff bytes\n", "bad \ufffd bytes"),
        (b"From: a@b.c\nContent-Type: text/plain\n\nlatin1 caf\xe9\n", "latin1 café"),
        (b"From: a@b.c\nContent-Type: text/html\n\n<p>only <b>html</b></p>", "only html"),
        (
            b"From: a@b.c\nContent-Type: multipart/mixed; boundary=zz\n\n--zz\n\nno end boundary\n",
            "no end boundary",
        ),
        (b"", ""),
        (b"\x00\x01\x02 not mail", ""),
    ],
    ids=[
        "crlf",
        "cr-only",
        "mbox",
        "unknown-charset",
        "bad-utf8",
        "latin1",
        "html-only",
        "no-boundary",
        "empty",
        "binary",
    ],
)
def test_bodies_degrade_gracefully(raw: bytes, text: str) -> None:
    """Odd line endings, charsets and MIME structure still give the visible text, never an exception."""
    mail = parse_message(raw)
    assert mail.text.strip() == text or text in mail.text


def test_headers_of_a_made_up_reply() -> None:
    """Ids, subject, addresses and the HTML fallback come out of a message with odd headers."""
    mail = parse_message((DATA / "parse-filenames.eml").read_bytes())
    assert mail.message_id == "<files-1@example.de>"
    assert mail.in_reply_to == ("<b@x>",)
    assert mail.references == ("<a@x>", "<b@x>")
    assert mail.subject == "Aw: Re: Fwd: Berücht [Q3]"
    assert mail.from_ == Address("juergen@example.de", "Jürgen Müller")
    assert [a.addr for a in mail.to] == ["research@mailgate.example", "other@example.org"]
    assert mail.cc == ()
    assert mail.text == "Only HTML with a [link](https://example.org/x)"


def test_attachments_are_named_safely() -> None:
    """RFC 2231/2047 names decode; paths, duplicates and empty files go; unnamed files get a name."""
    mail = parse_message((DATA / "parse-filenames.eml").read_bytes())
    assert [(a.filename, a.content_type, a.size) for a in mail.attachments] == [
        ("logo.png", "image/png", 8),
        ("Grüße und Bericht.pdf", "application/pdf", 9),
        ("passwd.pdf", "application/pdf", 9),
        ("attachment-4.jpg", "image/jpeg", 6),
        ("x.txt", "text/plain", 10),
        ("Inner note.eml", "message/rfc822", 89),
    ]
    assert mail.unreadable == ()


def test_winmail_dat_is_unpacked() -> None:
    """An Outlook winmail.dat becomes the files it wraps; the Outlook quote is trimmed from the reply."""
    mail = parse_message((DATA / "parse-winmail.eml").read_bytes())
    assert [(a.filename, a.data) for a in mail.attachments] == [
        ("report.txt", b"quarterly numbers: 1, 2, 3\n"),
        ("notes.csv", b"a,b\n1,2\n"),
    ]
    assert mail.reply_text == "Please summarise the attached report."


def test_broken_winmail_dat_is_kept_as_is() -> None:
    """A winmail.dat that is not TNEF stays one file instead of failing the message."""
    mail = parse_message((DATA / "parse-winmail-broken.eml").read_bytes())
    assert [(a.filename, a.data) for a in mail.attachments] == [("winmail.dat", b"not a tnef stream at all")]


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename="C:\\\\Users\\\\x\\\\evil.exe"', "evil.exe"),
        ('attachment; filename=".bashrc"', "bashrc"),
        ('attachment; filename="a\x01b.txt"', "ab.txt"),
        ('attachment; filename="   "', "attachment-1.pdf"),
        ('attachment; filename="' + "é" * 200 + '.pdf"', "é" * 73 + ".pdf"),
        ("attachment; filename*=utf-8''caf%C3%A9.pdf", "café.pdf"),
        ('attachment; filename="=?iso-8859-1?q?caf=E9?=.pdf"', "café.pdf"),
    ],
    ids=["traversal", "windows-path", "dotfile", "control", "blank", "long", "rfc2231", "rfc2047"],
)
def test_filename_sanitising(disposition: str, expected: str) -> None:
    """File names lose paths, leading dots and control characters, and stay within 150 UTF-8 bytes."""
    raw = _mail(
        "From: a@b.c\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b",
        f"--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: application/pdf\n"
        f"Content-Disposition: {disposition}\nContent-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n",
    )
    (att,) = parse_message(raw).attachments
    assert att.filename == expected
    assert len(att.filename.encode()) <= 150


@pytest.mark.parametrize(
    ("name", "expected"),
    [(b"caf\xc3\xa9 r\xc3\xa9sum\xc3\xa9.pdf", "café résumé.pdf"), (b"caf\xe9.pdf", "café.pdf")],
    ids=["utf-8", "cp1252"],
)
def test_raw_8bit_file_names_are_decoded(name: bytes, expected: str) -> None:
    """A file name written as raw 8-bit bytes (no RFC 2231/2047) comes out as text, UTF-8 or cp1252."""
    head = b"From: a@b.c\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
    raw = head + (
        b"--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: application/pdf\n"
        b'Content-Disposition: attachment; filename="' + name + b'"\n'
        b"Content-Transfer-Encoding: base64\n\nJVBERi0xLjQK\n--b--\n"
    )
    (att,) = parse_message(raw).attachments
    assert att.filename == expected


def test_a_lone_surrogate_in_a_file_name_is_replaced() -> None:
    """A lone surrogate that reached the file-name cleaner anyway is U+FFFD: the name stays encodable."""
    name = _safe_filename("caf\udce9.pdf", "application/pdf", 1)
    assert name == "caf\ufffd.pdf" and name.encode() == "caf\ufffd.pdf".encode()


def test_broken_base64_is_reported_unreadable() -> None:
    """A file whose base64 cannot be decoded is listed as unreadable, not passed on as garbage."""
    raw = _mail(
        "From: a@b.c\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b",
        "--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: application/pdf\n"
        'Content-Disposition: attachment; filename="x.pdf"\n'
        "Content-Transfer-Encoding: base64\n\nJVBER\n--b--\n",
    )
    mail = parse_message(raw)
    assert mail.attachments == ()
    assert [name for name, _ in mail.unreadable] == ["x.pdf"]


def test_large_message_with_five_big_files() -> None:
    """A ~40 MB message with 5 x 6 MB base64 files parses into five intact files."""
    blobs = [os.urandom(6 * 1024 * 1024) for _ in range(5)]
    parts = [
        f"--b\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Disposition: attachment; filename=f{i}.bin\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{base64.encodebytes(blob).decode()}"
        for i, blob in enumerate(blobs)
    ]
    raw = (
        "From: a@b.c\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
        "--b\r\nContent-Type: text/plain\r\n\r\nsee files\r\n" + "\r\n".join(parts) + "\r\n--b--\r\n"
    ).encode()
    del parts
    mail = parse_message(raw)
    assert [a.filename for a in mail.attachments] == [f"f{i}.bin" for i in range(5)]
    assert [a.data for a in mail.attachments] == blobs
    assert mail.text == "see files"
