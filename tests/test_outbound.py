"""Delivery to a recording SMTP relay (plain, STARTTLS, implicit TLS, AUTH) and into a Maildir."""

from __future__ import annotations

import asyncio
import mailbox
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from mailgate.config import Relay, Settings, default_helo_name, load_settings
from mailgate.delivery.transports import DeliveryReport, MaildirDelivery, RelayDelivery, make_delivery
from mailgate.errors import DeliveryDeferred, DeliveryFailed
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

MESSAGE = (
    b"From: Worker <assistant@gate.example>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: Re: Quarterly numbers\r\n"
    b"Message-ID: <reply.1@gate.example>\r\n"
    b"\r\n"
    b"Here they are.\r\n"
    b".leading dot survives\r\n"
)
SENDER = "bounces@gate.example"


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls() -> Tls:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(server, client)


@pytest.fixture
async def relay() -> AsyncIterator[RecordingRelay]:
    server = RecordingRelay()
    await server.start()
    yield server
    await server.close()


def plain(port: int, **kwargs: object) -> RelayDelivery:
    return RelayDelivery(Relay("smtp", "127.0.0.1", port), local_hostname="gate.example", timeout=5, **kwargs)  # type: ignore[arg-type]


async def test_plain_delivery_is_recorded(relay: RecordingRelay) -> None:
    """The relay gets the envelope and the exact bytes; the report carries its final reply."""
    report = await plain(relay.port).deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    assert report == DeliveryReport(("alice@example.org",), {}, "250 2.0.0 Ok: queued as Q1")
    [(mail_from, rcpts, data)] = await relay.wait_for(1)
    assert (mail_from, rcpts, data) == (SENDER, ["alice@example.org"], MESSAGE)
    assert relay.tls == [False]
    assert f"SIZE={len(MESSAGE)}" in relay.mail_options[0]


@pytest.mark.parametrize(
    ("message", "received"),
    [
        (
            b"Subject: x\r\n\r\n.starts\r\nmid\r\n..two\r\n.\r\nend",
            b"Subject: x\r\n\r\n.starts\r\nmid\r\n..two\r\n.\r\nend\r\n",
        ),
        (b".Subject: x\r\n\r\nbody\r\n", b".Subject: x\r\n\r\nbody\r\n"),
        (b"Subject: x\n\n.lf only\nend\n", b"Subject: x\r\n\r\n.lf only\r\nend\r\n"),  # through data()
    ],
)
async def test_dot_lines_and_line_ends_arrive_as_meant(
    relay: RecordingRelay, message: bytes, received: bytes
) -> None:
    """Lines starting with a dot (and a lone dot) survive the transparency procedure; a message with
    bare LF line ends goes out with CRLF."""
    await plain(relay.port).deliver(message, mail_from=SENDER, recipients=["alice@example.org"])
    [(_, _, data)] = await relay.wait_for(1)
    assert data == received


async def test_a_big_message_goes_out_intact_in_slices(relay: RecordingRelay) -> None:
    """A 3 MB message whose every line starts with a dot (so every 1 MiB slice does) arrives unchanged,
    with SIZE= its exact size."""
    message = b"Subject: dots\r\n\r\n" + b"".join(b".%07d" % n + b"." * 990 + b"\r\n" for n in range(3000))
    await plain(relay.port).deliver(message, mail_from=SENDER, recipients=["alice@example.org"])
    [(_, _, data)] = await relay.wait_for(1)
    assert data == message
    assert f"SIZE={len(message)}" in relay.mail_options[0]


async def test_eight_bit_message_declares_8bitmime(relay: RecordingRelay) -> None:
    """A message with 8-bit bytes is sent with BODY=8BITMIME, unchanged."""
    message = MESSAGE.replace(b"Here they are.", "Voilà, les chiffres.".encode())
    await plain(relay.port).deliver(message, mail_from=SENDER, recipients=["alice@example.org"])
    [(_, _, data)] = await relay.wait_for(1)
    assert data == message
    assert "BODY=8BITMIME" in relay.mail_options[0]


async def test_partial_refusal_is_reported_per_recipient(relay: RecordingRelay) -> None:
    """Some recipients refused (5xx or 4xx), others accepted: delivered, with refusals per recipient."""
    relay.refuse("ghost@example.org", "550 5.1.1 No such user")
    relay.refuse("busy@example.org", "452 4.2.2 Mailbox full")
    recipients = ["alice@example.org", "ghost@example.org", "busy@example.org"]
    report = await plain(relay.port).deliver(MESSAGE, mail_from=SENDER, recipients=recipients)
    assert report.accepted == ("alice@example.org",)
    assert report.refused == {
        "ghost@example.org": "550 5.1.1 No such user",
        "busy@example.org": "452 4.2.2 Mailbox full",
    }
    [(_, rcpts, _)] = await relay.wait_for(1)
    assert rcpts == ["alice@example.org"]


