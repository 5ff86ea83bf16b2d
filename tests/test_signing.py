"""DKIM signing on its own, and the settings of issue 15: MAILGATE_ACK_AFTER, MAILGATE_BOUNCE_LIMIT,
MAILGATE_DKIM_SELECTOR and MAILGATE_DKIM_KEY (checked at start: a bad key is a bad configuration, 78).

A signed reply verified against the record `mailgate dkim-keygen` prints is in `tests/test_sender.py`.
"""

from __future__ import annotations

import random
import subprocess
from email.policy import SMTP
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailgate import cli
from mailgate.config import load_settings
from mailgate.errors import ConfigError
from mailgate.models import ReplyHeaders
from mailgate.replies.render import Renderer
from mailgate.replies.signing import SIGNED, DkimSigner, new_key, txt_record, txt_value

MINIMAL = {
    "MAILGATE_DOMAIN": "agents.example.com",
    "MAILGATE_WORKERS": "research=wrk_1",
    "MAILGATE_ALLOWED_SENDERS": "*",
    "MAILGATE_AUTH": "none",
    "HANDINGER_BASE_URL": "http://127.0.0.1:8787",
}


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=MINIMAL | env)
    return info.value.problems


def pem_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def short_key() -> rsa.RSAPrivateKey:
    """A 512-bit RSA key (cryptography makes none under 1024 bits: built from two 256-bit primes)."""
    rng = random.Random(15)

    def prime() -> int:
        while True:
            n = rng.getrandbits(256) | (3 << 254) | 1
            if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
                return n

    p, q, e = prime(), prime(), 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    public = rsa.RSAPublicNumbers(e, p * q)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public)
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


@pytest.fixture(scope="module")
def key_pair() -> tuple[bytes, bytes]:
    return new_key()


def test_the_defaults() -> None:
    """Acknowledgements after 120 s, suppression after 3 hard bounces, no signing."""
    settings = load_settings(environ=MINIMAL)
    assert (settings.ack_after, settings.bounce_limit) == (120.0, 3)
    assert (settings.dkim_selector, settings.dkim_key) == (None, None)


@pytest.mark.parametrize(("value", "seconds"), [("0", 0.0), ("0.5", 0.5), ("300", 300.0)])
def test_ack_after_takes_seconds_or_zero_for_off(value: str, seconds: float) -> None:
    """MAILGATE_ACK_AFTER is a number of seconds; 0 turns acknowledgements off."""
    assert load_settings(environ=MINIMAL | {"MAILGATE_ACK_AFTER": value}).ack_after == seconds


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MAILGATE_ACK_AFTER", "-1"),
        ("MAILGATE_ACK_AFTER", "soon"),
        ("MAILGATE_ACK_AFTER", "inf"),
        ("MAILGATE_BOUNCE_LIMIT", "0"),
        ("MAILGATE_BOUNCE_LIMIT", "three"),
        ("MAILGATE_DKIM_SELECTOR", "bad selector"),
        ("MAILGATE_DKIM_SELECTOR", "-dash"),
    ],
)
def test_bad_values_are_named(key: str, value: str) -> None:
    """Each bad value is named with its key."""
    assert any(p.startswith(f"{key}: ") for p in problems(**{key: value}))


def test_selector_and_key_come_together(tmp_path: Path, key_pair: tuple[bytes, bytes]) -> None:
    """One without the other is a bad configuration, naming the missing one."""
    key = tmp_path / "k.pem"
    key.write_bytes(key_pair[0])
    assert problems(MAILGATE_DKIM_SELECTOR="s1") == [
        "MAILGATE_DKIM_KEY: required with MAILGATE_DKIM_SELECTOR (replies are DKIM-signed only with both)"
    ]
    assert problems(MAILGATE_DKIM_KEY=str(key))[0].startswith("MAILGATE_DKIM_SELECTOR: required with")
    settings = load_settings(
        environ=MINIMAL | {"MAILGATE_DKIM_SELECTOR": "S1", "MAILGATE_DKIM_KEY": str(key)}
    )
    assert (settings.dkim_selector, settings.dkim_key) == ("s1", key)


