"""Accept latency under load: final dot to 250 while 1,000 tasks stream slow turns from the sandbox.

    .venv/bin/python bench/accept_latency.py [--tasks 1000] [--probes 300]

The sandbox (with the relay) and mailgate (MAILGATE_CONCURRENCY = --tasks) run in their own processes;
probe mails come from a third, one at a time. Baseline: the same probes against the same gateway before
the load, in the same run. Also counts pool time-outs and API retries in the gateway's log.
"""

from __future__ import annotations

import argparse
import sys

from _common import (
    child,
    gateway_env,
    gateway_main,
    header,
    log_count,
    make_mail,
    ms,
    pct,
    peers_main,
    profiled,
    smtp_load,
    start_slow_tasks,
    verdict,
    workdir,
)

TARGET_P99 = 0.050


def probe(port: int, n: int, tag: str) -> list[float]:
    mails = [(f"{tag}-{i}", make_mail(f"{tag}-{i}")) for i in range(n)]
    load = smtp_load(port, mails, 1, pace=0.01)
    if load.refused:
        raise RuntimeError(f"{load.refused} probes were refused")
    return load.latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--turn-seconds", type=float, default=90.0)
    parser.add_argument("--profile", help="py-spy the gateway while probing under load")
    args = parser.parse_args()
    header(f"Accept latency (final dot -> 250) with {args.tasks} streamed turns running")
    with workdir() as tmp, child(peers_main, 0.0, 15.0, str(tmp / "peers.log")) as peers:
        url, relay_port = peers.info
        env = gateway_env(tmp, url, relay_port, MAILGATE_CONCURRENCY=str(args.tasks))
        log = tmp / "gateway.log"
        with child(gateway_main, env, str(log), False) as gate:
            idle = probe(gate.info, args.probes, "idle")
            ramp = start_slow_tasks(gate, peers, args.tasks, args.turn_seconds)
            with profiled(gate.pid, args.profile):
                loaded = probe(gate.info, args.probes, "busy")
            running = peers.call("counts")["running"]
            timeouts = log_count(log, "PoolTimeout", "pool timeout")
            retries = log_count(log, "api_unavailable")
    print(f"   {args.tasks} tasks streaming after a {ramp:.1f} s ramp; {running} still running at the end")
    print(
        f"   idle gateway (baseline): p50 {ms(pct(idle, 50))}  p99 {ms(pct(idle, 99))}  ({len(idle)} probes)"
    )
    print(
        f"   under load:              p50 {ms(pct(loaded, 50))}  p99 {ms(pct(loaded, 99))}"
        f"  ({len(loaded)} probes)"
    )
    print(f"   pool time-outs: {timeouts}; API retries logged: {retries}")
    ok = pct(loaded, 99) <= TARGET_P99 and timeouts == 0
    print(f"   target p99 <= {ms(TARGET_P99)} and no pool time-outs: {verdict(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
