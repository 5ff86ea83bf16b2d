"""SQLite vs PostgreSQL as the store, on the same machine in one run: acceptance rate and turn overhead.

    .venv/bin/python bench/store_compare.py [--messages 2000] [--sessions 16] [--rounds 2] [--mails 60]

The PostgreSQL server is a throwaway cluster on this machine (tests/pgserver.py: fsync and
synchronous_commit on, as the store requires), or $MAILGATE_TEST_POSTGRES_URL. Each round gets a fresh
database (and a fresh SQLite file). Both stores answer `250` only after a durable commit.

1. Acceptance: 4 KB mails from parallel sessions (smtp-source when found, else the Python client), the
   runner parked, as bench/smtp_accept.py; the backends alternate, the best round of each is reported,
   with the gateway's CPU per mail and (PostgreSQL) the server's.
2. Turn overhead: one mail every `--pace` s through a fast sandbox, as bench/turn_overhead.py: 250 ->
   POST at the API and turn end -> reply at the relay.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    child,
    cpu_seconds,
    gateway_env,
    gateway_main,
    header,
    make_mail,
    ms,
    pct,
    peers_main,
    smtp_load,
    smtp_source,
    smtp_source_path,
    wait_until,
    workdir,
)

sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def postgres() -> Iterator[tuple[str, Any]]:
    """A server URL and the postmaster's pid (None for $MAILGATE_TEST_POSTGRES_URL)."""
    if url := os.environ.get("MAILGATE_TEST_POSTGRES_URL"):
        yield url, None
        return
    from tests.pgserver import running_postgres

    with running_postgres() as server:
        assert server.data_dir is not None
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        yield server.url, pid


def fresh_database(url: str) -> str:
    import psycopg
    from psycopg import sql

    from tests.pgserver import PostgresServer

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    return PostgresServer(url, "", 0, "", "", None).url_for(name)


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and its children (the PostgreSQL server's backends)."""
    if pid is None:
        return 0.0
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def accept_round(
    tmp: Path, database: str, args: argparse.Namespace, tool: str | None, tag: str, pg: Any
) -> dict[str, float]:
    env = gateway_env(tmp, "http://127.0.0.1:9", None, MAILGATE_DATABASE=database)
    with child(gateway_main, env, str(tmp / f"gateway-{tag}.log"), True) as gate:
        cpu0, server0 = cpu_seconds(gate.pid), tree_cpu(pg)
        if tool is not None:
            rate = args.messages / smtp_source(
                tool, gate.info, sessions=args.sessions, messages=args.messages, size=4096
            )
        else:
            mails = [(f"{tag}-{i}", make_mail(f"{tag}-{i}")) for i in range(args.messages)]
            load = smtp_load(gate.info, mails, args.sessions)
            if load.refused:
                raise RuntimeError(f"{load.refused} mails were refused")
            rate = load.rate
        return {
            "rate": rate,
            "cpu": (cpu_seconds(gate.pid) - cpu0) / args.messages,
            "server": (tree_cpu(pg) - server0) / args.messages,
            "batches": gate.call("stats")["batches"],
        }


def turn_round(tmp: Path, database: str, args: argparse.Namespace, tag: str) -> dict[str, list[float]]:
    with child(peers_main, 0.0, 15.0, str(tmp / f"peers-{tag}.log")) as peers:
        url, relay_port = peers.info
        env = gateway_env(tmp, url, relay_port, MAILGATE_DATABASE=database)
        with child(gateway_main, env, str(tmp / f"gateway-{tag}.log"), False) as gate:
            mails = [(f"{tag}-{i}", make_mail(f"{tag}-{i}")) for i in range(args.mails)]
            load = smtp_load(gate.info, mails, 1, keep_replies=True, pace=args.pace)
            n = load.sent
            wait_until(lambda: peers.call("counts")["relayed"] >= n, 60, f"{n} replies")
            records = peers.call("records")
    accepted = {t_tag: t for t, t_tag, _ in load.replies}
    posted = {}
    for t, task_id, seq, text in records["posts"]:
        posted[text.split("Please look at item ", 1)[1].split(".", 1)[0]] = (t, task_id, seq)
    relayed = {irt.strip("<>").split("@")[0]: t for t, irt in records["relayed"]}
    to_post, to_reply = [], []
    for m_tag, t250 in accepted.items():
        t_post, task_id, seq = posted[m_tag]
        to_post.append(t_post - t250)
        to_reply.append(relayed[m_tag] - records["ends"][(task_id, seq)])
    return {"post": to_post, "reply": to_reply}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="mails per acceptance round")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mails", type=int, default=60, help="mails for the turn overhead")
    parser.add_argument("--pace", type=float, default=0.1)
    parser.add_argument("--python-client", action="store_true", help="ignore smtp-source")
    args = parser.parse_args()
    tool = None if args.python_client else smtp_source_path()
    header("The store: SQLite vs PostgreSQL (same machine, same run)")
    print(f"   client: {tool or 'Python asyncio client (own process)'}; {args.sessions} sessions")
    with postgres() as (server_url, pg_pid), workdir() as tmp:
        accept: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgres": []}
        for r in range(args.rounds):
            for backend in ("sqlite", "postgres"):
                database = str(tmp / f"a{r}.db") if backend == "sqlite" else fresh_database(server_url)
                got = accept_round(
                    tmp, database, args, tool, f"{backend[0]}{r}", pg_pid if backend != "sqlite" else None
                )
                accept[backend].append(got)
                extra = f", server {got['server'] * 1e3:.2f} ms" if backend == "postgres" and pg_pid else ""
                print(
                    f"   acceptance round {r + 1} {backend:<8} {got['rate']:7.0f} mails/s   "
                    f"({args.messages / max(1, got['batches']):.1f} mails per commit; "
                    f"CPU per mail: gateway {got['cpu'] * 1e3:.2f} ms{extra})"
                )
        turns = {
            backend: turn_round(
                tmp,
                str(tmp / "t.db") if backend == "sqlite" else fresh_database(server_url),
                args,
                f"t{backend[0]}",
            )
            for backend in ("sqlite", "postgres")
        }
    best = {b: max(rounds, key=lambda x: x["rate"]) for b, rounds in accept.items()}
    print(f"   acceptance, best of {args.rounds}:")
    for b, got in best.items():
        print(f"     {b:<8} {got['rate']:7.0f} mails/s")
    print(f"     PostgreSQL / SQLite: {best['postgres']['rate'] / best['sqlite']['rate']:.2f}x")
    print(f"   turn overhead ({args.mails} mails, one every {args.pace:g} s):")
    for b, t in turns.items():
        print(
            f"     {b:<8} 250 -> POST p50 {ms(pct(t['post'], 50))} p99 {ms(pct(t['post'], 99))};  "
            f"turn end -> reply p50 {ms(pct(t['reply'], 50))} p99 {ms(pct(t['reply'], 99))}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
