"""Big parts on the wire (replies/wire.py) and the cut of a long answer (render.inline_answer): pure."""

from __future__ import annotations

import base64
import email
from email.message import EmailMessage
from email.policy import SMTP, default

import pytest

from mailgate.models import ReplyHeaders
from mailgate.replies import wire
from mailgate.replies.render import Renderer, inline_answer
from mailgate.sandbox import long_answer

LATIN = "A café in Lyon reported the same figures twice, so the totals below remove the duplicate. " * 2


def through_a_parser(part: wire.EncodedPart) -> tuple[bytes, str]:
    """`part` attached to a small message and flattened: (the bytes, the attachment as a parser reads it)."""
    msg = EmailMessage()
    msg["Subject"] = "x"
    msg.set_content("body\n")
    msg.add_attachment(b"", maintype="text", subtype="markdown", filename=part.filename)
    *_, mime = msg.iter_parts()
    mime.set_param("charset", "utf-8")
    mime.replace_header("Content-Transfer-Encoding", part.cte)
    mime.set_payload(part.marker)
    skeleton = msg.as_bytes(policy=SMTP)
    size = wire.wire_size(skeleton, [part])
    data = wire.flatten(skeleton, [part])
    assert len(data) == size
    [attachment] = email.message_from_bytes(data, policy=default).iter_attachments()
    return data, str(attachment.get_content()).replace("\r\n", "\n")


@pytest.mark.parametrize(
    ("text", "eight_bit", "cte"),
    [
        ("plain ascii\nlines\n" * 1000, False, "7bit"),
        ((LATIN + "\n") * 1000, True, "8bit"),
        ((LATIN + "\n") * 1000, False, "quoted-printable"),  # mostly ASCII, and the path is 7-bit
        (("°±×«» " * 30 + "\n") * 1000, False, "base64"),  # mostly not
        (("x" * 2000 + " é\n") * 100, True, "quoted-printable"),  # lines over 998 octets
        ("a\0b\n", True, "quoted-printable"),  # NUL is never allowed in 8bit
        ("日本語のテキスト。" * 50000, True, "base64"),  # one 1.35 MB line of 3-byte characters
        ("日本語のテキスト。\n" * 20000, False, "base64"),
    ],
)
def test_text_takes_the_smallest_encoding_allowed(text: str, eight_bit: bool, cte: str) -> None:
    """7bit/8bit where lines fit and the path allows, else the smaller of QP and base64; the parser
    reads back the same text (line ends as LF), lines stay within 998 octets, and the size is exact."""
    chosen, chunks = wire.encode_text(text, eight_bit=eight_bit)
    assert chosen == cte
    data, back = through_a_parser(wire.EncodedPart("answer.md", "text/markdown", chosen, chunks, "utf-8"))
    assert back == text.replace("\r\n", "\n")
    assert max(map(len, data.split(b"\r\n"))) <= wire.MAX_LINE
    if cte in ("quoted-printable", "base64"):
        assert data.isascii()


def test_line_ends_become_crlf_and_slices_join_cleanly() -> None:
    """CRLF, CR and LF all end lines; a CRLF pair split by a slice boundary stays one line end; a line
    longer than a slice is continued with a soft break."""
    text = "x" * (wire.SLICE - 1) + "\r\n" + "y\rz\n" + "w" * (2 * wire.SLICE) + "\nend"
    cte, chunks = wire.encode_text(text, eight_bit=True)
    assert cte == "quoted-printable"
    _, back = through_a_parser(wire.EncodedPart("a.md", "text/markdown", cte, chunks, "utf-8"))
    assert back == "x" * (wire.SLICE - 1) + "\ny\nz\n" + "w" * (2 * wire.SLICE) + "\nend"


def test_a_10_mb_answer_goes_8bit_in_slices() -> None:
    """The sandbox's 10 MB answer (lines < 400 bytes, Latin-1 characters) is 8bit, in slices of at
    most SLICE bytes plus their CRs, ~1.7% larger than the text."""
    text = long_answer("tsk_1", 0, 10_000_000)
    cte, chunks = wire.encode_text(text, eight_bit=True)
    assert cte == "8bit"
    assert max(map(len, chunks)) <= 2 * wire.SLICE
    assert b"".join(chunks) == text.encode().replace(b"\n", b"\r\n")


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 1000, 57 * 4600 + 7])
def test_base64_is_the_usual_encoding_and_its_size_is_known(size: int) -> None:
    """encode_bytes gives base64.encodebytes with CRLF line ends, and base64_size its length."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    encoded = b"".join(wire.encode_bytes(data))
    assert encoded == base64.encodebytes(data).replace(b"\n", b"\r\n")
    assert wire.base64_size(size) == len(encoded)


def test_flatten_needs_every_marker() -> None:
    """A part whose marker is not in the message is an error, not a silently smaller message."""
    with pytest.raises(ValueError, match="no marker"):
        wire.flatten(b"From: a\r\n\r\nbody\r\n", [wire.EncodedPart("a.bin", "application/pdf", "base64", [])])


def test_a_long_answer_is_cut_at_a_paragraph_end() -> None:
    """Over the limit, the body shows the answer's beginning up to a paragraph end, within the limit."""
    text = long_answer("tsk_1", 0, 1_000_000)
    inline = inline_answer(text, 65536)
    assert inline.cut and inline.total == 1_000_000
    assert 65536 * 3 // 4 <= inline.shown <= 65536
    assert text.startswith(inline.text)
    assert text[len(inline.text) : len(inline.text) + 2] == "\n\n"
    whole = inline_answer("Short answer.\n", 65536)
    assert not whole.cut and whole.text == "Short answer." and whole.total == 14


def test_the_renderer_says_where_the_rest_of_a_cut_answer_is() -> None:
    """The body of a cut answer names its size, what it shows, and the attachment holding the rest;
    without one, the task page."""
    headers = ReplyHeaders(
        "research@gate.example", "research", ["alice@example.org"], [], "research+t@gate.example",
        "Numbers", "<r.1@gate.example>", None, [], "gate.example",
    )  # fmt: skip
    inline = inline_answer("word " * 100_000, 10_000)
    part = wire.EncodedPart("answer.md", "text/markdown", "7bit", [b"x\r\n"], "utf-8")
    renderer = Renderer()
    msg = renderer.answer(
        headers, answer_markdown=inline, sources=[], task_url="https://h.example/t/1", attached=[part],
        whole_answer="answer.md",
    )  # fmt: skip
    text = str(msg.get_body(preferencelist=("plain",)).get_content())
    assert text.startswith("[This answer is 488 KB, too long for an email: below are its first 9 KB.")
    assert "The whole answer is attached as answer.md." in text
    assert part.marker in msg.as_string()
    msg = renderer.answer(headers, answer_markdown=inline, sources=[], task_url="https://h.example/t/1")
    text = str(msg.get_body(preferencelist=("plain",)).get_content())
    assert "The whole answer is on the task page: https://h.example/t/1" in text
