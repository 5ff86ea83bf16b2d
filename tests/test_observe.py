"""What an operator sees of a running gateway: the log lines, `/metrics`, `/healthz` and `/readyz`.

Gateways here run in the test's loop with MAILGATE_METRICS_LISTEN on port 0, talking to the sandbox and
the recording relay; the endpoint is read with httpx, as Prometheus or a load balancer would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailgate.logs import JsonFormatter, LogfmtFormatter, client
from mailgate.metrics import Metrics
from mailgate.monitor import Monitor
from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from tests.conftest import DOMAIN, env_for, settings_for
from tests.daemon import Serve, write_env
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Sample:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    found: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(page: Sample, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist yet (a counter never incremented)."""
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{port}{path}", timeout=10)


async def metrics_of(gw: Gateway) -> Sample:
    assert gw.metrics_port is not None
    response = await scrape(gw.metrics_port)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert response.headers["connection"] == "close"
    return samples(response.text)


def line(record: logging.LogRecord) -> str:
    return LogfmtFormatter().format(record)


async def test_a_scrape_before_and_after_a_mail_shows_the_counters_move(
    make_gateway: Callable[..., Gateway], relay: RecordingRelay
) -> None:
    """After one answered mail and one refused RCPT, every counter, gauge and histogram it touches moved."""
    async with make_gateway(MAILGATE_METRICS_LISTEN="127.0.0.1:0") as gw:
        before = await metrics_of(gw)
        assert value(before, "mailgate_rows", table="inbound", state="answered") == 0
        assert value(before, "mailgate_api_hold") == 0
        seen = await smtp_send(
            gw.smtp_port,
            make_mail(body="Count me"),
            rcpts=["research@agents.example.com", f"nobody@{DOMAIN}", "someone@elsewhere.example"],
        )
        assert seen.accepted
        await relay.wait_for(1, timeout=15)

        async def delivered() -> bool:
            page = await metrics_of(gw)
            return value(page, "mailgate_deliveries_total", kind="answer", state="sent") == 1

        await until(delivered, what="the answer's delivery counted")
        after = await metrics_of(gw)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("mailgate_smtp_replies_total", stage="rcpt", reason="accepted", **{"class": "2xx"}) == 1
    assert (
        moved("mailgate_smtp_replies_total", stage="rcpt", reason="unknown_worker", **{"class": "5xx"}) == 1
    )
    assert moved("mailgate_smtp_replies_total", stage="rcpt", reason="relay_denied", **{"class": "5xx"}) == 1
    assert moved("mailgate_smtp_replies_total", stage="data", reason="accepted", **{"class": "2xx"}) == 1
    assert moved("mailgate_messages_total", state="answered") == 1
    assert moved("mailgate_turns_total", outcome="answered") == 1
    assert moved("mailgate_api_requests_total", method="POST", endpoint="/api/tasks", status="200") == 1
    assert moved("mailgate_api_requests_total", method="GET", endpoint="/api/tasks/{id}", status="200") >= 1
    assert value(after, "mailgate_rows", table="inbound", state="answered") == 1
    assert value(after, "mailgate_rows", table="outbox", state="sent") == 1
    assert value(after, "mailgate_oldest_waiting_seconds") == 0
    for histogram in (
        "mailgate_smtp_data_seconds",
        "mailgate_accept_to_post_seconds",
        "mailgate_turn_seconds",
        "mailgate_end_to_relay_seconds",
    ):
        assert moved(f"{histogram}_count") == 1, histogram
        assert value(after, f"{histogram}_sum") >= 0
    assert all(name.startswith("mailgate_") for name, _ in after)  # nothing but our own, per gateway


