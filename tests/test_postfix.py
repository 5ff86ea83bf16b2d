"""mailgate behind a real Postfix, set up as docs/postfix.md says: SMTP on loopback and LMTP on a socket.

Each test starts a private Postfix (`postfix -c DIR start-fg`) that owns everything under one temporary
directory: its configuration, queue, data directory, log (`maillog`) and a virtual Maildir domain for
the sender, `example.org`. It relays `agents.example.com` to the gateway through `transport_maps` and
takes the gateway's replies on the same smtpd (`MAILGATE_SMTP_RELAY`), so a reply in alice's Maildir
proves the whole round trip: swaks -> Postfix -> mailgate -> sandbox API -> mailgate -> Postfix -> Maildir.
`smtp`, `lmtp` and the other daemons run chrooted in the queue directory as on Debian.

Needs root (Postfix's master starts as root and its daemons drop to user `postfix`) and Debian's
`postfix` and `swaks` (`.ci/run` installs them); skips, saying which, otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import grp
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Mapping
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from tests.conftest import settings_for
from tests.mail import make_mail, until

_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TOOLS = {name: shutil.which(name, path=_PATH) for name in ("postfix", "postmap", "swaks")}
_MISSING = sorted(name for name, path in TOOLS.items() if path is None)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        bool(_MISSING),
        reason=f"no {', '.join(_MISSING)} here (apt-get install postfix swaks; .ci/run does it)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix needs root: its master starts as root"),
]

MASTER_CF = """\
127.0.0.1:{port} inet n - y - - smtpd
pickup    unix  n - y 60 1 pickup
cleanup   unix  n - y -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - y -  - trivial-rewrite
bounce    unix  - - y -  0 bounce
defer     unix  - - y -  0 bounce
trace     unix  - - y -  0 bounce
verify    unix  - - y -  1 verify
flush     unix  n - y 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - y -  - smtp
relay     unix  - - y -  - smtp
error     unix  - - y -  - error
retry     unix  - - y -  - error
discard   unix  - - y -  - discard
virtual   unix  - n n -  - virtual
lmtp      unix  - - y -  - lmtp
anvil     unix  - - y -  1 anvil
scache    unix  - - y -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

MAPS = ("transport", "relay_recipients", "vmailbox")
HEADER_CHECKS = "/^Authentication-Results:[[:space:]]*mx\\.example\\.com([[:space:];]|$)/ IGNORE\n"


