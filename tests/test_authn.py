"""Sender authentication: Authentication-Results (RFC 8601), DKIM with our own keys, trusting From."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailgate.admission.authn import (
    AuthVerdict,
    aligned,
    parse_authentication_results,
    trust_from_header,
    verify_dkim,
    verify_dmarc_results,
)
from mailgate.mail.headers import Headers, read_signals
from mailgate.models import HeaderSignals

DATA = Path(__file__).parent / "data"
OURS = "mx.agents.example.com"


def headers(text: str) -> HeaderSignals:
    raw = text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n\r\nbody\r\n"
    return read_signals(Headers.parse(raw))


def with_ar(*results: str, from_: str = "Ann <ann@example.com>") -> HeaderSignals:
    lines = [f"Authentication-Results: {r}" for r in results]
    return headers("\n".join([*lines, f"From: {from_}", "Subject: hi"]))


# --- Authentication-Results --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "sender"),
    [
        ([f"{OURS}; dmarc=pass header.from=example.com"], "ann@example.com"),
        ([f"{OURS}; dmarc=pass"], None),  # a pass about no named domain proves nothing about this From
        ([f"{OURS.upper()}; DMARC=Pass header.from=EXAMPLE.COM"], "ann@example.com"),
        ([f"{OURS} 1; dmarc=pass (p=none dis=none) header.from=example.com"], "ann@example.com"),
        ([f"{OURS}; dkim=pass header.d=example.com header.s=s1"], "ann@example.com"),
        ([f"{OURS}; dkim=pass header.i=@mail.example.com"], "ann@example.com"),
        ([f"{OURS}; spf=pass smtp.mailfrom=bounce@example.com"], "ann@example.com"),
        ([f"{OURS}; spf=pass smtp.mailfrom=mail.example.com"], "ann@example.com"),
        ([f"{OURS}; dmarc=none; dkim=pass header.d=example.com"], "ann@example.com"),
        ([f"{OURS}; dmarc=fail header.from=example.com"], None),
        ([f"{OURS}; dmarc=fail header.from=example.com; dkim=pass header.d=example.com"], None),
        ([f"{OURS}; dmarc=temperror header.from=example.com"], None),
        ([f"{OURS}; dmarc=pass header.from=other.example"], None),
        ([f"{OURS}; dkim=pass header.d=attacker.example"], None),
        ([f"{OURS}; dkim=pass header.d=com"], None),
        ([f"{OURS}; dkim=fail header.d=example.com"], None),
        ([f"{OURS}; spf=pass smtp.mailfrom=attacker.example"], None),
        ([f"{OURS}; spf=pass smtp.helo=example.com"], None),
        ([f"{OURS}; none"], None),
        (["mx.other.example; dmarc=pass header.from=example.com"], None),
        ([], None),
    ],
)
def test_dmarc_results(results: list[str], sender: str | None) -> None:
    """The trusted header's results authenticate exactly the aligned passes."""
    assert verify_dmarc_results(with_ar(*results), authserv_id=OURS).sender == sender


@pytest.mark.parametrize(
    "results",
    [
        [
            "mx.attacker.example; dmarc=pass header.from=example.com",
            f"{OURS}; dmarc=fail header.from=example.com",
        ],
        [f"{OURS}; dmarc=fail header.from=example.com", "mx.attacker.example; dmarc=pass"],
        [f"{OURS}; dmarc=fail header.from=example.com", f"{OURS}; dmarc=pass header.from=example.com"],
        ["mx.attacker.example; dkim=pass header.d=example.com", f"{OURS}; none"],
    ],
)
def test_forged_headers_ignored(results: list[str]) -> None:
    """Headers with another authserv-id count for nothing; a failing DMARC verdict of ours wins."""
    verdict = verify_dmarc_results(with_ar(*results), authserv_id=OURS)
    assert verdict == AuthVerdict(None, "DMARC did not pass for example.com")


def test_forged_ours_below_real_pass() -> None:
    """A forged header with another id above a real pass does not spoil the pass."""
    msg = with_ar("mx.attacker.example; dmarc=fail", f"{OURS}; dmarc=pass header.from=example.com")
    assert verify_dmarc_results(msg, authserv_id=OURS).sender == "ann@example.com"


