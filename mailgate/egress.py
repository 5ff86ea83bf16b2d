"""Where mailgate may connect to fetch an output file the worker named: the rules, without the I/O.

An output file's URL comes from the worker, which reads attacker mail: without rules, a URL such as
`http://127.0.0.1:8080/admin` or `http://169.254.169.254/latest/meta-data/` would make the gateway fetch
from its own network and mail the answer to the sender (SSRF). So a download may go only

- to the API's own origin (scheme, host and port of HANDINGER_BASE_URL), or to a host the operator
  lists in MAILGATE_OUTPUT_HOSTS (`config.OutputHost`: the URL's host as written, never what it resolves
  to, so `localhost` and `127.0.0.1` are different hosts);
- over http or https;
- to public addresses only: loopback, private, link-local, carrier-grade NAT, multicast, unspecified,
  reserved and documentation ranges are refused, and so are IPv6 forms that embed such an IPv4 address
  (`::ffff:127.0.0.1`, 6to4). Every address a name resolves to is checked, and the connection is then
  made to a checked address (see `api.HandingerClient.download`), so a name that resolves differently
  the second time (DNS rebinding) gains nothing. The API's own origin is exempt: when it is on loopback
  or a private network (the sandbox, an on-premises API), so are its files, and only its files;
- through redirects within the origin that redirected; a redirect to another origin is not followed.

Anything refused raises `DownloadRefused` with a reason the reply's reader understands.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Sequence

import httpx

from mailgate.config import OutputHost
from mailgate.errors import DownloadRefused

Origin = tuple[str, str, int]  # scheme, host (lower-case IDNA; IPv6 without brackets), port
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}

# what the reply's reader is told, after the file's name: "report.pdf (not fetched: ...): URL"
NOT_WEB = "not fetched: not a web link"
NOT_ALLOWED = "not fetched: not on the Handinger API or a file host this gateway downloads from"
PRIVATE = "not fetched: it points into a private network"
REDIRECTED = "not fetched: it redirects to another site"
UNRESOLVED = "not fetched: its host name has no address"


def origin(url: httpx.URL) -> Origin:
    """(scheme, host, port) of `url`, with the scheme's default port filled in (an IP address in its
    canonical form, as `config.OutputHost` keeps it)."""
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return url.scheme, host, url.port or DEFAULT_PORTS.get(url.scheme, 0)


def is_public(ip: IPAddress) -> bool:
    """Whether `ip` is a public unicast address: anything else may reach the gateway's own networks."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public(embedded)
    special = (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )
    return ip.is_global and not special


class Destinations:
    """The rules for one gateway: the API's origin, the listed hosts, and the origins that may be on
    private addresses (the API's own; tests add their local file servers, which all listen on loopback).
    """

    def __init__(
        self, api_base: httpx.URL, hosts: Sequence[OutputHost] = (), private_origins: Iterable[str] = ()
    ) -> None:
        self.api = origin(api_base)
        self.hosts = tuple(hosts)
        self.private_ok = {self.api, *(origin(httpx.URL(u)) for u in private_origins)}

    def check_url(self, url: httpx.URL, *, redirected_from: Origin | None = None) -> Origin:
        """The origin to connect to for `url`; `DownloadRefused` when mailgate may not fetch it."""
        if url.scheme not in DEFAULT_PORTS or not url.raw_host:
            raise DownloadRefused(NOT_WEB)
        where = origin(url)
        if redirected_from is not None and where != redirected_from:
            raise DownloadRefused(REDIRECTED)
        if where != self.api and not any(h.matches(*where) for h in self.hosts):
            raise DownloadRefused(NOT_ALLOWED)
        return where

    def check_addresses(self, where: Origin, addresses: Sequence[str]) -> list[str]:
        """The addresses `where` resolved to, in order, if every one may be connected to."""
        if not addresses:
            raise DownloadRefused(UNRESOLVED)
        parsed = [ipaddress.ip_address(a.partition("%")[0]) for a in addresses]  # drop an IPv6 zone
        if where not in self.private_ok and not all(is_public(ip) for ip in parsed):
            raise DownloadRefused(PRIVATE)
        return [str(ip) for ip in dict.fromkeys(parsed)]
