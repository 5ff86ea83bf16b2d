"""Two `mailgate serve` processes on one PostgreSQL database, one SIGKILLed mid-run (issue 17).

200 mails are split between the two gateways as two equal-preference MX hosts would see them (a sender
falls back to the other host when one does not answer), some of them replies that continue a task
across hosts. One gateway is killed while it holds work. The sandbox API and the recording relay run
in the test's own loop, so they outlive the kill and are where the outcome is checked: one turn per
mail, one reply Message-ID per mail, each task's turns in mail order, and the dead gateway's work
taken over within the lease time.
"""

from __future__ import annotations

import asyncio
import email
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from tests.conftest import DOMAIN
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay
from tests.test_crash import daemon, free_port, write_env

psycopg = pytest.importorskip("psycopg")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

MAILS = 200
LEASE = 3.0  # MAILGATE_LEASE_SECONDS for both gateways
SENDERS = 8  # parallel SMTP clients
KILL_AFTER = 90  # mails accepted before the kill...
KILL_HOLDING = 6  # ...and the victim holding at least this many messages
# Threads that cross hosts: mail n + 100 replies to mail n, mail n + 150 to mail n + 100 (n < 10), and
# consecutive mails of a thread go to different gateways first.
PARENT = {n + 100: n for n in range(10)} | {n + 150: n + 100 for n in range(10)}


def marker(n: int) -> str:
    return f"twogw-{n:03d}"


def number_in(text: str | bytes) -> int:
    data = text.encode() if isinstance(text, str) else text
    return int(data.split(b"twogw-", 1)[1][:3])


def in_reply_to(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=default)["In-Reply-To"])


def build_mails() -> list[EmailMessage]:
    mails: list[EmailMessage] = []
    for n in range(MAILS):
        if n in PARENT:
            chain = []
            p: int | None = PARENT[n]
            while p is not None:
                chain.insert(0, str(mails[p]["Message-ID"]))
                p = PARENT.get(p)
            root = mails[PARENT.get(PARENT[n], PARENT[n])]
            mail = make_mail(
                subject=f"Re: {root['Subject']}",  # the marker is in the body only: it names one mail
                body=f"And then {marker(n)}, please.",
                in_reply_to=chain[-1],
                references=chain,
            )
        else:
            mail = make_mail(subject=f"Two gateways, question {n}", body=f"Question {marker(n)}, please.")
        mails.append(mail)
    return mails


def gateway_env(tmp: Path, name: str, url: str, api: str, relay_port: int, smtp_port: int) -> dict[str, str]:
    (tmp / name).mkdir()
    return {
        "HANDINGER_BASE_URL": api,
        "HANDINGER_API_KEY": "test-key",
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "@example.org",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": f"127.0.0.1:{smtp_port}",
        "MAILGATE_DATABASE": url,
        "MAILGATE_LEASE_SECONDS": str(LEASE),
        "MAILGATE_SPOOL_DIR": str(tmp / name / "spool"),  # each host's own
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay_port}",
        "MAILGATE_SECRET": "two-gateways-secret-0123456789",
        "MAILGATE_MAX_NEW_TASKS_PER_HOUR": "1000",
        "MAILGATE_MAX_NOTICES_PER_DAY": "1000",
        "MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR": "1000",  # one sender, hundreds of mails
        "MAILGATE_MAX_REPLIES_PER_MINUTE": "100000",
    }


@pytest.fixture
async def sandbox_turns() -> AsyncIterator[RunningSandbox]:
    """The sandbox, each turn working for 0.6 s (a few for 1 s)."""
    async with run_sandbox(SandboxOptions(api_key="test-key", turn_seconds=0.6)) as sb:
        yield sb