@pytest.mark.parametrize(
    ("stage", "reply", "error"),
    [
        ("RCPT", "451 4.3.0 Try again later", DeliveryDeferred),
        ("RCPT", "550 5.1.1 No such user", DeliveryFailed),
        ("MAIL", "451 4.7.1 Greylisted", DeliveryDeferred),
        ("MAIL", "553 5.7.1 Sender not allowed", DeliveryFailed),
        ("DATA", "452 4.3.1 Insufficient storage", DeliveryDeferred),
        ("DATA", "554 5.6.0 Message rejected as spam", DeliveryFailed),
    ],
)
async def test_relay_refusals(relay: RecordingRelay, stage: str, reply: str, error: type[Exception]) -> None:
    """4xx defers and 5xx fails, for MAIL FROM, every recipient, or DATA; the relay's words are kept."""
    relay.fail_next(reply, times=2, stage=stage)  # type: ignore[arg-type]
    with pytest.raises(error) as caught:
        await plain(relay.port).deliver(
            MESSAGE, mail_from=SENDER, recipients=["a@example.org", "b@example.org"]
        )
    assert type(caught.value) is error
    assert reply in str(caught.value)
    assert relay.messages == []
    assert not getattr(caught.value, "too_large", False)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("MAIL", "552 5.3.4 Message size exceeds fixed limit"),  # Postfix, with SIZE= on MAIL FROM
        ("DATA", "552 5.3.4 Message too big for system"),
        ("DATA", "554 5.3.4 Message too big for system"),
        ("DATA", "550 5.2.3 Message length exceeds administrative limit"),
    ],
)
async def test_a_refusal_for_size_says_so(relay: RecordingRelay, stage: str, reply: str) -> None:
    """552, or the enhanced status 5.3.4 / 5.2.3, is a permanent refusal marked `too_large`."""
    relay.fail_next(reply, stage=stage)  # type: ignore[arg-type]
    with pytest.raises(DeliveryFailed) as caught:
        await plain(relay.port).deliver(MESSAGE, mail_from=SENDER, recipients=["a@example.org"])
    assert caught.value.too_large


@pytest.mark.parametrize("offered", [True, False])
async def test_the_relay_says_whether_it_takes_8bit(offered: bool) -> None:
    """`eight_bit` follows the relay's EHLO (8BITMIME offered or not); BODY=8BITMIME only when offered."""
    relay = RecordingRelay(eight_bit_mime=offered)
    await relay.start()
    try:
        delivery = plain(relay.port)
        message = MESSAGE.replace(b"Here they are.", "Voilà.".encode())
        await delivery.deliver(message, mail_from=SENDER, recipients=["alice@example.org"])
        assert delivery.eight_bit is offered
        assert ("BODY=8BITMIME" in relay.mail_options[0]) is offered
    finally:
        await relay.close()


async def test_mixed_temporary_and_permanent_refusal_of_everyone_defers(relay: RecordingRelay) -> None:
    """No recipient accepted but one refusal is temporary: try again later."""
    relay.refuse("ghost@example.org", "550 5.1.1 No such user")
    relay.refuse("busy@example.org", "452 4.2.2 Mailbox full")
    with pytest.raises(DeliveryDeferred, match=r"452 4\.2\.2"):
        await plain(relay.port).deliver(
            MESSAGE, mail_from=SENDER, recipients=["ghost@example.org", "busy@example.org"]
        )


async def test_fault_queue_runs_out(relay: RecordingRelay) -> None:
    """fail_next(times=1) affects one attempt only; the next one is delivered."""
    relay.fail_next("451 4.3.0 Try again later", times=1, stage="DATA")
    delivery = plain(relay.port)
    with pytest.raises(DeliveryDeferred):
        await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    assert len(await relay.wait_for(1)) == 1


async def test_connection_refused_defers() -> None:
    """Nothing listening on the relay port: DeliveryDeferred, not a crash."""
    relay = RecordingRelay()
    port = await relay.start()
    await relay.close()
    with pytest.raises(DeliveryDeferred, match=f"127.0.0.1:{port}"):
        await plain(port).deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])


async def test_wait_for_times_out_with_the_count(relay: RecordingRelay) -> None:
    """wait_for names how many messages arrived when it gives up."""
    with pytest.raises(TimeoutError, match="got 0"):
        await relay.wait_for(1, timeout=0.05)


@pytest.fixture
async def tls_relay(tls: Tls, request: pytest.FixtureRequest) -> AsyncIterator[RecordingRelay]:
    implicit, logins = request.param
    server = RecordingRelay(tls_context=tls.server, implicit_tls=implicit, logins=logins)
    await server.start()
    yield server
    await server.close()


