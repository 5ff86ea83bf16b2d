"""Quotes found by the HTML structure mail clients write (mail.html_quotes), end to end through parsing.

The fixtures in tests/data/quote-*.eml are HTML-only replies written for these tests from each client's
quote markup. inscriptis indents nested blocks, so texts are compared line by line without indentation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.mail.html_quotes import MAX_HTML_CHARS, split_html_reply
from mailgate.mail.parse import html_to_text, parse_message
from mailgate.mail.trimming import trim_reply

DATA = Path(__file__).parent / "data"
THANKS, MARCH = "Thanks, the numbers look right.", "Please add the March column."
SPASIBO, MART = "Спасибо, цифры верные.", "Добавьте, пожалуйста, столбец за март."
EXPECTED = {
    "gmail": [THANKS, MARCH, "", "Ann"],
    "apple-mail": [THANKS, MARCH],
    "ios-mail": [THANKS, MARCH],
    "thunderbird": [THANKS, "", MARCH],
    "outlook-web": [THANKS, MARCH],
    "outlook-desktop": [THANKS, "", MARCH],
    "outlook-mac": [THANKS, MARCH],
    "hotmail": [THANKS, MARCH],
    "yahoo": [THANKS, MARCH],
    "yandex": [SPASIBO, MART],
    "mail.ru": [SPASIBO, MART],
    "protonmail": [THANKS, MARCH],
    "zimbra": [THANKS, MARCH],
}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _html(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[1].decode("utf-8")


def _reply(html: str) -> str:
    head = (
        "From: Ann <ann@example.org>\r\nTo: research@agents.example.com\r\nSubject: Re: x\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return parse_message((head + html).encode()).reply_text


@pytest.mark.parametrize("client", list(EXPECTED))
def test_client_quote_markup_is_cut(client: str) -> None:
    """Each client's HTML-only reply comes out as the sender's own text: quote and attribution are gone."""
    raw = (DATA / f"quote-{client}.eml").read_bytes()
    own = split_html_reply(_html(raw))
    assert own is not None
    own_text = html_to_text(own)
    assert "Revenue grew 4%" not in own_text
    assert "research@agents.example.com" not in own_text
    mail = parse_message(raw)
    assert _lines(mail.reply_text) == EXPECTED[client]
    assert "Revenue grew 4%." in mail.text  # the whole body is still there, for context


def test_structure_finds_what_the_text_rules_cannot() -> None:
    """A Greek Gmail attribution and Greek Outlook headers mean nothing to the text rules; the markup does."""
    gmail = (
        '<div dir="ltr">Ευχαριστώ!</div><div class="gmail_quote"><div class="gmail_attr">'
        "Στις Δευ 2 Ιουν 2025 στις 6:26 μ.μ., ο χρήστης Research &lt;r@example.com&gt; έγραψε:<br></div>"
        '<blockquote class="gmail_quote">Here is the summary.</blockquote></div>'
    )
    outlook = (
        '<div>Ευχαριστώ!</div><hr tabindex="-1"><div id="divRplyFwdMsg"><b>Από:</b> Research<br>'
        "<b>Στάλθηκε:</b> Δευτέρα<br><b>Θέμα:</b> Αριθμοί</div><div>Here is the summary.</div>"
    )
    for html in (gmail, outlook):
        assert "Here is the summary." in trim_reply(html_to_text(html))
        assert _lines(_reply(html)) == ["Ευχαριστώ!"]


@pytest.mark.parametrize(
    "html",
    [
        "<p>Hello, no quote here.</p>",
        '<div>My list:</div><blockquote style="margin:0 0 0 40px">one<br>two</blockquote><div>Done.</div>',
        "<style>blockquote { color: red }</style><p>Styled, but no quote.</p>",
        "",
        "plain text that came as text/html",
        "<div class=\"gmail_signature\">Ann</div><!-- blockquote type='cite' -->",
    ],
    ids=["no-markup", "indented-list", "css-only", "empty", "no-tags", "comment-only"],
)
def test_no_quote_markup_gives_none(html: str) -> None:
    """Without client quote markup (a plain indenting blockquote is not one) the text rules decide."""
    assert split_html_reply(html) is None


def test_plain_blockquote_after_an_attribution_is_a_quote() -> None:
    """A plain <blockquote> counts when an attribution line stands right before it (Yandex, Roundcube...)."""
    html = (
        "<p>See you then.</p><p>On Mon, 2 Jun 2025 at 18:26, Bob &lt;bob@example.com&gt; wrote:</p>"
        "<blockquote>Lunch at one?</blockquote>"
    )
    assert _lines(html_to_text(split_html_reply(html) or "")) == ["See you then."]


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        (
            '<div class="moz-cite-prefix">On 02/06/2025 18:26, Ann wrote:<br></div>'
            '<blockquote type="cite"><p>Shall we meet on Monday?</p></blockquote><p>Yes, at ten.</p>'
            '<blockquote type="cite"><p>Bring the report?</p><p>The long one.</p></blockquote><p>I will.</p>'
            '<blockquote type="cite"><p>Ann</p></blockquote>',
            [
                "> Shall we meet on Monday?",
                "",
                "Yes, at ten.",
                "",
                "> Bring the report?",
                "> The long one.",
                "",
                "I will.",
            ],
        ),
        (
            '<div dir="ltr">Hi Ann, answers inline.</div><div class="gmail_quote"><div class="gmail_attr">'
            "On Mon, Jun 2, 2025 at 6:26 PM Ann &lt;ann@example.org&gt; wrote:<br></div>"
            '<blockquote class="gmail_quote">Monday?</blockquote><div>Yes.</div>'
            '<blockquote class="gmail_quote">The report?</blockquote><div>Attached.</div></div>',
            ["Hi Ann, answers inline.", "> Monday?", "Yes.", "> The report?", "Attached."],
        ),
        (
            '<div><blockquote type="cite"><div>On 2 Jun 2025, at 18:26, Ann &lt;ann@example.org&gt; wrote:'
            "</div><div>Lunch at one?</div></blockquote></div><div>Yes, see you there.</div>",
            ["Yes, see you there."],
        ),
    ],
    ids=["thunderbird-inline", "gmail-inline", "apple-bottom-post"],
)
def test_answers_below_or_between_quotes_keep_what_they_answer(html: str, expected: list[str]) -> None:
    """Inline answers keep the quoted lines they answer as "> " lines; a bottom-post keeps what is below."""
    assert _lines(_reply(html)) == expected


def test_gmail_forward_is_cut_at_its_banner() -> None:
    """A forward's banner inside gmail_quote ends the sender's text; the forwarded body stays in `text`."""
    html = (
        '<div dir="ltr">FYI, see below.</div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">'
        "---------- Forwarded message ---------<br>From: <strong>Bob</strong> &lt;bob@example.com&gt;<br>"
        "Date: Mon, Jun 2, 2025 at 6:26 PM<br>Subject: Plans<br></div><br>"
        "<div>The forwarded plans.</div></div>"
    )
    assert _lines(html_to_text(split_html_reply(html) or "")) == ["FYI, see below."]
    assert _lines(_reply(html)) == ["FYI, see below."]


def test_html_root_of_multipart_related_is_read() -> None:
    """An Outlook reply with an inline image (multipart/related, HTML root) is split by its markup too."""
    raw = (
        b"From: Ann <ann@example.org>\r\nTo: research@agents.example.com\r\nSubject: Re: x\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b'<div>See the chart.</div><div id="appendonsend"></div><hr><div id="divRplyFwdMsg"><b>From:</b> R'
        b"<br><b>Sent:</b> Monday</div><div>Old text.</div>\r\n"
        b"--b1\r\nContent-Type: image/png\r\nContent-ID: <c1>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"iVBORw0KGgo=\r\n--b1--\r\n"
    )
    mail = parse_message(raw)
    assert _lines(mail.reply_text) == ["See the chart."]
    assert "Old text." in mail.text


def test_reply_with_only_a_quote_keeps_the_whole_text() -> None:
    """Markup with nothing before the quote falls back to the text rules, which keep the text in doubt."""
    html = '<div class="gmail_quote"><blockquote class="gmail_quote">Old text.</blockquote></div>'
    assert _lines(_reply(html)) == ["Old text."]


@pytest.mark.parametrize(
    "html",
    [
        "<div>" * 20_000 + "deep" + '<blockquote type="cite">q</blockquote>' + "</div>" * 20_000,
        "<p>x</p>" * 300_000 + '<blockquote type="cite">beyond the cap</blockquote>',
        "<p>x</p>" * 100_000 + '<blockquote type="cite">too many elements before it</blockquote>',
        "<blockquote>" * 5_000 + "On Mon, 2 Jun 2025 at 18:26, Bob <b@x.org> wrote:" * 3,
        "<div><blockquote type=cite><p>unclosed" + "\x00\x01<<<>>>" * 1000,
    ],
    ids=["deep-nesting", "beyond-the-cap", "many-elements", "nested-plain-blockquotes", "broken"],
)
def test_hostile_html_is_bounded(html: str) -> None:
    """Deep, huge and broken markup never raises and never reads past MAX_HTML_CHARS."""
    result = split_html_reply(html)
    assert result is None or isinstance(result, str)
    if len(html) > MAX_HTML_CHARS:
        assert result is None  # the only quote lies beyond the part that is read
