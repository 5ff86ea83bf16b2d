"""SMTP acceptance rate with durability: mailgate against a bare aiosmtpd sink, same client, same run.

    .venv/bin/python bench/smtp_accept.py [--sessions 16] [--messages 3000] [--rounds 2]

4 KB mails from parallel sessions. The client is Postfix's `smtp-source` when found (see README), else a
Python client in its own process. Each server runs in its own process; the sink and mailgate are measured
alternately, `--rounds` times each, and the best round of each is compared. mailgate runs as `serve`
does (logfmt INFO logs, WAL + synchronous=FULL, 250 only after the group commit); its runner is parked
so the figure is the acceptance path alone (the runner's costs are the other benchmarks).
"""

from __future__ import annotations

import argparse
import sys

from _common import (
    child,
    cpu_seconds,
    gateway_env,
    gateway_main,
    header,
    make_mail,
    profiled,
    sink_main,
    smtp_load,
    smtp_source,
    smtp_source_path,
    verdict,
    workdir,
)

TARGET = 0.75


def measure(port: int, args: argparse.Namespace, tool: str | None, tag: str) -> float:
    if tool is not None:
        seconds = smtp_source(tool, port, sessions=args.sessions, messages=args.messages, size=args.size)
        return args.messages / seconds
    mails = [(f"{tag}-{i}", make_mail(f"{tag}-{i}", args.size)) for i in range(args.messages)]
    load = smtp_load(port, mails, args.sessions)
    if load.refused:
        raise RuntimeError(f"{load.refused} mails were refused")
    return load.rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--python-client", action="store_true", help="ignore smtp-source")
    parser.add_argument("--profile", help="py-spy the gateway's last round into this file")
    args = parser.parse_args()
    tool = None if args.python_client else smtp_source_path()
    header("SMTP acceptance rate (4 KB mails, fsync before 250)")
    print(f"   client: {tool or 'Python asyncio client (own process)'}; {args.sessions} sessions")
    sink_rates: list[float] = []
    gate_rates: list[float] = []
    batches: list[int] = []
    for r in range(args.rounds):
        with child(sink_main) as sink:
            cpu0 = cpu_seconds(sink.pid)
            sink_rates.append(measure(sink.info, args, tool, f"s{r}"))
            sink_cpu = (cpu_seconds(sink.pid) - cpu0) / args.messages
        with workdir() as tmp:
            env = gateway_env(tmp, "http://127.0.0.1:9", None)
            with child(gateway_main, env, str(tmp / "gateway.log"), True) as gate:
                last = r == args.rounds - 1
                cpu0 = cpu_seconds(gate.pid)
                with profiled(gate.pid, args.profile if last else None):
                    gate_rates.append(measure(gate.info, args, tool, f"g{r}"))
                gate_cpu = (cpu_seconds(gate.pid) - cpu0) / args.messages
                batches.append(gate.call("stats")["batches"])
        print(
            f"   round {r + 1}: sink {sink_rates[-1]:7.0f} mails/s   mailgate {gate_rates[-1]:7.0f} mails/s"
            f"   ({args.messages / max(1, batches[-1]):.1f} mails per commit)\n"
            f"            CPU per mail: sink {sink_cpu * 1e3:.2f} ms, mailgate {gate_cpu * 1e3:.2f} ms"
        )
    sink, gate = max(sink_rates), max(gate_rates)
    ratio = gate / sink
    print(f"   bare aiosmtpd sink: {sink:7.0f} mails/s (best of {args.rounds})")
    print(f"   mailgate (durable): {gate:7.0f} mails/s (best of {args.rounds})")
    print(f"   ratio: {ratio:.2f}x (target >= {TARGET}x): {verdict(ratio >= TARGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
