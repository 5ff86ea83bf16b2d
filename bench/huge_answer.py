"""What a huge answer costs the gateway: loop stalls and SMTP NOOP latency while it renders, the reply's
size, the render time, and RSS before, at the peak and after, next to a small answer in the same run.

    .venv/bin/python bench/huge_answer.py [--size 10000000] [--baseline 4096]

Three processes (spawn): the gateway (`Gateway` as `mailgate serve` builds it, plus a loop-lag sampler
that stamps each wake-up with time.time()), the sandbox with a recording relay, and this one, which
sends the mails, probes the gateway with NOOPs on its own SMTP connection every 10 ms
(`_loopprobe.SmtpNoopProbe`) and samples the gateway's RSS with psutil every 5 ms. The render window
is the gateway's `reply_composed` event (its end, minus `render_ms`). The 552 and links-only paths are
in tests/test_huge_answers.py, not here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import (
    API_KEY,
    RssSampler,
    _quiet_stderr,
    _serve_commands,
    child,
    gateway_env,
    header,
    make_mail,
    pct,
    verdict,
    workdir,
)
from _loopprobe import SmtpNoopProbe

MB = 1_000_000
MiB = 1024 * 1024
TICK = 0.005


def gateway_probed_main(conn: Connection, env: dict[str, str], log_path: str) -> None:
    """The gateway, with a loop-lag sampler and the `reply_composed` events kept for the parent."""
    _quiet_stderr(Path(log_path))
    from mailgate import logs
    from mailgate.config import load_settings
    from mailgate.service import Gateway

    settings = load_settings(environ=env)
    logs.setup(settings.log_level)
    composed: list[dict[str, Any]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "reply_composed":
                composed.append(
                    {"at": record.created, **{k: getattr(record, k) for k in ("render_ms", "bytes")}}
                )

    logging.getLogger("mailgate.replies").addHandler(Keep())
    lags: list[tuple[float, float]] = []  # (time.time() of the wake-up, how late it came)

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
                if cmd == "take":  # what was seen since the last take
                    out = {"lags": list(lags), "composed": list(composed)}
                    lags.clear()
                    composed.clear()
                    return out
                raise ValueError(cmd)

            conn.send(gw.smtp_port)
            await _serve_commands(conn, handle)
            sampler.cancel()

    asyncio.run(main())


def peers_main(conn: Connection, log_path: str) -> None:
    """The sandbox and a relay that records each reply's arrival time and size."""
    _quiet_stderr(Path(log_path))
    from aiosmtpd.smtp import SMTP

    from mailgate.sandbox import SandboxOptions, run_sandbox

    relayed: list[tuple[float, int]] = []

    class Relay:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            relayed.append((time.time(), len(envelope.original_content or envelope.content)))
            return "250 2.0.0 Ok"

    async def main() -> None:
        async with run_sandbox(SandboxOptions(api_key=API_KEY)) as sb:
            loop = asyncio.get_running_loop()
            relay = await loop.create_server(
                lambda: SMTP(Relay(), hostname="relay.test", data_size_limit=64 * MiB), "127.0.0.1", 0
            )
            conn.send((sb.url, relay.sockets[0].getsockname()[1]))

            async def handle(cmd: str, *args: Any) -> Any:
                if cmd == "relayed":
                    return list(relayed)
                if cmd == "forget":  # drop the tasks, so the sandbox does not hold old answers
                    sb.state.tasks.clear()
                    return None
                raise ValueError(cmd)

            await _serve_commands(conn, handle)
            relay.close()

    asyncio.run(main())


