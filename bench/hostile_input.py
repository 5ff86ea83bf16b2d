"""The gateway's event loop while hostile mail arrives: its longest stall, NOOP latency and RSS, each
next to ordinary mail measured in the same run.

    .venv/bin/python bench/hostile_input.py [--parallel 3]

Three processes (spawn): the gateway (`Gateway` as `mailgate serve` builds it, plus a probe timer due
every 5 ms that records how late each wake-up came: the loop's stalls), the sandbox with a relay
(`_common.peers_main`), and this one, which sends the mail as raw bytes (bare LF stays bare LF), probes
the gateway with a NOOP every 10 ms on its own SMTP connection and samples its RSS every 5 ms.

Each scenario sends `--parallel` messages at once, from the first command to the last reply (RSS
growth is from the RSS just before, so a scenario after one that grew the heap may show less):
- baseline: ordinary 4 KB mail (again at the end);
- 8 big sessions: 8 sessions each send 39 MB into DATA and hang up without ending it (spooled);
- 1,000-level nesting: multiparts nested 1,000 deep (refused 554 5.6.0);
- bare-LF 1 MB: 1 MB with three attachments, every line ended by LF alone (smtplib's `sendmail` of
  `msg.as_bytes()`);
- encoded-word header: a 100 KB header (Subject and To) of folded RFC 2047 encoded words.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import sys
import time
from email.message import EmailMessage
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import (
    RssSampler,
    _quiet_stderr,
    _serve_commands,
    child,
    gateway_env,
    header,
    make_mail,
    peers_main,
    workdir,
)
from _loopprobe import SmtpNoopProbe

MB = 1_000_000
TICK = 0.005
RCPT = b"research@agents.example.com"


def gateway_probed_main(conn: Connection, env: dict[str, str], log_path: str) -> None:
    """The gateway with a probe timer: `take` returns the (time.time(), lateness) of each wake-up."""
    _quiet_stderr(Path(log_path))
    from mailgate import logs
    from mailgate.config import load_settings
    from mailgate.service import Gateway

    settings = load_settings(environ=env)
    logs.setup(settings.log_level)
    lags: list[tuple[float, float]] = []

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            lags.append((time.time(), max(0.0, loop.time() - due)))

    async def main() -> None:
        async with Gateway(settings) as gw:
            sampler = asyncio.create_task(sample())

            async def handle(cmd: str, *args: Any) -> Any:
                if cmd == "take":
                    out = list(lags)
                    lags.clear()
                    return out
                raise ValueError(cmd)

            conn.send(gw.smtp_port)
            await _serve_commands(conn, handle)
            sampler.cancel()

    asyncio.run(main())


# --- the messages --------------------------------------------------------------------------------------


def encoded_words(n: int, size: int) -> bytes:
    """A 100 KB header block: a Subject and a To of folded encoded words."""
    word = "=?UTF-8?Q?caf=C3=A9_cr=C3=A8me_br=C3=BBl=C3=A9e?="
    subject = "\r\n ".join([word] * (size // 2 // (len(word) + 3)))
    names = ",\r\n ".join(
        f'"=?UTF-8?B?{base64.b64encode(f"Zoë {i}".encode()).decode()}?=" <z{i}@example.org>'
        for i in range(size // 2 // 60)
    )
    return (
        f"From: alice@example.org\r\nTo: research@agents.example.com,\r\n {names}\r\nSubject: {subject}\r\n"
        f"Message-ID: <hostile-header-{n}@example.org>\r\n\r\nhello\r\n"
    ).encode()


def nested(n: int, depth: int = 1000) -> bytes:
    out = [
        f"From: alice@example.org\r\nTo: research@agents.example.com\r\nSubject: deep\r\n"
        f'Message-ID: <deep-{n}@example.org>\r\nContent-Type: multipart/mixed; boundary="b0"\r\n\r\n'.encode()
    ]
    out += [
        f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n".encode()
        for i in range(1, depth)
    ]
    out.append(f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ndeep\r\n".encode())
    out += [f"--b{i}--\r\n".encode() for i in reversed(range(depth))]
    return b"".join(out)


def bare_lf(n: int) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "research@agents.example.com"
    msg["Subject"] = "bare LF"
    msg["Message-ID"] = f"<bare-lf-{n}@example.org>"
    msg.set_content("Three files attached.")
    for i in range(3):
        msg.add_attachment(
            os.urandom(250_000), maintype="application", subtype="octet-stream", filename=f"f{i}.bin"
        )
    raw = msg.as_bytes()
    assert b"\r\n" not in raw
    return raw


def ordinary(n: int) -> bytes:
    return make_mail(f"baseline-{n}-{time.time_ns()}", 4096)


# --- the clients ---------------------------------------------------------------------------------------


async def expect(reader: asyncio.StreamReader, code: bytes) -> bytes:
    while (line := await asyncio.wait_for(reader.readline(), 300))[3:4] == b"-":
        pass
    if not line.startswith(code):
        raise SystemExit(f"expected {code!r}, got {line!r}")
    return line


async def open_data(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await expect(reader, b"220")
    for command, code in (
        (b"EHLO bench.example.org", b"250"),
        (b"MAIL FROM:<alice@example.org>", b"250"),
        (b"RCPT TO:<" + RCPT + b">", b"250"),
        (b"DATA", b"354"),
    ):
        writer.write(command + b"\r\n")
        await expect(reader, code)
    return reader, writer


async def send_raw(port: int, raw: bytes) -> str:
    """One transaction with `raw` as it is (dot-stuffed, ended as smtplib ends it); the DATA reply."""
    reader, writer = await open_data(port)
    data = re.sub(rb"(?m)^\.", b"..", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    writer.write(data + b".\r\n")
    line = await expect(reader, b"")
    writer.write(b"QUIT\r\n")
    writer.close()
    return line.decode().strip()[:60]


async def poll(predicate: Any, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def big_sessions(port: int, spool: Path, sessions: int = 8, size: int = 39 * MB) -> str:
    incoming = spool / "incoming"
    opened = [await open_data(port) for _ in range(sessions)]
    chunk = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n" * 1000

    async def stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"From: alice@example.org\r\nSubject: never finished\r\n\r\n")
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    def spooled() -> int:
        return sum(p.stat().st_size for p in incoming.iterdir()) if incoming.is_dir() else 0

    await asyncio.gather(*(stream(w) for _, w in opened))
    sent = sessions * (size // len(chunk)) * len(chunk)
    await poll(lambda: spooled() >= sent - sessions * 2 * MB, "the sessions' data in the spool")
    held = spooled()
    for _, writer in opened:
        writer.close()
    await poll(lambda: spooled() == 0, "the spool files removed")
    return f"{held / MB:.0f} MB spooled while unfinished, then removed"


# --- one scenario --------------------------------------------------------------------------------------


async def scenario(name: str, gateway: Any, port: int, work: Any) -> dict[str, Any]:
    gateway.call("take")
    await asyncio.sleep(0.5)
    gateway.call("take")
    with RssSampler(gateway.pid) as memory:
        before = memory.now()
        started = time.time()
        async with SmtpNoopProbe("127.0.0.1", port, interval=0.01) as probe:
            replies = await work()
        ended = time.time()
    lags = [lag for at, lag in gateway.call("take") if started <= at <= ended + TICK]
    report = probe.report()
    return {
        "name": name,
        "seconds": ended - started,
        "stall": max(lags, default=0.0),
        "noop_p99": report.p99,
        "noop_max": report.max,
        "rss": (before, memory.peak),
        "replies": replies,
    }


def show(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    before, peak = result["rss"]
    line = (
        f"{result['name']:<24} longest loop stall {result['stall'] * 1000:6.1f} ms, NOOP p99 "
        f"{result['noop_p99'] * 1000:6.1f} ms max {result['noop_max'] * 1000:6.1f} ms, RSS peak +"
        f"{(peak - before) / MB:5.1f} MB ({result['seconds']:.1f} s)"
    )
    if baseline is not None and baseline["stall"] > 0:
        line += f"  [stall {result['stall'] / baseline['stall']:.1f}x baseline]"
    print(line)
    replies = result["replies"]
    print(f"{'':<24} replies: {sorted(set(replies)) if isinstance(replies, list) else replies}")


async def run(parallel: int, tmp: Path, gateway: Any) -> None:
    port = gateway.info

    def batch(make: Any) -> Any:
        async def work() -> list[str]:
            return list(await asyncio.gather(*(send_raw(port, make(n)) for n in range(parallel))))

        return work

    counter = iter(range(10**6))
    baseline = await scenario("baseline (4 KB)", gateway, port, batch(lambda n: ordinary(next(counter))))
    show(baseline, None)
    hostile = [
        ("8 big sessions (39 MB)", lambda: big_sessions(port, tmp / "spool")),
        ("1,000-level nesting", batch(lambda n: nested(next(counter)))),
        ("bare-LF 1 MB", batch(lambda n: bare_lf(next(counter)))),
        ("encoded-word header", batch(lambda n: encoded_words(next(counter), 100_000))),
    ]
    for name, work in hostile:
        show(await scenario(name, gateway, port, work), baseline)
    again = await scenario("baseline again", gateway, port, batch(lambda n: ordinary(next(counter))))
    show(again, baseline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--parallel", type=int, default=3, help="messages sent at once per scenario (3)")
    args = parser.parse_args()
    header("Hostile input: the loop's longest stall, NOOP latency and RSS, next to ordinary mail")
    with workdir() as tmp:
        with child(peers_main, 0.05, 0.5, str(tmp / "peers.log")) as peers:
            api_url, relay_port = peers.info
            env = gateway_env(tmp, api_url, relay_port, MAILGATE_LOG_LEVEL="WARNING")
            with child(gateway_probed_main, env, str(tmp / "gateway.log")) as gateway:
                asyncio.run(run(args.parallel, tmp, gateway))
        log = (tmp / "gateway.log").read_text(errors="replace")
        errors = [line for line in log.splitlines() if "level=error" in line]
        print(f"gateway log: {len(errors)} error lines" + (f"; first: {errors[0][:200]}" if errors else ""))


if __name__ == "__main__":
    sys.exit(main())
