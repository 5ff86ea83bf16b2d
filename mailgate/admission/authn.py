"""Who sent this message, as far as we can prove it (`MAILGATE_AUTH`). Pure: no network or disk I/O.

Three modes, one verdict type:

- `verify_dmarc_results` (`dmarc`): read the `Authentication-Results` headers (RFC 8601) that our own MTA
  wrote, identified by their authserv-id and their place above the MTA's own `Received` header (OpenDKIM
  and OpenDMARC each write one). Every other such header is ignored: anyone can write one.
- `verify_dkim` (`dkim`): verify the DKIM signatures ourselves with dkimpy. The only I/O is the key
  look-up, done by an injectable `dnsfunc`; the function is CPU-bound, so callers run it in a thread.
- `trust_from_header` (`none`): believe the From header (demos and trusted networks only).

A message is authenticated for its single From address when an identifier that passed is *aligned* with
the From domain. The From header is judged by its address (`mail.headers.from_addresses`): a broken
display name is no reason to refuse; an RFC 6532 UTF-8 address is an address like any other, its domain
compared in its IDNA form (`models.ascii_domain`). The header is read before (`mail.headers.read_signals`,
at DATA): these functions take its plain values and call back into nothing.

Alignment is relaxed (RFC 7489 section 3.1), approximated without the public suffix list: the domains
are equal, or one is a subdomain of the other and the shorter one is not a public suffix such as `com`
or `co.uk` (see `aligned`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import dkim

from mailgate.models import HeaderSignals, ascii_domain

__all__ = [
    "AuthVerdict",
    "aligned",
    "how_verified",
    "our_results",
    "parse_authentication_results",
    "trust_from_header",
    "verify_dkim",
    "verify_dmarc_results",
]

DnsFunc = Callable[[bytes], bytes | None]

# Second-level labels that, under a two-letter country code, make a public suffix (co.uk, com.au, ne.jp).
_CC_SECOND_LEVEL = frozenset(
    {"ac", "co", "com", "edu", "gob", "gov", "go", "govt", "ltd", "me", "mil", "ne", "net", "nhs", "nic"}
    | {"nom", "or", "org", "plc", "sch"}
)
MAX_AR = 16384  # characters of one Authentication-Results value read
MAX_DKIM_SIGNATURES = 8  # DKIM-Signature headers tried (each may cost a DNS look-up and a hash)
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


def aligned(domain: str, other: str) -> bool:
    """Relaxed alignment: `domain` and `other` are equal or one is a subdomain of the other.

    The shorter name must not be a public suffix: `example.com` aligns with `mail.example.com`,
    but `com` aligns with nothing and `co.uk` with nothing (a two-letter TLD with a registry-style
    second label such as co, com, ne, org is treated as a suffix).
    """
    a, b = ascii_domain(domain.strip().strip(".")), ascii_domain(other.strip().strip("."))
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


def _single_sender(signals: HeaderSignals) -> tuple[str | None, str]:
    addresses = signals.from_addresses
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
    """`user@example.com`, `@example.com` or `example.com` -> `example.com` (IDNA A-labels)."""
    return ascii_domain(identifier.rpartition("@")[2].strip().strip("<>"))


def our_results(signals: HeaderSignals, authserv_id: str) -> list[AuthResult] | None:
    """The results of every `Authentication-Results` header our own MTA wrote, top to bottom; None
    when there is none.

    Ours: the authserv-id is `authserv_id` (case-insensitive), and the header belongs to our MTA's block
    at the top: from the topmost such header down to the first `Received` header below it. With Postfix
    and its milters that is every one above Postfix's own `Received` (OpenDMARC's and OpenDKIM's, one
    each); one further down, below a `Received`, came with the mail from elsewhere, whatever its id.
    """
    wanted = authserv_id.strip().lower()
    found: list[AuthResult] | None = None
    for lower, value in signals.trace:
        if lower == "received" and found is not None:
            break
        if lower != "authentication-results":
            continue
        parsed = parse_authentication_results(value[:MAX_AR])
        if parsed is not None and parsed[0] == wanted:
            found = (found or []) + parsed[1]
    return found


def verify_dmarc_results(signals: HeaderSignals, *, authserv_id: str) -> AuthVerdict:
    """Authenticate the From address from our own MTA's Authentication-Results headers (`our_results`:
    OpenDMARC's and OpenDKIM's together; headers with any other authserv-id are ignored). In them:

    - an explicit DMARC verdict whose `header.from` names the From domain decides: `pass` authenticates,
      anything else (`fail`, `temperror`, `permerror`, `quarantine`...) does not, and a failing verdict
      wins over a passing one; `dmarc=none` (no policy published) and a missing DMARC result fall
      through to the aligned results below. A `dmarc=pass` without `header.from`, or about another
      domain, proves nothing about this From.
    - `dkim=pass` whose `header.d` (or `header.i`) is aligned with the From domain, or
    - `spf=pass` whose `smtp.mailfrom` domain is aligned with the From domain.

    A missing header, a missing or unusable From, or several From addresses: not authenticated.
    """
    sender, problem = _single_sender(signals)
    if sender is None:
        return AuthVerdict(None, problem)
    from_domain = _domain_of(sender)
    trusted = our_results(signals, authserv_id)
    if trusted is None:
        return AuthVerdict(None, f"no Authentication-Results from {authserv_id}")

    dmarc = [
        (r.result, "header.from" in r.properties and _domain_of(r.properties["header.from"]) == from_domain)
        for r in trusted
        if r.method == "dmarc"
        and ("header.from" not in r.properties or _domain_of(r.properties["header.from"]) == from_domain)
    ]
    if any(result not in ("pass", "none") for result, _ in dmarc):  # a failure, named or not, wins
        return AuthVerdict(None, f"DMARC did not pass for {from_domain}")
    if ("pass", True) in dmarc:
        return AuthVerdict(
            sender, f"DMARC passed for {from_domain}", passed=f"dmarc=pass header.from={from_domain}"
        )

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


def verify_dkim(raw: bytes, signals: HeaderSignals, *, dnsfunc: DnsFunc | None = None) -> AuthVerdict:
    """Authenticate the From address by verifying the message's DKIM signatures ourselves.

    The DKIM-Signatures are tried top to bottom (the first `MAX_DKIM_SIGNATURES`); the first that
    verifies and whose `d=` is aligned with the From domain authenticates the sender. `raw` is the
    message exactly as received.
    `dnsfunc(name)` returns the TXT record for `name` (`b"sel._domainkey.example.com."`) or None;
    None means dkimpy's own resolver. If a look-up failed and nothing else passed, the verdict is
    `temporary`. Synchronous and CPU-bound: run it in a worker thread.
    """
    sender, problem = _single_sender(signals)
    if sender is None:
        return AuthVerdict(None, problem)
    from_domain = _domain_of(sender)
    lookup = _Lookup(dnsfunc)
    try:
        verifier = dkim.DKIM(raw)
        count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        count = min(count, MAX_DKIM_SIGNATURES)
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


def trust_from_header(signals: HeaderSignals) -> AuthVerdict:
    """`MAILGATE_AUTH=none`: take the single, well-formed From address at its word."""
    sender, problem = _single_sender(signals)
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
