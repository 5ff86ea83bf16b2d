"""The listeners as an MTA meets them: the LMTP unix socket (its mode, group, a stale socket, a wrong
path) and what EHLO/LHLO advertise.

The socket's mode and group are checked under two umasks in this process (the umask is restored at
once); the refusals are checked through the real `mailgate serve`, for its exit code and message.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailgate.sandbox import RunningSandbox
from tests.conftest import env_for
from tests.daemon import Serve, write_env
from tests.mail import make_mail

pytestmark = pytest.mark.anyio


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under the umask given as the parameter; the old one comes back afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def other_group() -> int:
    """A group that is not this process's own, so a chown to it is visible."""
    for group in grp.getgrall():
        if group.gr_gid != os.getgid():
            return group.gr_gid
    pytest.skip("this system has no second group to give the socket")


async def lhlo(path: str) -> list[str]:
    """Connect to the LMTP socket, say LHLO, return the reply lines (the greeting first)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        lines = [(await reader.readline()).decode().rstrip()]
        writer.write(b"LHLO mx.example.com\r\n")
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip()
            lines.append(line)
            if not line.startswith("250-"):
                break
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return lines
    finally:
        writer.close()


@pytest.mark.parametrize("umask", [0o077, 0o000], indirect=True)
async def test_socket_mode_and_group_hold_whatever_the_umask(
    make_gateway: Any, tmp_path: Path, umask: int
) -> None:
    """MAILGATE_LMTP_SOCKET_MODE and _GROUP are what the socket gets, under UMask=0077 as under 0000."""
    gid = other_group()
    sock = tmp_path / "lmtp.sock"
    async with make_gateway(
        MAILGATE_LMTP_LISTEN=f"unix:{sock}",
        MAILGATE_LMTP_SOCKET_MODE="0640",
        MAILGATE_LMTP_SOCKET_GROUP=str(gid),
    ):
        info = os.stat(sock)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert info.st_gid == gid
        assert (await lhlo(str(sock)))[0].startswith("220")


async def test_default_socket_mode_is_0660_in_the_process_group(make_gateway: Any, tmp_path: Path) -> None:
    """Without the two keys the socket is 0660 (the MTA's group may connect) and keeps the process's group."""
    sock = tmp_path / "lmtp.sock"
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{sock}"):
        info = os.stat(sock)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == os.getegid()


async def test_a_stale_socket_is_replaced(make_gateway: Any, tmp_path: Path) -> None:
    """A socket file left by a killed run (nobody listening) is removed, and the new one serves LHLO."""
    path = tmp_path / "lmtp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(path))  # closing leaves the file behind, as a kill -9 does
    os.chmod(path, 0o700)
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{path}"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660  # a new socket, made as configured
        lines = await lhlo(str(path))  # the old one would refuse the connection
        assert lines[-1] == "250 HELP"


@pytest.mark.parametrize("case", ["regular file", "missing directory"])
async def test_serve_refuses_a_wrong_socket_path_naming_it(
    tmp_path: Path, sandbox: RunningSandbox, case: str
) -> None:
    """A regular file at the socket's path is kept and refused; a missing directory is named: exit 3."""
    if case == "regular file":
        path = tmp_path / "lmtp.sock"
        path.write_text("not a socket")
    else:
        path = tmp_path / "no-such-dir" / "lmtp.sock"
    env = write_env(
        tmp_path / "mailgate.env",
        env_for(tmp_path, sandbox.url, None, MAILGATE_LMTP_LISTEN=f"unix:{path}"),
    )
    daemon = await Serve(env, tmp_path / "serve.log").start()
    try:
        code = await daemon.wait()
    finally:
        await daemon.close()
    log = daemon.text()
    assert code == 3, log
    assert f"mailgate: cannot start: cannot listen on unix:{path}: " in log
    if case == "regular file":
        assert "exists and is not a socket" in log
        assert path.read_text() == "not a socket"  # never deleted
    else:
        assert "No such file or directory" in log
        assert not path.parent.exists()


async def test_ehlo_advertises_enhanced_status_codes(make_gateway: Any) -> None:
    """SMTP's EHLO lists ENHANCEDSTATUSCODES beside SIZE, 8BITMIME and SMTPUTF8; the reply still ends in
    `250 HELP`, and mail is accepted as before."""
    async with make_gateway() as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, timeout=10, start_tls=False)
        await client.connect()
        try:
            reply = await client.ehlo(hostname="client.example.org")
            assert {"enhancedstatuscodes", "size", "8bitmime", "smtputf8"} <= set(client.esmtp_extensions)
            assert reply.message.splitlines()[-1] == "HELP"
            sent, _ = await client.send_message(make_mail())
            assert sent == {}
        finally:
            await client.quit()


async def test_lhlo_advertises_enhanced_status_codes(make_gateway: Any, tmp_path: Path) -> None:
    """LMTP's LHLO lists ENHANCEDSTATUSCODES too (LMTP clients such as Postfix's lmtp read it)."""
    sock = tmp_path / "lmtp.sock"
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{sock}"):
        lines = await lhlo(str(sock))
    assert "250-ENHANCEDSTATUSCODES" in lines
    assert lines[-1] == "250 HELP"