def gateway_pids(pid: int) -> set[int]:
    """`mailgate serve`'s process id and its children's (the runner process, MAILGATE_RUNNER=process)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {pid, *map(int, f.read().split())}
    except OSError:
        return {pid}


async def held_by(conn: Any, pids: set[int]) -> dict[str, set[str]]:
    """The inbound and outbox rows whose lease a gateway process (one of `pids`) holds."""
    held: dict[str, set[str]] = {}
    for table in ("inbound", "outbox"):
        cur = await conn.execute(
            f"SELECT id FROM {table} WHERE lease_until IS NOT NULL "  # noqa: S608
            "AND split_part(lease_owner, ':', 2)::int = ANY(%s)",
            [sorted(pids)],
        )
        held[table] = {r[0] for r in await cur.fetchall()}
    return held


async def rows_left(conn: Any) -> str:
    """Every unfinished row, for a failure's message."""
    lines = []
    for sql in (
        "SELECT 'inbound', id, state, attempts, next_attempt_at - extract(epoch FROM now()), lease_owner, "
        "lease_until - now(), last_error FROM inbound WHERE state NOT IN ('answered', 'failed', 'ignored')",
        "SELECT 'outbox', id, state, attempts, next_attempt_at - extract(epoch FROM now()), lease_owner, "
        "lease_until - now(), last_error FROM outbox WHERE state <> 'sent'",
        "SELECT 'leased', id, state, attempts, next_attempt_at - extract(epoch FROM now()), lease_owner, "
        "lease_until - now(), last_error FROM inbound WHERE lease_until IS NOT NULL",
        "SELECT 'leased', id, state, attempts, next_attempt_at - extract(epoch FROM now()), lease_owner, "
        "lease_until - now(), last_error FROM outbox WHERE lease_until IS NOT NULL",
    ):
        cur = await conn.execute(sql)
        lines += [" ".join(map(str, row)) for row in await cur.fetchall()]
    return "\n".join(lines) or "(no unfinished rows)"


