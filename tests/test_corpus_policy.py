"""`automatic_reason` measured on real mail from other projects' test suites (read in place, never copied).

Bounces and auto-replies: sisimai's set-of-emails (162 DSNs, ARF reports and RFC 3834 replies, plus
a few messages sisimai itself marks as "not a bounce"). Human mail: talon's replies from real clients,
and the Ruby mail gem's and flanker's fixtures minus the automatic ones listed below by hand.

Envelope sender: mailgate knows MAIL FROM; these files do not say it. We derive it from an mbox
"From " line if there is one, else from the Return-Path header: Return-Path is written by the final
MTA from the envelope sender, so it is what an MTA would have told us, not a peek at the answer.
Each set is measured twice, with that envelope and with a normal-looking unknown one, to see how
far headers alone go. Floors are the figures reached when the tests were written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mailgate.admission.policy import automatic_reason
from mailgate.mail.headers import Headers, read_signals
from tests.conftest import CORPUS, needs_corpus

SISIMAI = CORPUS / "sisimai+set-of-emails"
OWN = "agents.example.com"
UNKNOWN = "unknown@example.org"

pytestmark = needs_corpus

# sisimai's own "this is not a bounce" samples: ordinary mail.
SISIMAI_HUMAN = {"maildir__not__is-not-bounce-01.eml", "maildir__not__is-not-bounce-02.eml"}

# Automatic mail in the "normal" folders, decided by reading each file.
EXPECTED_AUTOMATIC = {
    "mikel+mail": {
        # DSNs (multipart/report delivery-status)
        "spec__fixtures__emails__mime_emails__raw_email_with_mimepart_without_content_type.eml",
        "spec__fixtures__emails__multipart_report_emails__multi_address_bounce1.eml",
        "spec__fixtures__emails__multipart_report_emails__multipart_report_multiple_status.eml",
        "spec__fixtures__emails__multipart_report_emails__report_422.eml",
        "spec__fixtures__emails__multipart_report_emails__report_530.eml",
        # bulk: Precedence: junk spam; a List-Id list; a LISTSERV list (envelope owner-rrga-l@)
        "spec__fixtures__emails__error_emails__bad_date_header.eml",
        "spec__fixtures__emails__error_emails__empty_in_reply_to.eml",
        "spec__fixtures__emails__error_emails__content_transfer_encoding_x_uuencode.eml",
    },
    "mailgun+flanker": {
        # bounces, ARF complaints, a read receipt
        "tests__fixtures__messages__bounce__broken-mime.eml",
        "tests__fixtures__messages__bounce__delayed-broken.eml",
        "tests__fixtures__messages__bounce__delayed.eml",
        "tests__fixtures__messages__bounce__gmail-invalid-address.eml",
        "tests__fixtures__messages__bounce__gmail-no-dns.eml",
        "tests__fixtures__messages__bounce__mailbox-full.eml",
        "tests__fixtures__messages__bounce__no-mx.eml",
        "tests__fixtures__messages__bounce__office365.eml",
        "tests__fixtures__messages__bounce__zed.eml",
        "tests__fixtures__messages__complaints__aol.eml",
        "tests__fixtures__messages__complaints__yahoo.eml",
        "tests__fixtures__messages__disposition-notification.eml",
        # mailing-list traffic (Precedence: bulk) from the Apache new-httpd list
        "tests__fixtures__messages__apache-message-news-mime.eml",
        "tests__fixtures__messages__from-encoding.eml",
        "tests__fixtures__messages__message-external-body.eml",
        # "Bob <postmaster@example.com>": human text, but mail from the postmaster role account is
        # treated as automatic by design (it catches NDRs with unhelpful subjects, e.g. Verizon's)
        "tests__fixtures__messages__long-links.eml",
    },
    "mailgun+talon": set(),
}

# Floors (what the heuristics reached; raise them when they improve, never lower them silently).
MIN_CAUGHT_WITH_ENVELOPE = 158  # of 160 bounces, complaints and auto-replies
MIN_CAUGHT_HEADERS_ONLY = 157  # known misses: arf-22 (a free-text complaint), amazonses-12
# (an SNS notice of a *successful* delivery), and headers-only kddi-02 (Subject "Mail", only <> says bounce)


def read_headers(path: Path) -> tuple[Headers, str | None]:
    """Parse the headers of a corpus file and derive its envelope sender (None when unknown)."""
    raw = path.read_bytes()
    envelope: str | None = None
    if raw.startswith(b"From ") and not re.match(rb"From\s*:", raw):  # an mbox "From " line
        first, _, raw = raw.partition(b"\n")
        fields = first.split()
        envelope = fields[1].decode("latin-1") if len(fields) > 1 else ""
    if b"\n" not in raw and b"\r" in raw:  # CR-only line endings
        raw = raw.replace(b"\r", b"\r\n")
    msg = Headers.parse(raw)
    if envelope is None:
        for name, value in msg:
            if name.lower() == "return-path":  # the final MTA's record of MAIL FROM
                envelope = str(value).strip()
                break
    return msg, envelope


def sisimai_files() -> list[Path]:
    return sorted(SISIMAI.glob("*.eml"))


def classify(paths: list[Path], *, use_envelope: bool) -> dict[str, str | None]:
    out = {}
    for path in paths:
        msg, envelope = read_headers(path)
        sender = envelope if use_envelope and envelope is not None else UNKNOWN
        out[path.name] = automatic_reason(read_signals(msg), sender, own_domain=OWN)
    return out


def test_sisimai_file_list_matches_expectations() -> None:
    """Every sisimai file is described by the expected-results table or is a known human sample."""
    expected = json.loads((SISIMAI / "_expected" / "sisimai_expected.json").read_text())["expected"]
    names = {p.name for p in sisimai_files()}
    assert len(names) == 162
    assert set(expected) <= names
    assert names >= SISIMAI_HUMAN


@pytest.mark.parametrize(
    ("use_envelope", "floor"), [(True, MIN_CAUGHT_WITH_ENVELOPE), (False, MIN_CAUGHT_HEADERS_ONLY)]
)
def test_sisimai_bounces_and_auto_replies(use_envelope: bool, floor: int) -> None:
    """Bounces, complaints and auto-replies are caught (with the derived envelope, and headers alone)."""
    results = classify(sisimai_files(), use_envelope=use_envelope)
    automatic = {name: r for name, r in results.items() if name not in SISIMAI_HUMAN}
    missed = sorted(name for name, r in automatic.items() if r is None)
    print(
        f"\nsisimai, envelope {'derived' if use_envelope else 'unknown'}: "
        f"{len(automatic) - len(missed)}/{len(automatic)} caught; missed: {missed}"
    )
    assert len(automatic) - len(missed) >= floor, missed


@pytest.mark.parametrize("use_envelope", [True, False])
def test_sisimai_human_samples(use_envelope: bool) -> None:
    """sisimai's "not a bounce" samples are not flagged."""
    results = classify([SISIMAI / n for n in sorted(SISIMAI_HUMAN)], use_envelope=use_envelope)
    assert results == dict.fromkeys(sorted(SISIMAI_HUMAN))


