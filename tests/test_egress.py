"""Output files come only from where they may (issue 12.1, SSRF): the API's origin and listed hosts, at
public addresses, without redirects to another origin; anything else is linked in the reply, not fetched.

Every "internal" server here is a real listener on 127.0.0.1 that counts the connections it gets: a
refused URL must cost it not even a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import ipaddress
import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.policy import default
from typing import Any

import pytest
import trustme

from mailgate import egress
from mailgate.api import HandingerClient
from mailgate.config import OutputHost
from mailgate.errors import DownloadRefused
from tests.mail import make_mail, smtp_send

pytestmark = pytest.mark.anyio


@dataclass
class Recorder:
    """An HTTP(S) server on 127.0.0.1 that answers every request with `body` and records what came."""

    url: str
    port: int
    connections: int = 0
    hosts: list[str] = field(default_factory=list)  # the Host header of each request
    sni: list[str | None] = field(default_factory=list)  # the TLS server name of each connection


@contextlib.asynccontextmanager
async def recorder(
    body: bytes = b"internal secret", tls: ssl.SSLContext | None = None
) -> AsyncIterator[Recorder]:
    seen = Recorder("", 0)
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: seen.sni.append(name)  # type: ignore[assignment, misc]

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"host:"):
                    seen.hosts.append(line[5:].strip().decode())
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls)
    seen.port = server.sockets[0].getsockname()[1]
    seen.url = f"{'https' if tls else 'http'}://127.0.0.1:{seen.port}"
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def client(api: str, **kwargs: Any) -> AsyncIterator[HandingerClient]:
    c = HandingerClient(api, "hk_test", **kwargs)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),  # noqa: S104 (an address to refuse, not a bind): reaches the local host
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("198.51.100.7", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:93.184.216.34", True),
        ("2002:7f00:1::", False),  # 6to4 around 127.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64
    ],
)
def test_only_public_unicast_addresses_count_as_public(address: str, public: bool) -> None:
    """Loopback, private, link-local, shared, multicast, reserved and embedded-private forms are refused."""
    assert egress.is_public(ipaddress.ip_address(address)) is public


async def test_a_host_is_the_name_as_written_not_its_address() -> None:
    """Listing `localhost:P` allows that name (Host header kept) but not 127.0.0.1:P, and the reverse."""
    async with recorder(b"listed bytes") as files:
        by_name = f"http://localhost:{files.port}"
        listed = [OutputHost("localhost", files.port)]
        async with client("http://127.0.0.1:9", output_hosts=listed, private_origins=[by_name]) as c:
            assert await c.download(f"{by_name}/f.txt", max_bytes=100) == (b"listed bytes", "text/plain")
            with pytest.raises(DownloadRefused, match="not on the Handinger API"):
                await c.download(f"{files.url}/f.txt", max_bytes=100)
        listed = [OutputHost("127.0.0.1", files.port)]
        async with client("http://127.0.0.1:9", output_hosts=listed, private_origins=[files.url]) as c:
            with pytest.raises(DownloadRefused, match="not on the Handinger API"):
                await c.download(f"{by_name}/f.txt", max_bytes=100)
    assert files.connections == 1
    assert files.hosts == [f"localhost:{files.port}"]


@pytest.mark.parametrize(
    ("listed", "url"),
    [
        ("localhost", "http://localhost:{port}/x"),
        ("localhost", "https://localhost:{port}/x"),  # a name that resolves to loopback
        ("127.0.0.1", "http://127.0.0.1:{port}/x"),
        ("::ffff:7f00:1", "http://[::ffff:127.0.0.1]:{port}/x"),  # the same host, written another way
        ("0.0.0.0", "http://0.0.0.0:{port}/x"),  # noqa: S104 (a URL to refuse, not a bind)
    ],
)
async def test_a_listed_host_at_a_private_address_is_not_connected_to(listed: str, url: str) -> None:
    """A listed host whose address is loopback or unspecified is refused before any connection is made."""
    async with recorder() as internal:
        hosts = [OutputHost(listed, internal.port)]
        async with client("http://127.0.0.1:9", output_hosts=hosts) as c:
            with pytest.raises(DownloadRefused, match="private network"):
                await c.download(url.format(port=internal.port), max_bytes=100)
    assert internal.connections == 0


async def test_https_goes_to_the_checked_address_under_its_name() -> None:
    """Over https the request goes to the resolved address with the name in SNI, Host and the certificate
    check, so a certificate for the name is accepted."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with recorder(b"over tls", tls=server) as files:
        url = f"https://localhost:{files.port}"
        listed = [OutputHost("localhost", files.port)]
        async with client(
            "http://127.0.0.1:9", output_hosts=listed, private_origins=[url], verify=trust
        ) as c:
            assert await c.download(f"{url}/f.txt", max_bytes=100) == (b"over tls", "text/plain")
    assert files.sni == ["localhost"]
    assert files.hosts == [f"localhost:{files.port}"]


