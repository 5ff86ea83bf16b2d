"""DKIM signatures on the mail mailgate sends (for gateways that are their own MX), and the key that
makes them.

`DkimSigner.sign(data)` puts a `DKIM-Signature` (rsa-sha256, relaxed/relaxed, `d=MAILGATE_DOMAIN`,
`s=MAILGATE_DKIM_SELECTOR`) in front of a rendered reply. `SIGNED` are the header fields a receiver
judges a reply by; one missing from a reply (Cc, In-Reply-To) is signed as absent, so it cannot be
added on the way without breaking the signature.

A reply is signed once, when it is composed, and the signed bytes are what the outbox stores: every
delivery attempt sends the same bytes (as it sends the same Message-ID), and signing costs nothing per
retry. The signature's `t=` is then the time of composing, which receivers do not check against the
time of delivery (no `x=` expiry is set). Signing reads the whole body, so callers run it in a thread.

`new_key()` makes a 2048-bit RSA key (PKCS#1 PEM) and `txt_record()` the DNS record that publishes it.
"""

from __future__ import annotations

import base64
from pathlib import Path

import dkim

SIGNED = (
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "Reply-To",
    "MIME-Version", "Content-Type", "Auto-Submitted",
)  # fmt: skip
KEY_BITS = 2048
_TXT_CHUNK = 255  # the longest character-string of a TXT record


class DkimSigner:
    """Signs as `selector._domainkey.domain` with the PEM private key `key`."""

    def __init__(self, selector: str, domain: str, key: bytes) -> None:
        self.selector = selector
        self.domain = domain
        self._key = key

    @classmethod
    def from_file(cls, selector: str, domain: str, path: Path) -> DkimSigner:
        return cls(selector, domain, path.read_bytes())

    def __repr__(self) -> str:
        return f"DkimSigner({self.selector}._domainkey.{self.domain})"

    def sign(self, data: bytes) -> bytes:
        """`data` (a whole message, CRLF line endings) with its DKIM-Signature field in front."""
        field = dkim.sign(
            data,
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self._key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[h.lower().encode("ascii") for h in SIGNED],
        )
        return bytes(field) + data


def new_key() -> tuple[bytes, bytes]:
    """A new RSA key of KEY_BITS bits: (the private key as PKCS#1 PEM, the public key as DER)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, der


def txt_value(public_der: bytes) -> str:
    """The record's text: `v=DKIM1; k=rsa; p=<base64 of the public key>`."""
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode('ascii')}"


def txt_record(selector: str, domain: str, public_der: bytes) -> str:
    """`selector._domainkey.domain. IN TXT "..." "..."`: the value in strings of at most 255 characters
    (as a DNS TXT record must be; resolvers join them)."""
    value = txt_value(public_der)
    strings = " ".join(f'"{value[i : i + _TXT_CHUNK]}"' for i in range(0, len(value), _TXT_CHUNK))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"
