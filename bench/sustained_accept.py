"""Sustained acceptance while the runner works: mailgate against a bare aiosmtpd sink, same client, same run.

    .venv/bin/python bench/sustained_accept.py [--sessions 12] [--messages 3000] [--rounds 2]
        [--turn-seconds 5] [--profile FILE]

The gateway runs as `mailgate serve` does (logfmt INFO logs, WAL + synchronous=FULL, 250 only after the
group commit) and its runner works on the mails it accepts: each becomes a turn at the built-in sandbox
API (streamed, `--turn-seconds` long) whose answer is rendered and relayed to a recording SMTP relay on
loopback. The sandbox and the relay share a process; the sink, the gateway (and its runner process when
MAILGATE_RUNNER=process) each have their own; the client is Postfix's `smtp-source` when found (see
README), else a Python client in its own process. Sink and gateway are measured alternately, `--rounds`
times each; the figure is the best round of each (the machine is shared), and each round's own ratio is
printed too. CPU per mail is printed for every process (and for the gateway's busiest threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
from _common import (
    child,
    cpu_seconds,
    gateway_env,
    gateway_main,
    header,
    make_mail,
    peers_main,
    profiled,
    sink_main,
    smtp_load,
    smtp_source_path,
    smtp_source_run,
    verdict,
    workdir,
)

TARGET = 0.75
AIM = 0.9
BASELINE = "0.27-0.33x (issue 16, 2 cores, smtp-source 3,000 x 4 KB, 12 sessions, 5 s turns)"


def send(port: int, args: argparse.Namespace, tool: str | None, tag: str) -> tuple[float, float]:
    """Send the load to `port`; (mails per second, the client's CPU seconds)."""
    if tool is not None:
        seconds, cpu = smtp_source_run(
            tool, port, sessions=args.sessions, messages=args.messages, size=args.size
        )
        return args.messages / seconds, cpu
    mails = [(f"{tag}-{i}", make_mail(f"{tag}-{i}", args.size)) for i in range(args.messages)]
    load = smtp_load(port, mails, args.sessions)
    if load.refused:
        raise RuntimeError(f"{load.refused} mails were refused")
    return load.rate, float("nan")


def thread_cpu(pid: int) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def busiest(before: dict[int, float], after: dict[int, float], pid: int, n: int) -> str:
    """The `n` threads of `pid` that used the most CPU between two `thread_cpu` readings, per mail."""
    used = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)[:3]
    parts = [f"{'main' if t == pid else t} {1e3 * c / n:.2f}" for c, t in used if c > 0]
    return ", ".join(parts)


def round_sink(args: argparse.Namespace, tool: str | None, r: int) -> dict[str, float]:
    with child(sink_main) as sink:
        cpu0 = cpu_seconds(sink.pid)
        rate, client = send(sink.info, args, tool, f"s{r}")
        return {"rate": rate, "cpu": (cpu_seconds(sink.pid) - cpu0) / args.messages, "client": client}