def secure(relay: RecordingRelay, tls_context: ssl.SSLContext | None, **kwargs: object) -> RelayDelivery:
    scheme = "smtps" if relay.implicit_tls else "smtp+starttls"
    return RelayDelivery(
        Relay(scheme, "127.0.0.1", relay.port, kwargs.pop("user", None), kwargs.pop("password", None)),  # type: ignore[arg-type]
        tls_context=tls_context,
        local_hostname="gate.example",
        timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("tls_relay", [(False, None), (True, None)], ids=["starttls", "smtps"], indirect=True)
async def test_tls_delivery_verified_against_the_ca(tls_relay: RecordingRelay, tls: Tls) -> None:
    """STARTTLS and implicit TLS deliver over an encrypted session verified against our CA."""
    await secure(tls_relay, tls.client).deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    assert len(await tls_relay.wait_for(1)) == 1
    assert tls_relay.tls == [True]


@pytest.mark.parametrize("tls_relay", [(False, None), (True, None)], ids=["starttls", "smtps"], indirect=True)
async def test_untrusted_certificate_defers(tls_relay: RecordingRelay) -> None:
    """With verification on and the system trust store, the test CA's certificate is refused."""
    with pytest.raises(DeliveryDeferred):
        await secure(tls_relay, None).deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    assert tls_relay.messages == []


@pytest.mark.parametrize("tls_relay", [(False, None)], indirect=True)
async def test_verification_can_be_switched_off(tls_relay: RecordingRelay) -> None:
    """verify_tls=False accepts the unknown certificate."""
    await secure(tls_relay, None, verify_tls=False).deliver(
        MESSAGE, mail_from=SENDER, recipients=["a@example.org"]
    )
    assert tls_relay.tls == [True]


async def test_plain_scheme_never_upgrades(tls: Tls) -> None:
    """smtp:// stays plain even when the relay offers STARTTLS (opportunistic upgrade is off)."""
    relay = RecordingRelay(tls_context=tls.server)
    port = await relay.start()
    try:
        await plain(port).deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
        await relay.wait_for(1)
        assert relay.tls == [False]
    finally:
        await relay.close()


async def test_starttls_required_but_not_offered_defers(relay: RecordingRelay) -> None:
    """smtp+starttls:// to a relay without STARTTLS never sends the message in the clear."""
    delivery = RelayDelivery(Relay("smtp+starttls", "127.0.0.1", relay.port), local_hostname="gate.example")
    with pytest.raises(DeliveryDeferred):
        await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    assert relay.messages == []


LOGINS = {"mailgate": "s3cret pass"}


@pytest.fixture
async def auth_relay(tls: Tls, request: pytest.FixtureRequest) -> AsyncIterator[RecordingRelay]:
    implicit, exclude = request.param
    server = RecordingRelay(
        tls_context=tls.server, implicit_tls=implicit, logins=LOGINS, auth_exclude=exclude
    )
    await server.start()
    yield server
    await server.close()


def _auth_cases() -> Iterator[object]:
    for implicit in (False, True):
        for mechanism, exclude in (("PLAIN", ["LOGIN"]), ("LOGIN", ["PLAIN"])):
            name = f"{'smtps' if implicit else 'starttls'}-{mechanism}"
            yield pytest.param((implicit, exclude), id=name)


@pytest.mark.parametrize("auth_relay", list(_auth_cases()), indirect=True)
async def test_auth_over_tls(auth_relay: RecordingRelay, tls: Tls) -> None:
    """AUTH PLAIN and LOGIN over STARTTLS and implicit TLS with the relay URL's credentials."""
    delivery = secure(auth_relay, tls.client, user="mailgate", password="s3cret pass")
    await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    await auth_relay.wait_for(1)
    assert auth_relay.users == ["mailgate"]


@pytest.mark.parametrize("auth_relay", [(False, [])], indirect=True)
async def test_bad_credentials_defer(auth_relay: RecordingRelay, tls: Tls) -> None:
    """A refused login is an operator problem: deferred (the message is fine), with the relay's reply."""
    delivery = secure(auth_relay, tls.client, user="mailgate", password="wrong")
    with pytest.raises(DeliveryDeferred, match="535"):
        await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])


@pytest.mark.parametrize("auth_relay", [(False, [])], indirect=True)
async def test_missing_credentials_defer(auth_relay: RecordingRelay, tls: Tls) -> None:
    """A relay that requires AUTH refuses MAIL FROM with 530: deferred, nothing delivered."""
    with pytest.raises(DeliveryDeferred, match="530"):
        await secure(auth_relay, tls.client).deliver(MESSAGE, mail_from=SENDER, recipients=["a@example.org"])
    assert auth_relay.messages == []


