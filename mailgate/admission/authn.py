"""Who sent this message, as far as we can prove it (`MAILGATE_AUTH`). Pure: no network or disk I/O.

Three modes, one verdict type:

- `verify_dmarc_results` (`dmarc`): read the `Authentication-Results` header (RFC 8601) that our own MTA
  wrote, identified by its authserv-id. Every other such header is ignored: anyone can write one.
- `verify_dkim` (`dkim`): verify the DKIM signatures ourselves with dkimpy. The only I/O is the key
  look-up, done by an injectable `dnsfunc`; the function is CPU-bound, so callers run it in a thread.
- `trust_from_header` (`none`): believe the From header (demos and trusted networks only).

A message is authenticated for its single From address when an identifier that passed is *aligned* with
the From domain. Alignment is relaxed (RFC 7489 section 3.1), approximated without the public suffix
list: the domains are equal, or one is a subdomain of the other and the shorter one is not a public
suffix such as `com` or `co.uk` (see `aligned`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dkim

from mailgate.mail.headers import Headers, header_class, plain_mailboxes

__all__ = [
    "AuthVerdict",
    "aligned",
    "from_addresses",
    "how_verified",
    "parse_authentication_results",
    "trust_from_header",
    "verify_dkim",
    "verify_dmarc_results",
]

DnsFunc = Callable[[bytes], bytes | None]

_DOMAIN = re.compile(
    r"^(?=.{1,253}$)(?!-)[^\s@.()<>\[\]\\,;:\"]{1,63}(?<!-)(\.(?!-)[^\s@.()<>\[\]\\,;:\"]{1,63}(?<!-))*$"
)
# Second-level labels that, under a two-letter country code, make a public suffix (co.uk, com.au, ne.jp).
_CC_SECOND_LEVEL = frozenset(
    {"ac", "co", "com", "edu", "gob", "gov", "go", "govt", "ltd", "me", "mil", "ne", "net", "nhs", "nic"}
    | {"nom", "or", "org", "plc", "sch"}
)
_AR_PAIR = re.compile(r'([A-Za-z0-9_.\-/]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)')


@dataclass(frozen=True)
class AuthVerdict:
    """The outcome of sender authentication.

    `sender` is the authenticated From addr-spec, lower-cased, or None when the message is not
    authenticated. `reason` says why in words safe to show a peer in an SMTP reply. `temporary` is
    True when the check itself failed (a DNS time-out): the peer should try again later (451).
    """

    sender: str | None
    reason: str
    temporary: bool = False
    # what passed, in Authentication-Results words ("dmarc=pass header.from=example.org"), for the record
    passed: str = field(default="", compare=False)

    @property
    def authenticated(self) -> bool:
        return self.sender is not None


def from_addresses(headers: Headers) -> tuple[str, ...] | None:
    """The addr-specs in the From header(s), lower-cased; None when any of them is unusable.

    Unusable: no From header, an address without a local part or a well-formed domain, or a
    header the parser reports as broken. Several From headers are returned together.
    """
    values = headers.values("From")
    if not values:
        return None
    found: list[str] = []
    for value in values:
        plain = plain_mailboxes(value)
        if plain is not None:
            pairs = [(local, domain) for _, local, domain in plain]
        else:
            try:
                header: Any = header_class("from")("From", value)
                addresses = header.addresses
            except Exception:  # the header parser raises on some garbage; treat it as unusable
                return None
            if header.defects or not addresses:
                return None
            pairs = [(a.username, a.domain) for a in addresses]
        for local, domain in pairs:
            domain = domain.lower().rstrip(".")
            if not local or not _DOMAIN.match(domain) or any(c.isspace() for c in local):
                return None
            found.append(f"{local}@{domain}".lower())
    return tuple(found)


def aligned(domain: str, other: str) -> bool:
    """Relaxed alignment: `domain` and `other` are equal or one is a subdomain of the other.

    The shorter name must not be a public suffix: `example.com` aligns with `mail.example.com`,
    but `com` aligns with nothing and `co.uk` with nothing (a two-letter TLD with a registry-style
    second label such as co, com, ne, org is treated as a suffix).
    """
    a, b = domain.lower().strip(".").strip(), other.lower().strip(".").strip()
    if not a or not b:
        return False
    if a == b:
        return "." in a or a == "localhost"
    shorter, longer = (a, b) if len(a) < len(b) else (b, a)
    return longer.endswith("." + shorter) and not _is_public_suffix(shorter)


def _is_public_suffix(name: str) -> bool:
    labels = name.split(".")
    if len(labels) == 1:
        return True
    return len(labels) == 2 and len(labels[1]) == 2 and labels[0] in _CC_SECOND_LEVEL


def _single_sender(headers: Headers) -> tuple[str | None, str]:
    addresses = from_addresses(headers)
    if addresses is None:
        return None, "no usable From address"
    if len(addresses) != 1:
        return None, "several From addresses"
    return addresses[0], ""


# --- Authentication-Results (RFC 8601) ---------------------------------------------------------


@dataclass(frozen=True)
class AuthResult:
    """One resinfo of an Authentication-Results header: `dkim=pass header.d=example.com`."""

    method: str  # lower-case, version stripped: "dkim", "spf", "dmarc"
    result: str  # lower-case: "pass", "fail", "none", ...
    properties: dict[str, str]  # "header.d" -> "example.com" (ptype lower-cased, values unquoted)


def _strip_comments(text: str) -> str:
    """Remove RFC 5322 comments (nested, with quoted-pairs), keeping quoted strings intact."""
    out: list[str] = []
    depth = 0
    in_quote = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and (depth or in_quote):
            if not depth:
                out.append(text[i : i + 2])
            i += 2
            continue
        if in_quote:
            in_quote = c != '"'
            out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            if not depth:
                out.append(" ")
        elif not depth:
            in_quote = c == '"'
            out.append(c)
        i += 1
    return "".join(out)


def _split_semicolons(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    in_quote = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\" and in_quote:
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ";" and not in_quote:
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_authentication_results(value: str) -> tuple[str, list[AuthResult]] | None:
    """Parse one Authentication-Results value into (authserv-id lower-cased, results).

    Tolerates comments, quoted strings, folding, a version number after the authserv-id and
    method versions (`dkim/1`). `authserv-id; none` gives no results. Returns None when no
    authserv-id can be found.
    """
    parts = _split_semicolons(_strip_comments(value))
    head = parts[0].split()
    if not head:
        return None
    authserv_id = _unquote(head[0]).lower()
    results: list[AuthResult] = []
    for part in parts[1:]:
        pairs = _AR_PAIR.findall(part)
        if not pairs:
            continue  # "none", or garbage we cannot read
        method, result = pairs[0]
        properties: dict[str, str] = {}
        for key, raw in pairs[1:]:
            key = key.lower()
            if key != "reason" and "." in key:
                properties.setdefault(key, _unquote(raw))
        results.append(AuthResult(method.split("/")[0].lower(), _unquote(result).lower(), properties))
    return authserv_id, results


def _domain_of(identifier: str) -> str:
    """`user@example.com`, `@example.com` or `example.com` -> `example.com`."""
    return identifier.rpartition("@")[2].strip().strip("<>").lower().rstrip(".")


def verify_dmarc_results(headers: Headers, *, authserv_id: str) -> AuthVerdict:
    """Authenticate the From address from our own MTA's Authentication-Results header.

    Only the topmost header whose authserv-id equals `authserv_id` (case-insensitive) counts;
    headers with any other authserv-id, above or below it, are ignored. In that header:

    - an explicit DMARC verdict for the From domain decides: `pass` authenticates, anything else
      (`fail`, `temperror`, `permerror`, `quarantine`...) does not; `dmarc=none` (no policy
      published) and a missing DMARC result fall through to:
    - `dkim=pass` whose `header.d` (or `header.i`) is aligned with the From domain, or
    - `spf=pass` whose `smtp.mailfrom` domain is aligned with the From domain.

    A missing header, a missing or unusable From, or several From addresses: not authenticated.
    """
    sender, problem = _single_sender(headers)
    if sender is None:
        return AuthVerdict(None, problem)
    from_domain = _domain_of(sender)
    wanted = authserv_id.strip().lower()
    trusted: list[AuthResult] | None = None
    for value in headers.values("Authentication-Results"):
        parsed = parse_authentication_results(value)
        if parsed is not None and parsed[0] == wanted:
            trusted = parsed[1]
            break
    if trusted is None:
        return AuthVerdict(None, f"no Authentication-Results from {authserv_id}")

    for r in trusted:
        if r.method != "dmarc":
            continue
        header_from = r.properties.get("header.from")
        if header_from is not None and _domain_of(header_from) != from_domain:
            continue  # a verdict about some other domain
        if r.result == "pass":
            return AuthVerdict(
                sender, f"DMARC passed for {from_domain}", passed=f"dmarc=pass header.from={from_domain}"
            )
        if r.result != "none":
            return AuthVerdict(None, f"DMARC did not pass for {from_domain}")

    for r in trusted:
        if r.result != "pass":
            continue
        if r.method == "dkim":
            for key in ("header.d", "header.i"):
                if key in r.properties and aligned(_domain_of(r.properties[key]), from_domain):
                    signer = _domain_of(r.properties[key])
                    return AuthVerdict(
                        sender, f"DKIM passed for {signer}", passed=f"dkim=pass header.d={signer}"
                    )
        elif r.method == "spf":
            mailfrom = r.properties.get("smtp.mailfrom")
            if mailfrom is not None and aligned(_domain_of(mailfrom), from_domain):
                domain = _domain_of(mailfrom)
                return AuthVerdict(
                    sender, f"SPF passed for {domain}", passed=f"spf=pass smtp.mailfrom={domain}"
                )
    return AuthVerdict(None, f"DMARC did not pass for {from_domain}")


# --- DKIM ----------------------------------------------------------------------------------------


class _Lookup:
    """Adapts a `dnsfunc(name) -> TXT` to dkimpy's `dnsfunc(name, timeout=...)`, noting time-outs."""

    def __init__(self, dnsfunc: DnsFunc | None) -> None:
        self.dnsfunc = dnsfunc
        self.failed = False

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            if self.dnsfunc is None:
                txt: bytes | None = dkim.get_txt(name, timeout=timeout)
                return txt
            return self.dnsfunc(name)
        except Exception as exc:  # any resolver failure is a time-out to dkimpy (and to us: try later)
            self.failed = True
            raise dkim.DnsTimeoutError(str(exc)) from exc