def round_gateway(
    args: argparse.Namespace, tool: str | None, r: int, last: bool, runner: str
) -> dict[str, Any]:
    with workdir() as tmp, child(peers_main, args.turn_seconds, 15.0, str(tmp / "peers.log")) as peers:
        url, relay_port = peers.info
        extra = {"MAILGATE_CONCURRENCY": str(args.concurrency)} if args.concurrency else {}
        extra["MAILGATE_RUNNER"] = runner
        env = gateway_env(tmp, url, relay_port, **extra)
        with child(gateway_main, env, str(tmp / "gateway.log"), False) as gate:
            # a few mails through every stage first: imports, templates and connections are warm
            warm = [(f"warm{r}-{i}", make_mail(f"warm{r}-{i}")) for i in range(8)]
            smtp_load(gate.info, warm, 4)
            time.sleep(args.turn_seconds + 1.5)
            pids = {"gateway": gate.pid, **gate.call("pids")}
            counts0, batches0 = peers.call("counts"), gate.call("stats")["batches"]
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            peers0 = cpu_seconds(peers.pid)
            threads0 = {name: thread_cpu(pid) for name, pid in pids.items()}
            with profiled(gate.pid, args.profile if last else None):
                rate, client = send(gate.info, args, tool, f"g{r}")
            n = args.messages
            cpu = {name: (cpu_seconds(pid) - cpu0[name]) / n for name, pid in pids.items()}
            threads = {name: busiest(threads0[name], thread_cpu(pid), pid, n) for name, pid in pids.items()}
            peers_cpu = (cpu_seconds(peers.pid) - peers0) / n
            counts1 = peers.call("counts")
            stats = gate.call("stats")
    return {
        "rate": rate,
        "cpu": cpu,
        "threads": threads,
        "peers": peers_cpu,
        "client": client,
        "posts": counts1["posts"] - counts0["posts"],
        "relayed": counts1["relayed"] - counts0["relayed"],
        "batches": stats["batches"] - batches0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=12)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--turn-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=0, help="MAILGATE_CONCURRENCY (0: default)")
    parser.add_argument("--python-client", action="store_true", help="ignore smtp-source")
    parser.add_argument(
        "--runner", default="auto,inline", help="MAILGATE_RUNNER values to measure, the first is the figure"
    )
    parser.add_argument("--profile", help="py-spy the gateway's last round into this file")
    args = parser.parse_args()
    tool = None if args.python_client else smtp_source_path()
    header("Sustained acceptance with the runner working (4 KB mails, fsync before 250)")
    print(
        f"   client: {tool or 'Python asyncio client (own process)'}; {args.sessions} sessions, "
        f"{args.messages} mails; sandbox turns of {args.turn_seconds:g} s, replies to a relay"
    )
    modes = args.runner.split(",")
    sinks: list[float] = []
    gates: dict[str, list[float]] = {mode: [] for mode in modes}

    def per(seconds: float) -> float:
        return 1e3 * seconds / args.messages

    for r in range(args.rounds):
        s = round_sink(args, tool, r)
        sinks.append(s["rate"])
        print(f"   round {r + 1}: sink {s['rate']:6.0f} mails/s, CPU ms per mail {1e3 * s['cpu']:.2f} "
              f"(client {per(s['client']):.2f})")  # fmt: skip
        for mode in modes:
            g = round_gateway(args, tool, r, r == args.rounds - 1 and mode == modes[0], mode)
            gates[mode].append(g["rate"])
            procs = ", ".join(f"{name} {1e3 * c:.2f}" for name, c in g["cpu"].items())
            threads = "; ".join(f"{name}: {t}" for name, t in g["threads"].items())
            print(
                f"            mailgate (MAILGATE_RUNNER={mode}) {g['rate']:6.0f} mails/s, "
                f"ratio {g['rate'] / s['rate']:.2f}x; {g['posts']} turns posted, {g['relayed']} replies "
                f"relayed meanwhile, {g['batches']} commits\n"
                f"              CPU ms per mail: {procs}, sandbox+relay {1e3 * g['peers']:.2f} "
                f"(client {per(g['client']):.2f})\n"
                f"              busiest threads, CPU ms per mail: {threads}"
            )
    sink = max(sinks)
    print(f"   bare aiosmtpd sink: {sink:6.0f} mails/s (best of {args.rounds})")
    for mode in modes:
        best = max(gates[mode])
        print(f"   mailgate, MAILGATE_RUNNER={mode}: {best:6.0f} mails/s, {best / sink:.2f}x (best of each)")
    ratio = max(gates[modes[0]]) / sink
    print(f"   baseline: {BASELINE}")
    print(
        f"   ratio ({modes[0]}): {ratio:.2f}x (target >= {TARGET}x, aim {AIM}x): {verdict(ratio >= TARGET)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