def test_bad_keys_are_a_config_error(tmp_path: Path) -> None:
    """A missing file, something not a key, a key of another type and a short RSA key are each named;
    a PKCS#8 RSA key (openssl genpkey's) is taken like a PKCS#1 one."""
    small = short_key()
    files = {
        "missing.pem": None,
        "junk.pem": b"-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
        "ec.pem": pem_of(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
        "small.pem": pem_of(small, serialization.PrivateFormat.TraditionalOpenSSL),
        "text.pem": b"hello",
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        found = problems(MAILGATE_DKIM_SELECTOR="s1", MAILGATE_DKIM_KEY=str(tmp_path / name))
        assert len(found) == 1 and found[0].startswith(f"MAILGATE_DKIM_KEY: {tmp_path / name}: "), found
    assert (
        "512-bit key is too short"
        in problems(MAILGATE_DKIM_SELECTOR="s1", MAILGATE_DKIM_KEY=str(tmp_path / "small.pem"))[0]
    )
    pkcs8 = tmp_path / "pkcs8.pem"
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8.write_bytes(pem_of(big, serialization.PrivateFormat.PKCS8))
    env = {"MAILGATE_DKIM_SELECTOR": "s1", "MAILGATE_DKIM_KEY": str(pkcs8)}
    assert load_settings(environ=MINIMAL | env).dkim_key == pkcs8


def test_serve_and_check_exit_78_on_a_bad_key(tmp_path: Path) -> None:
    """A bad key stops `serve` (and `check`) at start with exit 78, the key named on stderr."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    env = MINIMAL | {"MAILGATE_DKIM_SELECTOR": "s1", "MAILGATE_DKIM_KEY": str(bad)}
    env_file = tmp_path / "mailgate.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for verb in ("serve", "check"):
        assert cli.main([verb, "--env-file", str(env_file)]) == 78


def headers() -> ReplyHeaders:
    return ReplyHeaders(
        from_addr="research@agents.example.com", from_name="research (mailgate)",
        to=["alice@example.org"], cc=[], reply_to="research+tok@agents.example.com", subject="Numbers",
        message_id="<m1@agents.example.com>", in_reply_to="<q1@example.org>",
        references=["<q1@example.org>"], loop_header_value="agents.example.com",
    )  # fmt: skip


def test_a_signed_reply_verifies_and_any_change_to_a_signed_header_or_the_body_breaks_it(
    key_pair: tuple[bytes, bytes],
) -> None:
    """relaxed/relaxed over SIGNED (absent ones too, so Cc cannot be added), d= the domain; re-folding
    whitespace keeps it valid, changing text does not."""
    pem, public = key_pair
    msg = Renderer().answer(headers(), answer_markdown="The numbers are **up**.", sources=[], task_url=None)
    signed = DkimSigner("s1", "agents.example.com", pem).sign(msg.as_bytes(policy=SMTP))
    assert signed.startswith(b"DKIM-Signature: ")

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return txt_value(public).encode() if name == b"s1._domainkey.agents.example.com." else None

    assert dkim.verify(signed, dnsfunc=dns)
    field = signed.split(b"\r\n\r\n", 1)[0].decode()
    h = field.split("h=", 1)[1].split(";", 1)[0]
    assert [n.strip().lower() for n in h.replace("\r\n", "").split(":")] == [n.lower() for n in SIGNED]
    assert dkim.verify(signed.replace(b"Subject: Re: Numbers", b"Subject:   Re:  Numbers", 1), dnsfunc=dns)
    for changed in (
        signed.replace(b"Subject: Re: Numbers", b"Subject: Re: Numbers!", 1),
        signed.replace(b"To: alice@example.org", b"To: alice@example.org\r\nCc: eve@example.net", 1),
        signed.replace(b"up", b"down"),
    ):
        assert not dkim.verify(changed, dnsfunc=dns)


def test_the_txt_record_splits_the_key_into_dns_strings(key_pair: tuple[bytes, bytes]) -> None:
    """Strings of at most 255 characters that join to `v=DKIM1; k=rsa; p=<the public key>`."""
    record = txt_record("s1", "agents.example.com", key_pair[1])
    name, _, rest = record.partition(" IN TXT ")
    strings = rest.strip('"').split('" "')
    assert name == "s1._domainkey.agents.example.com."
    assert all(0 < len(s) <= 255 for s in strings) and len(strings) == 2
    assert "".join(strings) == txt_value(key_pair[1])


def test_the_key_is_what_openssl_reads_as_2048_bit_rsa(tmp_path: Path, key_pair: tuple[bytes, bytes]) -> None:
    """The private key file is PKCS#1 PEM of a 2048-bit RSA key (what OpenDKIM and others read too)."""
    path = tmp_path / "k.pem"
    path.write_bytes(key_pair[0])
    assert key_pair[0].startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    loaded = serialization.load_pem_private_key(key_pair[0], password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey) and loaded.key_size == 2048
    try:
        out = subprocess.run(
            ["openssl", "rsa", "-in", str(path), "-noout", "-check"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return  # no openssl here: the cryptography check above stands
    assert out.returncode == 0 and "RSA key ok" in out.stdout