async def test_retries_and_jobs_in_hand_move_with_a_refused_post_and_a_deferred_reply(
    make_gateway: Callable[..., Gateway], sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """An API 503 and a relay 451 each count one retry of their stage; a running turn is one job in hand."""
    sandbox.state.faults.push(status=503, times=1)
    relay.fail_next("451 4.3.0 Not now", stage="MAIL")
    async with make_gateway(MAILGATE_METRICS_LISTEN="127.0.0.1:0") as gw:
        before = await metrics_of(gw)
        assert (await smtp_send(gw.smtp_port, make_mail(body="Retry me [sandbox:slow=1]"))).accepted

        async def in_hand() -> bool:
            return value(await metrics_of(gw), "mailgate_jobs_in_hand", loop="scheduler") == 1

        await until(in_hand, timeout=15, what="the turn counted as a job in hand")
        await relay.wait_for(1, timeout=20)

        async def settled() -> bool:
            page = await metrics_of(gw)
            return (
                value(page, "mailgate_deliveries_total", kind="answer", state="sent") == 1
                and value(page, "mailgate_jobs_in_hand", loop="scheduler") == 0
            )

        await until(settled, timeout=15, what="the reply sent and no job left in hand")
        after = await metrics_of(gw)
    for stage in ("api", "relay"):
        moved = value(after, "mailgate_retries_total", stage=stage) - value(
            before, "mailgate_retries_total", stage=stage
        )
        assert moved == 1, stage


async def test_two_gateways_in_one_process_count_apart(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Each gateway has its own registry: mail to one does not show on the other's /metrics."""
    first = Gateway(
        settings_for(tmp_path / "a", sandbox.url, relay.port, MAILGATE_METRICS_LISTEN="127.0.0.1:0")
    )
    second = Gateway(
        settings_for(tmp_path / "b", sandbox.url, relay.port, MAILGATE_METRICS_LISTEN="127.0.0.1:0")
    )
    async with first, second:
        await smtp_send(first.smtp_port, make_mail(body="only the first"), rcpts=[f"nobody@{DOMAIN}"])
        one, two = await metrics_of(first), await metrics_of(second)
    labels = {"stage": "rcpt", "class": "5xx", "reason": "unknown_worker"}
    assert (
        value(one, "mailgate_smtp_replies_total", **labels),
        value(two, "mailgate_smtp_replies_total", **labels),
    ) == (1, 0)


async def test_readyz_is_503_while_the_api_refuses_the_key_and_200_again_after(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """A 401 holds every turn: /readyz says 503 with the reason, the hold is in the store for `status`;
    once the key works again /readyz is 200 and the hold is gone. /healthz stays 200 throughout."""
    settings = settings_for(tmp_path, sandbox.url, relay.port, MAILGATE_METRICS_LISTEN="127.0.0.1:0")
    gw = Gateway(settings, poll_base=0.05, retry_base=0.05, hold_seconds=0.6, shutdown_deadline=2.0)
    async with gw:
        port = gw.metrics_port
        assert port is not None
        ready = await scrape(port, "/readyz")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        sandbox.state.faults.push(status=401, times=2)
        await smtp_send(gw.smtp_port, make_mail(body="Held for a while"))

        async def refused() -> bool:
            return (await scrape(port, "/readyz")).status_code == 503

        await until(refused, what="/readyz 503 during the hold")
        held = await scrape(port, "/readyz")
        assert held.text.startswith("api_hold: the API refuses HANDINGER_API_KEY")
        assert "401" in held.text
        assert (await scrape(port, "/healthz")).status_code == 200
        assert value(await metrics_of(gw), "mailgate_api_hold") == 1
        recorded = await gw.store.api_hold()
        assert recorded is not None and "401" in recorded["reason"]

        async def ready_again() -> bool:
            return (await scrape(port, "/readyz")).status_code == 200

        await until(ready_again, timeout=15, what="/readyz 200 after the hold")
        await relay.wait_for(1, timeout=15)
        assert value(await metrics_of(gw), "mailgate_api_hold") == 0
        assert await gw.store.api_hold() is None
        page = await metrics_of(gw)
        assert (
            value(page, "mailgate_api_requests_total", method="POST", endpoint="/api/tasks", status="401")
            == 2
        )
        assert value(page, "mailgate_turns_total", outcome="held") == 2


async def test_readyz_says_stopping_while_the_gateway_drains(
    make_gateway: Callable[..., Gateway], relay: RecordingRelay
) -> None:
    """During shutdown the listeners are closed and /readyz answers 503 `stopping` until the end."""
    gw = make_gateway(MAILGATE_METRICS_LISTEN="127.0.0.1:0")
    await gw.start()
    port = gw.metrics_port
    assert port is not None
    await smtp_send(gw.smtp_port, make_mail(body="slow [sandbox:slow=1]"))
    await until(lambda: gw.scheduler.in_flight == 1, what="a turn in hand")
    stopping = asyncio.create_task(gw.stop())
    await until(lambda: gw._stopping, what="stop() begun")
    answer = await scrape(port, "/readyz")
    await stopping
    assert answer.status_code == 503
    assert "stopping" in answer.text and "listeners" in answer.text


async def test_the_endpoint_serves_only_short_gets_and_closes_each_connection(
    make_gateway: Callable[..., Gateway],
) -> None:
    """405 for POST, 404 elsewhere, HEAD without a body, 431 for a huge request, 400 for garbage, and
    a client too slow to send its request is closed without an answer."""
    async with make_gateway(MAILGATE_METRICS_LISTEN="127.0.0.1:0") as gw:
        port = gw.metrics_port
        assert port is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.post("/metrics")).status_code == 405
            assert (await http.get("/nope")).status_code == 404
            head = await http.head("/healthz")
            assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", "3")
            big = await http.get("/healthz", headers={"X-Big": "x" * 20000})
            assert big.status_code == 431

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 Bad Request\r\n")
        writer.close()


async def test_a_slow_client_is_closed_after_the_read_timeout() -> None:
    """A client that never finishes its request gets no answer and the connection is closed."""

    class Ready:
        async def refresh(self) -> None:
            return None

        async def not_ready(self) -> list[str]:
            return []

    monitor = Monitor(Metrics(), Ready(), read_timeout=0.2)
    await monitor.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", monitor.port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and nothing more
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
    finally:
        await monitor.close()


async def test_metrics_are_off_unless_configured(make_gateway: Callable[..., Gateway]) -> None:
    """Without MAILGATE_METRICS_LISTEN nothing listens for HTTP."""
    async with make_gateway() as gw:
        assert gw.metrics_port is None


# --- logs ------------------------------------------------------------------------------------------------


async def test_a_refused_rcpt_is_one_info_line_with_client_sender_recipient_and_reason(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """Like Postfix's `NOQUEUE: reject:`: client ip:port, HELO, MAIL FROM, RCPT, the reply and a reason."""
    caplog.set_level(logging.INFO, logger="mailgate")
    async with make_gateway() as gw:
        await smtp_send(gw.smtp_port, make_mail(), rcpts=[f"nobody@{DOMAIN}"], mail_from="alice@example.org")
    [record] = [r for r in caplog.records if r.getMessage() == "smtp_reject"]
    assert record.levelno == logging.INFO
    text = line(record)
    assert re.search(r" client=127\.0\.0\.1:\d+ ", text), text
    assert " mail_from=alice@example.org " in text
    assert f" rcpt=nobody@{DOMAIN}" in text
    assert ' reply="550 5.1.1 No such worker here"' in text
    assert " reason=unknown_worker" in text and " stage=rcpt" in text
    assert "None" not in text and "(" not in text  # no Python reprs


async def test_an_ignored_bounce_is_logged_with_its_reason_and_queue_id(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """A bounce is accepted and never answered: one `message_ignored` line says which and why."""
    caplog.set_level(logging.INFO, logger="mailgate")
    bounce = make_mail(
        sender="MAILER-DAEMON@example.org",
        subject="Undelivered Mail Returned to Sender",
        headers={"Auto-Submitted": "auto-replied"},
    )
    async with make_gateway() as gw:
        seen = await smtp_send(gw.smtp_port, bounce, mail_from="")
        assert seen.data is not None and seen.data[0] == 250
        queue_id = seen.data[1].rsplit(" ", 1)[1]
    [record] = [r for r in caplog.records if r.getMessage() == "message_ignored"]
    text = line(record)
    assert record.levelno == logging.INFO
    assert f" queue_id={queue_id}" in text and " mail_from=<> " in text
    assert re.search(r" reason=\S", text) and "reason=None" not in text
    assert not [r for r in caplog.records if r.getMessage() == "smtp_accept"]


async def test_a_failed_message_is_a_warning_and_a_sent_reply_names_recipients_and_the_relay_reply(
    make_gateway: Callable[..., Gateway], relay: RecordingRelay, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed message is a WARNING; `outbox_sent` names the recipients and the relay's reply."""
    caplog.set_level(logging.INFO, logger="mailgate")
    async with make_gateway() as gw:
        await smtp_send(gw.smtp_port, make_mail(body="Refuse me [sandbox:status=422]"))
        await relay.wait_for(1, timeout=15)
        await until(lambda: any(r.getMessage() == "outbox_sent" for r in caplog.records), what="outbox_sent")
    [done] = [r for r in caplog.records if r.getMessage() == "message_done"]
    assert done.levelno == logging.WARNING
    assert " state=failed " in line(done) and " notice=api_rejected" in line(done)
    [sent] = [r for r in caplog.records if r.getMessage() == "outbox_sent"]
    text = line(sent)
    assert " recipients=alice@example.org " in text
    assert ' reply="250 ' in text and " kind=api_rejected " in text


async def test_shutdown_says_what_it_waits_for_and_what_it_cancelled(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """A turn still running at shutdown: `shutdown_waiting` names it, `shutdown_cancelled` too."""
    caplog.set_level(logging.INFO, logger="mailgate")
    gw = make_gateway()
    gw.shutdown_deadline = 0.3
    async with gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Long one [sandbox:slow=30]"))
        assert seen.data is not None
        queue_id = seen.data[1].rsplit(" ", 1)[1]
        await until(lambda: gw.scheduler.in_flight == 1, what="the turn in hand")
    events = [r.getMessage() for r in caplog.records]
    assert events.index("stopping") < events.index("shutdown_waiting") < events.index("stopped")
    waiting = next(r for r in caplog.records if r.getMessage() == "shutdown_waiting")
    cancelled = next(r for r in caplog.records if r.getMessage().startswith("shutdown_cancelled"))
    assert f" ids={queue_id} " in line(waiting) and " loop=scheduler " in line(waiting)
    assert f" ids={queue_id}" in line(cancelled) and cancelled.levelno == logging.WARNING


def test_a_traceback_stays_on_the_events_line_in_both_formats() -> None:
    """`log.exception` folds the traceback into `exc`: one line in logfmt, one JSON object in JSON."""
    logger = logging.getLogger("mailgate.test")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logger.makeRecord(
            "mailgate.test",
            logging.ERROR,
            __file__,
            1,
            "loop_failed",
            (),
            __import__("sys").exc_info(),
            extra={"loop": "outbox", "peer": ("127.0.0.1", 4711), "empty": "", "none": None, "ok": True},
        )
    text = LogfmtFormatter().format(record)
    assert "\n" not in text
    assert (
        text.startswith("ts=") and " level=error logger=mailgate.test event=loop_failed loop=outbox " in text
    )
    assert ' exc="Traceback (most recent call last):\\n' in text and "ValueError: bad\\nthing" in text
    assert " ok=true " in text and " empty=" not in text and " none=" not in text
    as_json = JsonFormatter().format(record)
    assert "\n" not in as_json
    event = json.loads(as_json)
    assert event["event"] == "loop_failed" and event["level"] == "error" and event["ok"] is True
    assert event["peer"] == ["127.0.0.1", 4711] and "empty" not in event and "none" not in event
    assert event["exc"].startswith("Traceback") and event["exc"].endswith("ValueError: bad\nthing")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["ts"])


@pytest.mark.parametrize(
    ("peer", "sockname", "expected"),
    [
        (("192.0.2.1", 4711), None, "192.0.2.1:4711"),
        (("2001:db8::1", 25, 0, 0), None, "[2001:db8::1]:25"),
        ("", "/run/mailgate/lmtp.sock", "unix:/run/mailgate/lmtp.sock"),
        (None, None, ""),
    ],
)
def test_a_peer_is_written_as_an_administrator_reads_it(peer: Any, sockname: Any, expected: str) -> None:
    """ip:port, [v6]:port, or the LMTP socket's path; never a tuple's repr."""
    assert client(peer, sockname) == expected


async def test_serve_logs_json_lines_that_parse_and_carry_typed_fields(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """`mailgate serve` with MAILGATE_LOG_FORMAT=json: every stderr line is one JSON object; the refusal
    and the shutdown events carry their fields with JSON types."""
    env = write_env(
        tmp_path / "mailgate.env",
        env_for(
            tmp_path,
            sandbox.url,
            relay.port,
            MAILGATE_LOG_FORMAT="json",
            MAILGATE_METRICS_LISTEN="127.0.0.1:0",
        ),
    )
    daemon = Serve(env, tmp_path / "serve.log")
    await daemon.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20

        def events() -> list[dict[str, Any]]:
            return [json.loads(x) for x in daemon.text().splitlines() if x.strip()]

        while not any(e["event"] == "started" for e in events()):
            assert asyncio.get_running_loop().time() < deadline, daemon.text()
            await asyncio.sleep(0.05)
        started = next(e for e in events() if e["event"] == "started")
        port = int(started["smtp"].rsplit(":", 1)[1])
        metrics_port = int(started["metrics"].rsplit(":", 1)[1])
        assert (await scrape(metrics_port, "/healthz")).status_code == 200
        await smtp_send(port, make_mail(), rcpts=[f"nobody@{DOMAIN}"])
        assert await daemon.stop(signal.SIGTERM) == 0
    finally:
        await daemon.close()
    found = events()
    reject = next(e for e in found if e["event"] == "smtp_reject")
    assert reject["level"] == "info" and reject["reason"] == "unknown_worker" and reject["stage"] == "rcpt"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", reject["client"])
    stopped = next(e for e in found if e["event"] == "stopped")
    assert stopped["cancelled"] == 0  # an int, not "0"
    assert [e["event"] for e in found].count("stopping") == 1


async def test_an_lmtp_refusal_on_the_unix_socket_names_the_socket(
    make_gateway: Callable[..., Gateway], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An LMTP client on the unix socket has no address: the line names the socket (`client=unix:...`)."""
    caplog.set_level(logging.INFO, logger="mailgate")
    sock = tmp_path / "lmtp.sock"
    async with make_gateway(MAILGATE_LMTP_LISTEN=f"unix:{sock}"):
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await reader.readline()
        for command in (
            b"LHLO mx.example.com",
            b"MAIL FROM:<alice@example.org>",
            f"RCPT TO:<x@{DOMAIN}>".encode(),
        ):
            writer.write(command + b"\r\n")
            while (await asyncio.wait_for(reader.readline(), 10))[3:4] == b"-":
                pass
        writer.write(b"QUIT\r\n")
        await reader.read()
        writer.close()
    [record] = [r for r in caplog.records if r.getMessage() == "smtp_reject"]
    assert f" client=unix:{sock} helo=mx.example.com mail_from=alice@example.org " in line(record)