@pytest.mark.timeout(120)
async def test_two_gateways_one_killed_every_mail_answered_once(
    tmp_path: Path, postgres_db: str, sandbox_turns: RunningSandbox, relay: RecordingRelay
) -> None:
    """200 mails over two gateways on one PostgreSQL, one SIGKILLed mid-run: each mail gets exactly one
    turn and one reply, threads stay in order across hosts, and the survivor takes over within the lease."""
    sandbox = sandbox_turns
    started = time.monotonic()
    ports = [free_port(), free_port()]
    envs = [
        write_env(
            tmp_path / f"{name}.env", gateway_env(tmp_path, name, postgres_db, sandbox.url, relay.port, port)
        )
        for name, port in zip(("a", "b"), ports, strict=True)
    ]
    mails = build_mails()
    number = {str(m["Message-ID"]): n for n, m in enumerate(mails)}

    seen: list[int] = []  # the mail each reply at the relay answers, parsed once each

    def answered(relay: RecordingRelay) -> set[int]:
        """The mails the relay has a reply to (by the reply's In-Reply-To)."""
        for _, _, data in relay.messages[len(seen) :]:
            seen.append(number.get(in_reply_to(data), -1))
        return set(seen) - {-1}

    accepted: dict[int, int] = {}  # mail -> the port that accepted it
    done_sending = {n: asyncio.Event() for n in range(MAILS)}
    killed_at = 0.0
    dead: set[int] = set()

    async with (
        daemon(envs[0], tmp_path / "a") as survivor,
        daemon(envs[1], tmp_path / "b") as victim,
        await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as db,
    ):
        await survivor.start()
        await until(
            lambda: survivor.listening(ports[0]), timeout=30, what="gateway a to listen"
        )  # it migrates
        await victim.start()
        await until(lambda: victim.listening(ports[1]), timeout=30, what="gateway b to listen")

        async def send(n: int) -> None:
            if n in PARENT:  # a reply is written after the mail it answers arrived
                await done_sending[PARENT[n]].wait()
            order = [ports[n % 2], ports[1 - n % 2]]
            deadline = time.monotonic() + 30
            while n not in accepted:
                for port in order:  # as a sending MTA does with two MX hosts of equal preference
                    if port in dead:
                        continue
                    try:
                        if (await smtp_send(port, mails[n])).accepted:
                            accepted[n] = port
                            break
                    except (aiosmtplib.SMTPException, OSError):
                        continue
                else:
                    assert time.monotonic() < deadline, f"mail {n} never accepted"
                    await asyncio.sleep(0.2)  # both refused: an MTA's queue would retry later
            done_sending[n].set()

        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(MAILS):
            queue.put_nowait(n)

        async def sender() -> None:
            while not queue.empty():
                await send(queue.get_nowait())

        senders = [asyncio.create_task(sender()) for _ in range(SENDERS)]

        async def victim_busy() -> bool:
            if len(accepted) < KILL_AFTER:
                return False
            assert victim.proc is not None
            return len((await held_by(db, gateway_pids(victim.proc.pid)))["inbound"]) >= KILL_HOLDING

        t_up = time.monotonic() - started
        await until(victim_busy, timeout=40, what="the victim to hold work")
        t_kill = time.monotonic() - started
        assert victim.proc is not None
        victim_pids = gateway_pids(victim.proc.pid)  # the runner process dies with its listener
        await victim.signal(signal.SIGKILL)
        killed_at = time.time()
        dead.add(ports[1])
        held = await held_by(db, victim_pids)  # the dead gateway's leases, as it left them
        assert len(held["inbound"]) >= KILL_HOLDING

        taken_over: dict[str, float] = {}

        async def all_taken_over() -> bool:
            still = await held_by(db, victim_pids)
            for row_id in held["inbound"] - still["inbound"]:
                taken_over.setdefault(row_id, time.time() - killed_at)
            return not still["inbound"] and not still["outbox"]

        try:
            await until(
                all_taken_over, timeout=LEASE + 10, what="the survivor to take the dead gateway's work"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await rows_left(db)}\n{survivor.log_tail(60)}") from None
        await asyncio.gather(*senders)
        t_sent = time.monotonic() - started
        try:
            await until(lambda: len(answered(relay)) >= MAILS, timeout=40, what="a reply to every mail")
            t_replied = time.monotonic() - started
            await sandbox.state.wait_idle()
        except AssertionError as exc:
            left = await rows_left(db)
            got = answered(relay)
            raise AssertionError(
                f"{exc}\nno reply for {sorted(set(range(MAILS)) - got)}\n{left}\n{survivor.log_tail(80)}"
            ) from None
        cur = await db.execute(
            "SELECT id, state, updated_at FROM inbound WHERE id = ANY(%s::text[])", [sorted(held["inbound"])]
        )
        resumed = await cur.fetchall()
        cur = await db.execute("SELECT state, count(*) FROM inbound GROUP BY state")
        states = dict(await cur.fetchall())
        t_idle = time.monotonic() - started
        assert await survivor.signal(signal.SIGTERM) == 0, survivor.log_tail()
        t_stop = time.monotonic() - started

    assert sorted(accepted) == list(range(MAILS))
    assert states == {"answered": MAILS}
    # the sandbox: exactly one turn per mail, none twice, all completed
    turns = Counter(number_in(t.input) for task in sandbox.state.tasks.values() for t in task.turns)
    assert turns == Counter(range(MAILS)), f"turns per mail: {turns - Counter(range(MAILS))}"
    assert all(t.status == "completed" for task in sandbox.state.tasks.values() for t in task.turns)
    assert len(sandbox.state.requests) == MAILS
    # each task's turns in the order of its mails, though its mails reached different hosts
    threads = [[number_in(t.input) for t in task.turns] for task in sandbox.state.tasks.values()]
    assert sorted(t for t in threads if len(t) > 1) == [[n, n + 100, n + 150] for n in range(10)]
    # the relay: one reply Message-ID per mail; the same bytes again only for a send the kill cut
    ids: dict[int, set[str]] = {}
    deliveries = Counter[str]()
    for _, _, data in relay.messages:
        reply = email.message_from_bytes(data, policy=default)
        n = number[str(reply["In-Reply-To"])]
        assert number_in(data) == n  # the reply quotes the mail it answers
        ids.setdefault(n, set()).add(str(reply["Message-ID"]))
        deliveries[str(reply["Message-ID"])] += 1
    assert sorted(ids) == list(range(MAILS))
    assert all(len(v) == 1 for v in ids.values()), {n: v for n, v in ids.items() if len(v) > 1}
    resends = sum(deliveries.values()) - len(deliveries)
    assert resends <= len(held["outbox"])
    # the survivor took every held message over once the lease ran out, and finished it
    assert [row[1] for row in resumed] == ["answered"] * len(held["inbound"])
    assert max(taken_over.values()) <= LEASE + 2.5, taken_over  # the lease, then a loaded scheduler's turn
    finished = max(row[2] for row in resumed) - killed_at
    shared = {port: sum(1 for p in accepted.values() if p == port) for port in ports}
    print(
        f"\ntwo gateways: {MAILS} mails ({shared[ports[0]]} via a, {shared[ports[1]]} via b), b killed "
        f"holding {len(held['inbound'])} messages and {len(held['outbox'])} replies; taken over "
        f"{min(taken_over.values()):.2f}-{max(taken_over.values()):.2f} s after the kill "
        f"(lease {LEASE:g} s), the last finished {finished:.2f} s after; {sum(turns.values())} turns, "
        f"{len(deliveries)} reply ids, "
        f"{resends} resends; {time.monotonic() - started:.1f} s in all (up {t_up:.1f}, kill {t_kill:.1f}, "
        f"sent {t_sent:.1f}, replied {t_replied:.1f}, idle {t_idle:.1f}, stopped {t_stop:.1f})"
    )