def test_spoofed_file() -> None:
    """The spoofed CEO mail (forged passes above and below a real dmarc=fail) is refused."""
    raw = (DATA / "policy-spoofed-dmarc.eml").read_bytes()
    msg = read_signals(Headers.parse(raw))
    verdict = verify_dmarc_results(msg, authserv_id=OURS)
    assert verdict.sender is None
    assert verdict.reason == "DMARC did not pass for example.com"


@pytest.mark.parametrize(
    "value",
    [
        f"{OURS};\r\n\tdkim=pass (2048-bit key; unprotected) header.d=example.com header.i=@example.com"
        ' header.b="Ab;cD"',
        f'{OURS} (Postfix (2.1); "quoted") ; dkim/1 = pass reason="good (really); fine" header.d=example.com',
        f"(comment first) {OURS}; dkim=pass header.d=(the signer) example.com",
    ],
)
def test_parse_robustly(value: str) -> None:
    """Comments, quoted strings with ';', folding, versions and CFWS around '=' all parse."""
    parsed = parse_authentication_results(value)
    assert parsed is not None
    authserv_id, results = parsed
    assert authserv_id == OURS
    assert [(r.method, r.result, r.properties["header.d"]) for r in results] == [
        ("dkim", "pass", "example.com")
    ]


def test_parse_none() -> None:
    """`authserv-id; none` has an id and no results."""
    assert parse_authentication_results(f"{OURS}; none") == (OURS, [])


@pytest.mark.parametrize(
    ("from_", "reason"),
    [
        ("Ann <ann@example.com>, Bob <bob@example.com>", "several From addresses"),
        ("undisclosed", "no usable From address"),
        ("Ann <ann@>", "no usable From address"),
    ],
)
def test_unusable_from(from_: str, reason: str) -> None:
    """Several or broken From addresses are never authenticated, even with a DMARC pass."""
    msg = with_ar(f"{OURS}; dmarc=pass", from_=from_)
    assert verify_dmarc_results(msg, authserv_id=OURS) == AuthVerdict(None, reason)


def test_two_from_headers() -> None:
    """Two From header fields count as several From addresses."""
    msg = headers(f"Authentication-Results: {OURS}; dmarc=pass\nFrom: a@example.com\nFrom: b@example.com")
    assert verify_dmarc_results(msg, authserv_id=OURS).reason == "several From addresses"


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "Mail.Example.COM.", True),
        ("a.example.com", "example.com", True),
        ("example.com", "example.org", False),
        ("example.com", "com", False),
        ("example.co.uk", "co.uk", False),
        ("notexample.com", "example.com", False),
        ("", "example.com", False),
    ],
)
def test_aligned(a: str, b: str, expected: bool) -> None:
    """Relaxed alignment: equal or sub-domain, never via a public suffix."""
    assert aligned(a, b) is expected


# --- trusting From -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_", "sender"),
    [
        ("Ann Example <Ann@Example.COM>", "ann@example.com"),
        ('"Doe, J." <j.doe@sub.example.com>', "j.doe@sub.example.com"),
        ("a@example.com, b@example.com", None),
        ("not an address", None),
    ],
)
def test_trust_from_header(from_: str, sender: str | None) -> None:
    """MAILGATE_AUTH=none takes the single well-formed From address, lower-cased."""
    assert trust_from_header(headers(f"From: {from_}")).sender == sender


def test_from_addresses_missing() -> None:
    """No From header at all gives None."""
    assert headers("Subject: x").from_addresses is None


