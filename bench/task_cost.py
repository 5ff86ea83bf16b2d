"""Cost per running task: RSS growth per in-flight streamed turn at 1,000, and CPU per stream event.

    .venv/bin/python bench/task_cost.py [--tasks 1000] [--window 10]

mailgate (MAILGATE_CONCURRENCY = --tasks) and the sandbox + relay run in their own processes. RSS (of
every gateway process: the listener and the runner with MAILGATE_RUNNER=process) is measured after a
warm-up of 20 answered tasks (baseline) and again with every turn streaming; CPU per event is the
gateway's CPU time over a window divided by the stream events the sandbox emitted meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import (
    child,
    cpu_seconds,
    gateway_env,
    gateway_main,
    header,
    make_mail,
    peers_main,
    profiled,
    rss,
    smtp_load,
    start_slow_tasks,
    verdict,
    wait_until,
    workdir,
)

TARGET_KIB = 150


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--turn-seconds", type=float, default=60.0)
    parser.add_argument("--profile", help="py-spy the gateway during the CPU window")
    args = parser.parse_args()
    header(f"Cost per running task ({args.tasks} concurrent streamed turns)")
    with workdir() as tmp, child(peers_main, 0.0, 15.0, str(tmp / "peers.log")) as peers:
        url, relay_port = peers.info
        env = gateway_env(tmp, url, relay_port, MAILGATE_CONCURRENCY=str(args.tasks))
        with child(gateway_main, env, str(tmp / "gateway.log"), False) as gate:
            warm = [(f"warm-{i}", make_mail(f"warm-{i}")) for i in range(20)]
            smtp_load(gate.info, warm, 4)
            wait_until(lambda: peers.call("counts")["relayed"] >= 20, 60, "20 warm-up replies")
            time.sleep(1.0)
            pids = [gate.pid, *gate.call("pids").values()]  # with MAILGATE_RUNNER=process: two
            base = sum(rss(pid) for pid in pids)
            ramp = start_slow_tasks(gate, peers, args.tasks, args.turn_seconds)
            time.sleep(1.0)
            loaded = sum(rss(pid) for pid in pids)
            e0, c0, t0 = peers.call("counts")["events"], sum(map(cpu_seconds, pids)), time.perf_counter()
            with profiled(gate.pid, args.profile):
                time.sleep(args.window)
            e1, c1, t1 = peers.call("counts")["events"], sum(map(cpu_seconds, pids)), time.perf_counter()
            running = peers.call("counts")["running"]
    per_task = (loaded - base) / args.tasks / 1024
    events = e1 - e0
    cpu = c1 - c0
    print(f"   ramp to {args.tasks} streams: {ramp:.1f} s; {running} still streaming after the window")
    print(
        f"   RSS after warm-up (baseline): {base / 2**20:.1f} MiB; with {args.tasks} streams: "
        f"{loaded / 2**20:.1f} MiB"
    )
    print(
        f"   RSS per in-flight task: {per_task:.0f} KiB (target <= {TARGET_KIB} KiB): "
        f"{verdict(per_task <= TARGET_KIB)}"
    )
    print(
        f"   stream events in {t1 - t0:.1f} s: {events} ({events / (t1 - t0):.0f}/s); mailgate CPU "
        f"{cpu:.2f} s ({100 * cpu / (t1 - t0):.0f}% of a core)"
    )
    print(
        f"   CPU per stream event: {1e6 * cpu / max(1, events):.0f} us (includes the idle cost of "
        f"{args.tasks} open streams)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