async def test_the_connection_goes_to_the_address_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once, by mailgate, and the request sent to that address: a name no DNS knows
    (only the test's resolver does) is fetched, so nothing looked it up again to connect (DNS rebinding
    would need that second look-up)."""
    loop = asyncio.get_running_loop()
    looked_up: list[str] = []
    real = loop.getaddrinfo

    async def resolver(host: Any, port: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return await real("127.0.0.1" if host == "rebind.invalid" else host, port, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", resolver)
    async with recorder(b"checked") as files:
        url = f"http://rebind.invalid:{files.port}"
        listed = [OutputHost("rebind.invalid", files.port)]
        async with client("http://127.0.0.1:9", output_hosts=listed, private_origins=[url]) as c:
            assert await c.download(f"{url}/f", max_bytes=100) == (b"checked", "text/plain")
        async with client("http://127.0.0.1:9", output_hosts=listed) as c:
            with pytest.raises(DownloadRefused, match="private network"):
                await c.download(f"{url}/f", max_bytes=100)
    assert looked_up == ["rebind.invalid", "rebind.invalid"]
    assert files.hosts == [f"rebind.invalid:{files.port}"]


async def test_redirects_stay_within_their_origin() -> None:
    """A redirect within the origin is followed; one to another origin is not, even to a listed host."""
    async with recorder() as internal, recorder(b"listed bytes") as listed_files:
        routes = {
            "/hop": "/files/final",
            "/out": f"{internal.url}/secret",
            "/listed": f"{listed_files.url}/f",
        }

        async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            if path in routes:
                writer.write(
                    f"HTTP/1.1 302 Found\r\nLocation: {routes[path]}\r\nContent-Length: 0\r\n\r\n".encode()
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(api, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        listed = [OutputHost("127.0.0.1", listed_files.port)]
        try:
            async with client(base, output_hosts=listed, private_origins=[listed_files.url]) as c:
                assert await c.download("/hop", max_bytes=100) == (b"final", None)
                for path in ("/out", "/listed"):
                    with pytest.raises(DownloadRefused, match="redirects to another site"):
                        await c.download(path, max_bytes=100)
        finally:
            server.close()
            await server.wait_closed()
    assert internal.connections == 0 and listed_files.connections == 0


# --- end to end: the reply links what was not fetched ------------------------------------------------


def reply_of(data: bytes) -> Any:
    return email.message_from_bytes(data, policy=default)


def plain(reply: Any) -> str:
    return str(reply.get_body(preferencelist=("plain",)).get_content())


def files_of(reply: Any) -> dict[str, bytes]:
    return {p.get_filename(): p.get_payload(decode=True) for p in reply.iter_attachments()}


async def test_internal_urls_and_redirects_out_are_linked_not_fetched(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """An internal URL, an API redirect to it and the API's port under another name are linked with a
    reason and never requested; a redirect within the API's origin is followed and attached."""
    port = sandbox.url.rpartition(":")[2]
    async with recorder() as internal:
        body = (
            "Please fetch these.\n"
            f"[sandbox:file-url={internal.url}/secret name=secret.txt]\n"
            f"[sandbox:file-url={sandbox.url}/files/redirect?to={internal.url}/moved name=moved.txt]\n"
            f"[sandbox:file-url=http://localhost:{port}/files/echo name=renamed.txt]\n"
            f"[sandbox:file-url={sandbox.url}/files/redirect?to=/_sandbox/requests name=requests.json]\n"
        )
        async with make_gateway() as gw:
            assert (await smtp_send(gw.smtp_port, make_mail(body=body))).accepted
            [(_, _, data)] = await relay.wait_for(1, timeout=20)
    assert internal.connections == 0
    reply = reply_of(data)
    attached = files_of(reply)
    assert sorted(attached) == ["echo.txt", "requests.json"]
    assert json.loads(attached["requests.json"])["items"][0]["input"]
    text = plain(reply)
    assert f"- secret.txt ({egress.NOT_ALLOWED}): {internal.url}/secret" in text
    assert f"- moved.txt ({egress.REDIRECTED}): {sandbox.url}/files/redirect?to={internal.url}/moved" in text
    assert f"- renamed.txt ({egress.NOT_ALLOWED}): http://localhost:{port}/files/echo" in text


async def test_a_listed_host_on_a_private_address_is_linked_not_fetched(
    make_gateway: Any, sandbox: Any, relay: Any
) -> None:
    """MAILGATE_OUTPUT_HOSTS allows a host's name, not a private address: `localhost` and 127.0.0.1 over
    http and https are linked as pointing into a private network, with no connection made."""
    async with recorder() as internal:
        p = internal.port
        body = (
            f"[sandbox:file-url=http://localhost:{p}/a name=a.txt] "
            f"[sandbox:file-url=https://localhost:{p}/b name=b.txt] "
            f"[sandbox:file-url=http://127.0.0.1:{p}/c name=c.txt] [sandbox:no-echo-file]"
        )
        async with make_gateway(MAILGATE_OUTPUT_HOSTS=f"localhost:{p},127.0.0.1:{p}") as gw:
            assert (await smtp_send(gw.smtp_port, make_mail(body=body))).accepted
            [(_, _, data)] = await relay.wait_for(1, timeout=20)
    assert internal.connections == 0
    reply = reply_of(data)
    assert files_of(reply) == {}
    text = plain(reply)
    for name, url in (
        ("a", f"http://localhost:{p}/a"),
        ("b", f"https://localhost:{p}/b"),
        ("c", f"{internal.url}/c"),
    ):
        assert f"- {name}.txt ({egress.PRIVATE}): {url}" in text
    assert re.search(r"Files not attached:", text)