def verify_dkim(raw: bytes, headers: Headers, *, dnsfunc: DnsFunc | None = None) -> AuthVerdict:
    """Authenticate the From address by verifying the message's DKIM signatures ourselves.

    Every DKIM-Signature is tried, top to bottom; the first that verifies and whose `d=` is aligned
    with the From domain authenticates the sender. `raw` is the message exactly as received.
    `dnsfunc(name)` returns the TXT record for `name` (`b"sel._domainkey.example.com."`) or None;
    None means dkimpy's own resolver. If a look-up failed and nothing else passed, the verdict is
    `temporary`. Synchronous and CPU-bound: run it in a worker thread.
    """
    sender, problem = _single_sender(headers)
    if sender is None:
        return AuthVerdict(None, problem)
    from_domain = _domain_of(sender)
    lookup = _Lookup(dnsfunc)
    try:
        verifier = dkim.DKIM(raw)
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
    except Exception:  # dkimpy cannot even read the message
        return AuthVerdict(None, "message could not be read for DKIM verification")
    if count == 0:
        return AuthVerdict(None, f"no DKIM signature for {from_domain}")
    seen_unaligned = False
    for idx in range(count):
        try:
            ok = verifier.verify(idx=idx, dnsfunc=lookup)
        except dkim.DKIMException:
            continue  # a malformed signature or key: try the next one
        signer = bytes(verifier.domain or b"").decode("ascii", "replace").lower()
        if ok and aligned(signer, from_domain):
            return AuthVerdict(sender, f"DKIM passed for {signer}", passed=f"dkim=pass header.d={signer}")
        seen_unaligned = seen_unaligned or bool(ok)
    if lookup.failed:
        return AuthVerdict(None, "DKIM key look-up failed, try again later", temporary=True)
    if seen_unaligned:
        return AuthVerdict(None, f"no DKIM signature aligned with {from_domain}")
    return AuthVerdict(None, f"DKIM did not pass for {from_domain}")


def trust_from_header(headers: Headers) -> AuthVerdict:
    """`MAILGATE_AUTH=none`: take the single, well-formed From address at its word."""
    sender, problem = _single_sender(headers)
    if sender is None:
        return AuthVerdict(None, problem)
    return AuthVerdict(sender, "From header trusted (no authentication configured)", passed="none")


def how_verified(mode: str, verdict: AuthVerdict, *, authserv_id: str | None = None) -> str:
    """How the sender of an authenticated message was verified, in one line for the worker's envelope:
    `dmarc=pass header.from=example.org, in the Authentication-Results of authserv-id mx.example.org`,
    `dkim=pass header.d=example.org, verified by mailgate`, or `unverified (MAILGATE_AUTH=none: ...)`."""
    if mode == "none" or not verdict.passed or verdict.passed == "none":
        return "unverified (MAILGATE_AUTH=none: the From header is taken at its word)"
    if mode == "dkim":
        return f"{verdict.passed}, verified by mailgate"
    return f"{verdict.passed}, in the Authentication-Results of authserv-id {authserv_id}"