class PrivatePostfix:
    """One Postfix instance under `base`, smtpd on 127.0.0.1:`port`; started and stopped by the test."""

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.port = port
        self.config = base / "etc"
        self.queue = base / "queue"
        self.mail = base / "mail"
        self.maillog = base / "maillog"
        self.proc: asyncio.subprocess.Process | None = None

    def configure(self, transport: str) -> None:
        """main.cf: the recipe's lines plus the instance's own paths; master.cf; the lookup tables."""
        for path in (self.config, self.queue, base_data := self.base / "data", self.mail):
            path.mkdir()
        shutil.chown(base_data, "postfix")
        shutil.chown(self.mail, "nobody", "nogroup")
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(base_data),
            "meta_directory": "/etc/postfix",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.base),
            "myhostname": "mx.example.com",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            # the recipe: relay the subdomain to mailgate, only to addresses it serves
            "relay_domains": "agents.example.com",
            "relay_recipient_maps": f"hash:{self.config}/relay_recipients",
            "recipient_delimiter": "+",
            "transport_maps": f"hash:{self.config}/transport",
            # only the milters (OpenDMARC) may write Authentication-Results in our name
            "header_checks": f"regexp:{self.config}/header_checks",
            # where the replies land: a virtual Maildir domain for the sender
            "virtual_mailbox_domains": "example.org",
            "virtual_mailbox_base": str(self.mail),
            "virtual_mailbox_maps": f"hash:{self.config}/vmailbox",
            "virtual_uid_maps": "static:65534",
            "virtual_gid_maps": "static:65534",
            # a first attempt that fails is retried in seconds, not minutes
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.config / "master.cf").write_text(MASTER_CF.format(port=self.port))
        maps = {
            "transport": f"agents.example.com {transport}\n",
            "relay_recipients": "research@agents.example.com OK\nwriter@agents.example.com OK\n",
            "vmailbox": "alice@example.org example.org/alice/\n",
        }
        for name, text in maps.items():
            (self.config / name).write_text(text)
        (self.config / "header_checks").write_text(HEADER_CHECKS)

    async def start(self, transport: str) -> None:
        """Configure, `postmap`, start, and return once smtpd greets."""
        self.configure(transport)
        await self._run(TOOLS["postmap"], "-c", str(self.config), *(str(self.config / m) for m in MAPS))
        self.proc = await asyncio.create_subprocess_exec(
            str(TOOLS["postfix"]),
            "-c",
            str(self.config),
            "start-fg",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self.until(self._greets, 20, "Postfix's smtpd greeting")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        await self._run(TOOLS["postfix"], "-c", str(self.config), "stop", check=False)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            await self._run(TOOLS["postfix"], "-c", str(self.config), "abort", check=False)
            await asyncio.wait_for(self.proc.wait(), 10)

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else "(no maillog)"

    async def until(self, predicate: Any, timeout: float, what: str) -> None:
        """`tests.mail.until`, with Postfix's log in the failure message."""
        try:
            await until(predicate, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.maillog} ---\n{self.log()}") from None

    async def delivered(self, user: str = "alice", timeout: float = 30.0) -> EmailMessage:
        """The one message Postfix delivered to `user@example.org`'s Maildir."""
        new = self.mail / "example.org" / user / "new"
        await self.until(lambda: new.is_dir() and any(new.iterdir()), timeout, f"a message in {new}")
        [path] = new.iterdir()
        return email.message_from_bytes(path.read_bytes(), policy=default)

    def sent_to(self, rcpt: str) -> list[str]:
        """The `status=sent` lines of Postfix's log for `rcpt` (who took the mail, and its reply)."""
        return [line for line in self.log().splitlines() if f"to=<{rcpt}>" in line and "status=sent" in line]

    async def _greets(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            return (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _run(self, *argv: str | None, check: bool = True) -> None:
        proc = await asyncio.create_subprocess_exec(
            *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {out.decode()}")


def free_port() -> int:
    """A loopback port free right now (Postfix binds it itself, so port 0 cannot be handed over)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def postfix() -> AsyncIterator[PrivatePostfix]:
    # not tmp_path: pytest makes it 0700, and Postfix's daemons run as `postfix` and `nobody`
    base = Path(tempfile.mkdtemp(prefix="mgpf-"))
    os.chmod(base, 0o755)  # noqa: S103 (the daemons must reach the queue, the maps and the Maildirs)
    instance = PrivatePostfix(base, free_port())
    try:
        yield instance
    finally:
        await instance.stop()
        shutil.rmtree(base, ignore_errors=True)


async def swaks(port: int, mail: EmailMessage, to: str | None = None) -> tuple[int, str]:
    """Send `mail` with swaks to Postfix on `port`; (exit status, transcript)."""
    proc = await asyncio.create_subprocess_exec(
        str(TOOLS["swaks"]),
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "client.example.org",
        "--from",
        "alice@example.org",
        "--to",
        to or str(mail["To"]),
        "--data",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(mail.as_bytes()), 30)
    return int(proc.returncode or 0), out.decode(errors="replace")


def gateway(tmp_path: Path, sandbox: RunningSandbox, postfix: PrivatePostfix, **env: str) -> Gateway:
    """The gateway on the test's paths, its replies relayed through the private Postfix."""
    settings = settings_for(tmp_path, sandbox.url, postfix.port, MAILGATE_LOG_LEVEL="ERROR", **env)
    return Gateway(settings, poll_base=0.05, retry_base=0.05, settle_seconds=0.2, shutdown_deadline=2.0)


def assert_reply_came_through_postfix(reply: EmailMessage, question: EmailMessage) -> None:
    """A threaded answer from the worker, delivered by Postfix's `virtual` agent."""
    assert reply["From"].addresses[0].addr_spec == "research@agents.example.com"
    assert reply["In-Reply-To"] == question["Message-ID"]
    assert reply["Subject"] == f"Re: {question['Subject']}"
    assert reply["Delivered-To"] == "alice@example.org"
    assert reply["Return-Path"].startswith("<research+bounce-")  # each reply's own return path (VERP)
    assert "by mx.example.com (Postfix) with ESMTP" in str(reply["Received"])
    assert "Which port does the relay use?" in str(reply.get_body(("plain",)).get_content())


async def test_smtp_on_loopback_round_trip(
    tmp_path: Path, sandbox: RunningSandbox, postfix: PrivatePostfix
) -> None:
    """swaks -> Postfix -> `smtp:[127.0.0.1]:PORT` -> mailgate, and the reply back through Postfix."""
    question = make_mail(subject="Relay question", body="Which port does the relay use?")
    async with gateway(tmp_path, sandbox, postfix) as gw:
        await postfix.start(f"smtp:[127.0.0.1]:{gw.smtp_port}")
        code, transcript = await swaks(postfix.port, question)
        assert code == 0, transcript
        reply = await postfix.delivered()

        # Postfix handed the mail to mailgate, which answered with its own queue id
        [handoff] = postfix.sent_to("research@agents.example.com")
        assert f"relay=127.0.0.1[127.0.0.1]:{gw.smtp_port}" in handoff
        match = re.search(r"queued as (\S+)\)", handoff)
        assert match, handoff
        row = await gw.store.inbound(match.group(1))
        assert row is not None and row.sender == "alice@example.org"
        raw = await gw.store.raw(row.raw_id)
        assert b"by mx.example.com (Postfix) with ESMTP" in raw  # Postfix's own Received line

    assert_reply_came_through_postfix(reply, question)
    [request] = sandbox.state.requests
    assert request.worker_id == "wrk_research"


async def test_postfix_refuses_addresses_mailgate_does_not_serve(
    tmp_path: Path, sandbox: RunningSandbox, postfix: PrivatePostfix
) -> None:
    """relay_recipient_maps: an unknown worker is refused at Postfix's RCPT (no backscatter later);
    `+budget` and reply tokens pass thanks to recipient_delimiter."""
    async with gateway(tmp_path, sandbox, postfix) as gw:
        await postfix.start(f"smtp:[127.0.0.1]:{gw.smtp_port}")
        code, transcript = await swaks(postfix.port, make_mail(), to="nobody@agents.example.com")
        assert code != 0
        assert "550 5.1.1 <nobody@agents.example.com>: Recipient address rejected" in transcript

        code, transcript = await swaks(postfix.port, make_mail(), to="research+low@agents.example.com")
        assert code == 0, transcript
        await postfix.delivered()
    [request] = sandbox.state.requests
    assert request.budget == "low"


def _socket_facts(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    kind = "socket" if stat.S_ISSOCK(info.st_mode) else "not a socket"
    return kind, oct(stat.S_IMODE(info.st_mode)), grp.getgrgid(info.st_gid).gr_name


@pytest.mark.parametrize(
    ("where", "env", "umask"),
    [
        # as root, like Dovecot: the socket in Postfix's private/ directory, its group set to postfix
        ("private/mailgate", {"MAILGATE_LMTP_SOCKET_GROUP": "postfix"}, 0o022),
        # docs/postfix.md's layout for the `mailgate` user: a setgid directory of group postfix gives the
        # socket its group; the mode is set after bind, so systemd's UMask=0077 does not matter
        ("mailgate/lmtp.sock", {}, 0o077),
    ],
)
async def test_lmtp_socket_in_the_queue_directory_round_trip(
    tmp_path: Path,
    sandbox: RunningSandbox,
    postfix: PrivatePostfix,
    where: str,
    env: Mapping[str, str],
    umask: int,
) -> None:
    """Postfix's chrooted lmtp (user postfix) reaches `lmtp:unix:<where>`; the reply comes back."""
    await postfix.start(f"lmtp:unix:{where}")
    socket_path = postfix.queue / where
    if socket_path.parent != postfix.queue / "private":
        socket_path.parent.mkdir()
        shutil.chown(socket_path.parent, group="postfix")
        socket_path.parent.chmod(0o2750)
    question = make_mail(subject="LMTP question", body="Which port does the relay use?")
    saved = os.umask(umask)
    try:
        gw = gateway(tmp_path, sandbox, postfix, MAILGATE_LMTP_LISTEN=f"unix:{socket_path}", **env)
        await gw.start()
    finally:
        os.umask(saved)
    try:
        assert _socket_facts(socket_path) == ("socket", "0o660", "postfix")
        code, transcript = await swaks(postfix.port, question)
        assert code == 0, transcript
        reply = await postfix.delivered()
        [handoff] = postfix.sent_to("research@agents.example.com")
        assert f"[{where}], " in handoff and "status=sent (250 2.0.0 Ok: queued as " in handoff, handoff
    finally:
        await gw.stop()
    assert_reply_came_through_postfix(reply, question)


async def test_mail_over_mailgate_size_is_bounced_to_its_sender_by_postfix(
    tmp_path: Path, sandbox: RunningSandbox, postfix: PrivatePostfix
) -> None:
    """Postfix reads MAILGATE_MAX_MESSAGE_SIZE from mailgate's EHLO SIZE and bounces a bigger mail: the
    sender gets a DSN, nothing is half-taken."""
    big = make_mail(subject="Too big", body="x" * 70 + ("\n" + "y" * 70) * 1000)
    async with gateway(tmp_path, sandbox, postfix, MAILGATE_MAX_MESSAGE_SIZE="50000") as gw:
        await postfix.start(f"smtp:[127.0.0.1]:{gw.smtp_port}")
        code, transcript = await swaks(postfix.port, big)
        assert code == 0, transcript  # Postfix (10 MB by default) takes it
        bounce = await postfix.delivered()
        assert await gw.store.list_inbound() == []

    assert bounce["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example.com"
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    report = " ".join(bounce.as_string().split())
    assert "Status: 5.3.4" in report
    assert re.search(r"message size \d+ exceeds size limit 50000 of server 127\.0\.0\.1\[127", report)
    assert sandbox.state.requests == []


async def test_forged_authentication_results_are_stripped_by_postfix(
    tmp_path: Path, sandbox: RunningSandbox, postfix: PrivatePostfix
) -> None:
    """header_checks drops an incoming Authentication-Results in our authserv-id's name, so with
    MAILGATE_AUTH=dmarc a forged `dmarc=pass` is not believed: mailgate says 550, Postfix tells the sender."""
    forged = make_mail(
        subject="Trust me",
        headers={"Authentication-Results": "mx.example.com; dmarc=pass header.from=example.org"},
    )
    dmarc = {"MAILGATE_AUTH": "dmarc", "MAILGATE_AUTHSERV_ID": "mx.example.com"}
    async with gateway(tmp_path, sandbox, postfix, **dmarc) as gw:
        await postfix.start(f"smtp:[127.0.0.1]:{gw.smtp_port}")
        code, transcript = await swaks(postfix.port, forged)
        assert code == 0, transcript
        bounce = await postfix.delivered()
        assert await gw.store.list_inbound() == []

    report = " ".join(bounce.as_string().split())
    assert "Status: 5.7.1" in report
    assert "Sender not authenticated: no Authentication-Results from mx.example.com" in report
    assert sandbox.state.requests == []