async def one_answer(gateway: Any, peers: Any, port: int, size: int, tag: str) -> dict[str, Any]:
    """Send one mail asking for a `size`-byte answer; measure until its reply is at the relay."""
    gateway.call("take")
    await asyncio.sleep(1.0)  # let the gateway settle before "before"
    seen_before = len(peers.call("relayed"))
    mail = make_mail(tag, 2048, body_line=f"[sandbox:answer-bytes={size}]")
    with RssSampler(gateway.pid) as memory:
        before = memory.now()
        started = time.time()
        async with SmtpNoopProbe("127.0.0.1", port, interval=0.01) as probe:
            await send(port, mail)
            deadline = time.monotonic() + 120
            while len(relayed := await asyncio.to_thread(peers.call, "relayed")) <= seen_before:
                if time.monotonic() > deadline:
                    raise SystemExit(f"no reply for the {tag} answer within 120 s")
                await asyncio.sleep(0.02)
        arrived, reply_size = relayed[-1]
        peers.call("forget")
        await asyncio.sleep(1.0)  # RSS a second after the reply
        after = memory.now()
    taken = gateway.call("take")
    [composed] = taken["composed"]
    end = composed["at"]
    start = end - composed["render_ms"] / 1000
    offset = time.time() - time.perf_counter()  # the probe's perf_counter -> wall clock
    noops = probe.between(start - offset, end - offset)
    window = [lag for at, lag in taken["lags"] if start <= at <= end + TICK]
    everything = [lag for at, lag in taken["lags"] if started <= at <= arrived]
    return {
        "tag": tag,
        "size": size,
        "render_ms": composed["render_ms"],
        "reply": reply_size,
        "rss": (before, memory.peak, after),
        "stall": max(window, default=0.0),
        "stall_all": max(everything, default=0.0),
        "noop_p99": pct(noops, 99),
        "noop_max": max(noops, default=float("nan")),
        "noops": len(noops),
        "noop_max_all": probe.report().max,
        "end_to_end": arrived - started,
    }


async def send(port: int, mail: bytes) -> None:
    """One SMTP transaction from alice to the research worker."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for line in (
        b"EHLO bench.test",
        b"MAIL FROM:<alice@example.org>",
        b"RCPT TO:<research@agents.example.com>",
    ):
        writer.write(line + b"\r\n")
    writer.write(b"DATA\r\n")
    await writer.drain()
    while not (await reader.readline()).startswith(b"354"):
        pass
    writer.write(mail + b".\r\n")
    await writer.drain()
    while not (line := await reader.readline()).startswith(b"250 2.0.0"):
        if not line or line[:1] in b"45":
            raise SystemExit(f"the gateway refused the mail: {line!r}")
    writer.write(b"QUIT\r\n")
    writer.close()


def show(r: dict[str, Any]) -> None:
    before, peak, after = r["rss"]
    print(
        f"   {r['tag']:>8} answer ({r['size'] / MB:.3f} MB): render {r['render_ms']:.0f} ms, "
        f"reply {r['reply'] / MB:.2f} MB, mail -> reply {r['end_to_end']:.1f} s"
    )
    print(
        f"            while rendering: loop's longest stall {r['stall'] * 1000:.1f} ms; "
        f"NOOP p99 {r['noop_p99'] * 1000:.1f} ms, max {r['noop_max'] * 1000:.1f} ms ({r['noops']} NOOPs)"
    )
    print(
        f"            mail -> reply, all stages: loop's longest stall {r['stall_all'] * 1000:.1f} ms, "
        f"NOOP max {r['noop_max_all'] * 1000:.1f} ms"
    )
    print(
        f"            RSS before {before / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB "
        f"(+{(peak - before) / MiB:.1f}), "
        f"after {after / MiB:.1f} MiB (+{(after - before) / MiB:.1f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10 * MB, help="bytes of the huge answer (10 MB)")
    parser.add_argument("--baseline", type=int, default=4096, help="bytes of the small answer (4 KB)")
    args = parser.parse_args()
    header("A huge answer: loop stalls, NOOP latency, reply size, RSS")
    with workdir() as tmp, child(peers_main, str(tmp / "peers.log")) as peers:
        api_url, relay_port = peers.info
        env = gateway_env(tmp, api_url, relay_port)
        with child(gateway_probed_main, env, str(tmp / "gateway.log")) as gateway:
            port = gateway.info
            results = [
                asyncio.run(one_answer(gateway, peers, port, args.baseline, "baseline")),
                asyncio.run(one_answer(gateway, peers, port, args.size, "huge")),
                asyncio.run(one_answer(gateway, peers, port, args.size, "again")),
            ]
    for r in results:
        show(r)
    huge = results[1]
    before, _, after = huge["rss"]
    ok = huge["noop_max"] < 0.1 and huge["reply"] <= 10 * MiB and after - before < 50 * MiB
    print(
        f"   targets (huge): NOOP max < 100 ms while rendering, reply <= 10 MiB, RSS after within 50 MB: "
        f"{verdict(ok)}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