async def test_maildir_delivery(tmp_path: Path) -> None:
    """A Maildir (created if missing) gets one file in new/, readable by mailbox.Maildir."""
    outbox = tmp_path / "outbox"
    delivery = MaildirDelivery(outbox)
    report = await delivery.deliver(
        MESSAGE, mail_from=SENDER, recipients=["alice@example.org", "bob@example.org"]
    )
    await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["carol@example.org"])
    assert report.accepted == ("alice@example.org", "bob@example.org")
    assert sorted(p.name for p in outbox.iterdir()) == ["cur", "new", "tmp"]
    assert list((outbox / "tmp").iterdir()) == []
    names = [p.name for p in (outbox / "new").iterdir()]
    assert len(set(names)) == 2
    messages = list(mailbox.Maildir(outbox, create=False))
    assert len(messages) == 2
    first = next(m for m in messages if "bob" in m["X-Envelope-To"])
    assert first["Message-ID"] == "<reply.1@gate.example>"
    assert first["Return-Path"] == f"<{SENDER}>"
    assert first.get_payload() == "Here they are.\n.leading dot survives\n"
    assert b"\r\n" not in (outbox / "new" / names[0]).read_bytes()


async def test_maildir_failure_defers(tmp_path: Path) -> None:
    """An unwritable outbox is a transient delivery problem."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DeliveryDeferred):
        await MaildirDelivery(blocker / "outbox").deliver(
            MESSAGE, mail_from=SENDER, recipients=["a@example.org"]
        )


def test_make_delivery_picks_relay_or_maildir(tmp_path: Path) -> None:
    """A relay when MAILGATE_SMTP_RELAY is set, the outbox Maildir otherwise."""
    base = Settings(domain="gate.example", workers={}, allowed_senders=("*",), outbox_dir=tmp_path)
    assert isinstance(make_delivery(base), MaildirDelivery)
    relay = Relay("smtps", "smtp.example", 465, "user", "hunter2-secret")
    with_relay = Settings(domain="gate.example", workers={}, allowed_senders=("*",), smtp_relay=relay)
    delivery = make_delivery(with_relay)
    assert isinstance(delivery, RelayDelivery)
    assert delivery.relay == relay
    assert "hunter2" not in repr(delivery)


async def test_silent_relay_times_out_and_defers() -> None:
    """A relay that accepts the connection but never greets: DeliveryDeferred after the timeout."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    delivery = RelayDelivery(Relay("smtp", "127.0.0.1", port), local_hostname="gate.example", timeout=0.3)
    try:
        with pytest.raises(DeliveryDeferred, match="Timeout"):
            await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    finally:
        server.close()
        await server.wait_closed()
        for writer in connections:
            writer.close()
            await writer.wait_closed()
    assert len(connections) == 1


@pytest.mark.parametrize("smtputf8", [True, False])
async def test_international_addresses_need_smtputf8(smtputf8: bool) -> None:
    """A non-ASCII address goes with SMTPUTF8 when offered; without it the message cannot be sent."""
    relay = RecordingRelay(smtputf8=smtputf8)
    port = await relay.start()
    try:
        if smtputf8:
            await plain(port).deliver(MESSAGE, mail_from=SENDER, recipients=["jürgen@example.org"])
            [(_, rcpts, _)] = await relay.wait_for(1)
            assert rcpts == ["jürgen@example.org"]
            assert "SMTPUTF8" in relay.mail_options[0]
        else:
            with pytest.raises(DeliveryFailed, match="SMTPUTF8"):
                await plain(port).deliver(MESSAGE, mail_from=SENDER, recipients=["jürgen@example.org"])
    finally:
        await relay.close()


@pytest.mark.parametrize("helo", ["mx.gate.example", None])
async def test_the_relay_sees_the_configured_helo_name(relay: RecordingRelay, helo: str | None) -> None:
    """The EHLO name towards the relay is MAILGATE_HELO_NAME; unset, the machine's FQDN or else the
    domain, never localhost."""
    env = {
        "MAILGATE_DOMAIN": "gate.example",
        "MAILGATE_WORKERS": "research=wrk_1",
        "MAILGATE_ALLOWED_SENDERS": "*",
        "MAILGATE_AUTH": "none",
        "HANDINGER_BASE_URL": "http://127.0.0.1:8787",
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay.port}",
    }
    if helo is not None:
        env["MAILGATE_HELO_NAME"] = helo
    delivery = make_delivery(load_settings(environ=env))
    try:
        await delivery.deliver(MESSAGE, mail_from=SENDER, recipients=["alice@example.org"])
    finally:
        await delivery.aclose()
    await relay.wait_for(1)
    [seen] = relay.helo_names
    assert seen == (helo or default_helo_name("gate.example"))
    assert seen not in ("localhost", "localhost.localdomain")