# --- DKIM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> tuple[bytes, bytes]:
    """A fresh 2048-bit RSA key: (PKCS#1 PEM private key, DKIM TXT record)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


MESSAGE = (
    b"From: Ann <ann@example.com>\r\nTo: research@agents.example.com\r\nSubject: Plan the offsite\r\n"
    b"Date: Tue, 03 Jun 2025 09:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\n"
    b"Please plan a two-day offsite for twelve people.\r\n"
)


def sign(message: bytes, domain: bytes, pem: bytes) -> bytes:
    signature: bytes = dkim.sign(message, b"s1", domain, pem, include_headers=[b"from", b"to", b"subject"])
    return signature + message


def dns_for(records: dict[bytes, bytes]) -> Callable[[bytes], bytes | None]:
    return lambda name: records.get(name)


def parse(raw: bytes) -> HeaderSignals:
    return read_signals(Headers.parse(raw))


def test_dkim_pass(key: tuple[bytes, bytes]) -> None:
    """A signature by the From domain verifies through the injected DNS function."""
    pem, txt = key
    raw = sign(MESSAGE, b"example.com", pem)
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({b"s1._domainkey.example.com.": txt}))
    assert verdict == AuthVerdict("ann@example.com", "DKIM passed for example.com")


def test_dkim_subdomain_signer(key: tuple[bytes, bytes]) -> None:
    """A signature by a subdomain of the From domain is aligned (relaxed)."""
    pem, txt = key
    raw = sign(MESSAGE, b"mail.example.com", pem)
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({b"s1._domainkey.mail.example.com.": txt}))
    assert verdict.sender == "ann@example.com"


def test_dkim_tampered_body(key: tuple[bytes, bytes]) -> None:
    """Changing one body byte after signing fails verification."""
    pem, txt = key
    raw = sign(MESSAGE, b"example.com", pem).replace(b"twelve", b"twelvE")
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({b"s1._domainkey.example.com.": txt}))
    assert verdict == AuthVerdict(None, "DKIM did not pass for example.com")


def test_dkim_tampered_from(key: tuple[bytes, bytes]) -> None:
    """Changing the signed From header fails verification."""
    pem, txt = key
    raw = sign(MESSAGE, b"example.com", pem).replace(b"Ann <ann@", b"Ann <bob@")
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({b"s1._domainkey.example.com.": txt}))
    assert verdict.sender is None


def test_dkim_unaligned(key: tuple[bytes, bytes]) -> None:
    """A valid signature by another domain does not authenticate the From address."""
    pem, txt = key
    raw = sign(MESSAGE, b"attacker.example", pem)
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({b"s1._domainkey.attacker.example.": txt}))
    assert verdict == AuthVerdict(None, "no DKIM signature aligned with example.com")


def test_dkim_second_signature_aligned(key: tuple[bytes, bytes]) -> None:
    """With an unaligned signature on top, an aligned one below still authenticates."""
    pem, txt = key
    inner = sign(MESSAGE, b"example.com", pem)
    raw = sign(inner, b"esp.example.net", pem)
    records = {b"s1._domainkey.example.com.": txt, b"s1._domainkey.esp.example.net.": txt}
    assert verify_dkim(raw, parse(raw), dnsfunc=dns_for(records)).sender == "ann@example.com"


def test_dkim_no_key(key: tuple[bytes, bytes]) -> None:
    """No key published (NXDOMAIN) is a plain failure, not a temporary one."""
    pem, _ = key
    raw = sign(MESSAGE, b"example.com", pem)
    verdict = verify_dkim(raw, parse(raw), dnsfunc=dns_for({}))
    assert verdict.sender is None
    assert not verdict.temporary


def test_dkim_dns_failure_is_temporary(key: tuple[bytes, bytes]) -> None:
    """A resolver error makes the verdict temporary so ingress can answer 451."""
    pem, _ = key
    raw = sign(MESSAGE, b"example.com", pem)

    def broken(name: bytes) -> bytes | None:
        raise TimeoutError(name)

    verdict = verify_dkim(raw, parse(raw), dnsfunc=broken)
    assert verdict == AuthVerdict(None, "DKIM key look-up failed, try again later", temporary=True)


def test_dkim_unsigned() -> None:
    """A message without DKIM-Signature is not authenticated and needs no DNS."""
    verdict = verify_dkim(MESSAGE, parse(MESSAGE), dnsfunc=dns_for({}))
    assert verdict == AuthVerdict(None, "no DKIM signature for example.com")


def test_dkim_garbage_signature() -> None:
    """A malformed DKIM-Signature header is a failure, not an exception."""
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; garbage\r\n" + MESSAGE
    assert verify_dkim(raw, parse(raw), dnsfunc=dns_for({})).sender is None


# --- issue 11: From judged by its address; every result of our MTA -----------------------------------


@pytest.mark.parametrize(
    ("from_", "sender"),
    [
        ('"=?ISO-8859-1?Q?Fran=E7ois_Boulogne?=" <boulogne.f@gmail.com>', "boulogne.f@gmail.com"),
        ("jdöe@mächine.example", "jdöe@mächine.example"),
        ("Jöhn <JDöE@Mächine.Example>", "jdöe@mächine.example"),
        ("Doe, John <j@example.org>", "j@example.org"),
        ("Name <a@example.org> trailing words", "a@example.org"),
        ("(comment <x@evil.example>) a@example.org", "a@example.org"),
        ('"a@evil.example" <a@example.org>', "a@example.org"),
        ("Pete(A wonderful \\) chap) <pete(his account)@silly.test(his host)>", "pete@silly.test"),
        ("a@evil.example <a@example.org>", None),
        ("x <<a@example.org>>", None),
        ("<a@example.org", None),
        ("Foo <foo@[192.0.2.1]>", None),
        ('"x" <a b@example.org>', None),
        ("undisclosed-recipients:;", None),
        ('"a\x01\x1b[31mb"@example.org', None),
        ('"a\u202eb"@example.org', None),
        ("<a@x\u202eevil.example>", None),
        ('"a\x9b2J"@example.org', None),
    ],
)
def test_a_from_is_judged_by_its_address(from_: str, sender: str | None) -> None:
    """A display-name defect is no reason to refuse; an unclear or malformed address is."""
    raw = f"From: {from_}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    assert trust_from_header(read_signals(Headers.parse(raw))).sender == sender


def test_a_from_longer_than_max_text_is_unusable() -> None:
    """A From value over MAX_TEXT characters is not read at all: no usable From address."""
    from_ = '"' + "n" * 9000 + '" <a@example.org>'
    assert trust_from_header(headers(f"From: {from_}")) == AuthVerdict(None, "no usable From address")


def test_opendmarc_none_above_opendkim_pass_authenticates() -> None:
    """The known refusal: OpenDMARC's `dmarc=none` header above OpenDKIM's `dkim=pass`, both ours,
    above our Received: read together, the aligned DKIM pass authenticates."""
    msg = headers(
        f"Authentication-Results: {OURS}; dmarc=none (p=none dis=none) header.from=example.com\n"
        f"Authentication-Results: {OURS}; dkim=pass (2048-bit key) header.d=example.com header.s=s1\n"
        "Received: from mail.example.com by mx.agents.example.com (Postfix)\n"
        "From: Ann <ann@example.com>"
    )
    assert verify_dmarc_results(msg, authserv_id=OURS) == AuthVerdict(
        "ann@example.com", "DKIM passed for example.com"
    )


@pytest.mark.parametrize(
    ("lines", "sender"),
    [
        (["A: dmarc=none header.from=example.com", "Received", "A: dkim=pass header.d=example.com"], None),
        (["Received", "A: dkim=pass header.d=example.com", "Received"], "ann@example.com"),
        (["A: dkim=pass header.d=example.com", "A: spf=fail smtp.mailfrom=example.com"], "ann@example.com"),
        (["A: dkim=pass header.d=example.com", "A: dmarc=fail header.from=example.com"], None),
        (
            ["A: dmarc=pass header.from=EXAMPLE.com.", "A: dmarc=none header.from=example.com"],
            "ann@example.com",
        ),
    ],
)
def test_our_results_run_from_the_topmost_of_ours_to_the_next_received(
    lines: list[str], sender: str | None
) -> None:
    """Ours: from our topmost Authentication-Results down to the first Received below it (a content
    filter's Received may sit above them); further down came from elsewhere."""
    text = [
        "Received: from x by y" if line == "Received" else f"Authentication-Results: {OURS}; {line[3:]}"
        for line in lines
    ]
    msg = headers("\n".join([*text, "From: Ann <ann@example.com>"]))
    assert verify_dmarc_results(msg, authserv_id=OURS).sender == sender