@pytest.mark.parametrize("folder", sorted(EXPECTED_AUTOMATIC))
@pytest.mark.parametrize("use_envelope", [True, False])
def test_normal_mail_not_flagged(folder: str, use_envelope: bool) -> None:
    """Human mail in the other folders is never flagged (zero false positives)."""
    directory = CORPUS / folder
    if not directory.is_dir():
        pytest.skip(f"{directory} not found")
    paths = [p for p in sorted(directory.glob("*.eml")) if p.name not in EXPECTED_AUTOMATIC[folder]]
    flagged = {name: r for name, r in classify(paths, use_envelope=use_envelope).items() if r is not None}
    print(
        f"\n{folder}, envelope {'derived' if use_envelope else 'unknown'}: "
        f"{len(flagged)}/{len(paths)} human messages flagged: {flagged}"
    )
    assert flagged == {}


@pytest.mark.parametrize("folder", sorted(EXPECTED_AUTOMATIC))
def test_listed_automatic_mail_flagged(folder: str) -> None:
    """The bounces, complaints and list mail listed by hand in those folders are all caught."""
    directory = CORPUS / folder
    if not directory.is_dir():
        pytest.skip(f"{directory} not found")
    paths = [directory / name for name in sorted(EXPECTED_AUTOMATIC[folder])]
    missing = [p.name for p in paths if not p.is_file()]
    assert missing == []
    results = classify(paths, use_envelope=True)
    print(f"\n{folder}: {results}")
    assert [name for name, r in results.items() if r is None] == []
