"""Gateways that share a store: a reply reaching the other host continues its thread, the host-local spool
is made again when another host resumes a message, `mailgate migrate` and `mailgate copy`.

Gateways run in the test's loop against the sandbox and the recording relay; the CLI runs in a worker
thread (it has its own event loop), as in tests/test_cli.py.
"""

from __future__ import annotations

import email
import hashlib
import json
import logging
import os
import shutil
import time
from email.policy import default
from pathlib import Path
from typing import Any

import anyio
import pytest
from ulid import ULID

from mailgate import cli
from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from mailgate.store import Admitted, NewBounce, NewMessage, SqliteStore
from mailgate.store.schema import VERSION as SQLITE_VERSION
from tests.conftest import both_stores, settings_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


def gateway(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, name: str, **env: str) -> Gateway:
    """A gateway with its own spool (a host of its own), on the store `env` names."""
    env = {"MAILGATE_SPOOL_DIR": str(tmp_path / name / "spool"), **env}
    settings = settings_for(tmp_path, sandbox.url, relay.port, **env)
    return Gateway(settings, poll_base=0.05, retry_base=0.05, settle_seconds=0.2, shutdown_deadline=2.0)


def reply_to(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=default)["Reply-To"])


async def test_a_reply_to_one_host_continues_the_thread_on_the_other(
    tmp_path: Path, postgres_db: str, sandbox: RunningSandbox, relay: RecordingRelay
) -> None:
    """Two gateways on one PostgreSQL, no MAILGATE_SECRET: a token minted by one is honoured by the other,
    and the reply becomes the next turn of the same task."""
    shared = {"MAILGATE_DATABASE": postgres_db, "MAILGATE_SECRET": ""}  # the secret lives in the database
    async with (
        gateway(tmp_path, sandbox, relay, "a", **shared) as one,
        gateway(tmp_path, sandbox, relay, "b", **shared) as two,
    ):
        first = make_mail(subject="Across hosts", body="First question")
        assert (await smtp_send(one.smtp_port, first)).accepted
        [(_, _, answer)] = await relay.wait_for(1, timeout=15)
        token_address = reply_to(answer)
        follow = make_mail(to=token_address, subject="Re: Across hosts", body="Second question")
        seen = await smtp_send(two.smtp_port, follow, rcpts=[token_address])
        assert seen.accepted, seen
        await relay.wait_for(2, timeout=15)
    [task_id] = {r.task_id for r in sandbox.state.requests}
    turns = sandbox.state.turns_of(task_id)
    assert ["First question" in turns[0].input, "Second question" in turns[1].input] == [True, True]


@both_stores
async def test_a_message_whose_spool_is_gone_is_spooled_again_from_the_raw_mail(
    make_gateway: Any, tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, caplog: Any
) -> None:
    """A queued message's files are not in this host's spool (another host prepared it): the gateway makes
    them again from the raw message and uploads the same bytes."""
    caplog.set_level(logging.INFO, logger="mailgate")
    data = os.urandom(50_000)
    sandbox.state.faults.push(status=409, times=10_000, path="POST /api/tasks")  # nothing gets posted
    async with make_gateway() as gw:
        mail = make_mail(body="Read this", attachments=[("data.bin", "application/octet-stream", data)])
        assert (await smtp_send(gw.smtp_port, mail)).accepted

        async def queued() -> bool:
            rows = await gw.store.list_inbound()
            return len(rows) == 1 and rows[0].state == "queued" and rows[0].attempts >= 1

        await until(queued, timeout=15, what="the message prepared and waiting for the API")
        [row] = await gw.store.list_inbound()
        shutil.rmtree(tmp_path / "spool")  # as on a host that never spooled it
        sandbox.state.faults.clear()
        gw.scheduler.wake()
        await relay.wait_for(1, timeout=15)
    [request] = sandbox.state.requests
    assert [f.sha256 for f in request.files] == [hashlib.sha256(data).hexdigest()]
    assert [r.getMessage() for r in caplog.records].count("turn_respooled") == 1
    assert row.files is not None and str(tmp_path) not in row.files  # paths relative to the spool


# --- mailgate migrate ---------------------------------------------------------------------------------


def env_file(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, database: str) -> Path:
    values = {
        "HANDINGER_BASE_URL": sandbox.url,
        "MAILGATE_DOMAIN": "agents.example.com",
        "MAILGATE_WORKERS": "research=wrk_research",
        "MAILGATE_ALLOWED_SENDERS": "@example.org",
        "MAILGATE_AUTH": "none",
        "MAILGATE_DATABASE": database,
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay.port}",
        "MAILGATE_LOG_LEVEL": "ERROR",
    }
    path = tmp_path / "mailgate.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


async def mailgate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@both_stores
async def test_migrate_brings_a_new_store_to_the_current_version_once(
    tmp_path: Path, database: str, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """`mailgate migrate` creates the schema, says so, and the second run finds nothing to do."""
    env = env_file(tmp_path, sandbox, relay, database)
    code, out, _ = await mailgate(capsys, "migrate", "--env-file", str(env))
    assert code == 0
    assert "migrated from version 0 to" in out
    code, out, _ = await mailgate(capsys, "migrate", "--env-file", str(env))
    assert code == 0 and "already at version" in out
    assert "postgresql://" in out or f"already at version {SQLITE_VERSION}" in out


@both_stores
async def test_status_names_the_store_without_its_password(
    tmp_path: Path, database: str, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """`mailgate status` on either store: the store named as `check` names it (a PostgreSQL URL without
    its password), and on a shared store no lock-file guess at whether "the" gateway runs."""
    env = env_file(tmp_path, sandbox, relay, database)
    assert (await mailgate(capsys, "migrate", "--env-file", str(env)))[0] == 0
    code, out, _ = await mailgate(capsys, "status", "--json", "--env-file", str(env))
    assert code == 0
    found = json.loads(out)
    if database.startswith("postgresql://"):
        assert found["database"].startswith("postgresql://")
        assert found["gateway"] == {"running": None, "pid": None}
        code, out, _ = await mailgate(capsys, "status", "--env-file", str(env))
        assert "gateway (a shared store: see each host)" in out
    else:
        assert found["gateway"] == {"running": False, "pid": None}


async def test_migrate_against_an_unreachable_database_exits_3(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """A database nobody answers for is a start-up failure (exit 3), and the password is not shown."""
    pytest.importorskip("psycopg")
    from tests.test_crash import free_port

    url = f"postgresql://mailgate:hunter2secret@127.0.0.1:{free_port()}/mailgate?connect_timeout=2"
    code, _, err = await mailgate(
        capsys, "migrate", "--env-file", str(env_file(tmp_path, sandbox, relay, url))
    )
    assert code == 3
    assert "unusable" in err and "hunter2secret" not in err and "mailgate:***@" in err


# --- mailgate copy --------------------------------------------------------------------------------------


def bounce_report(outbox_id: str, *, limit: int) -> Admitted:
    """A bounce report (recorded `ignored`) telling of a hard bounce of the reply `outbox_id` to bob."""
    raw = b"From: MAILER-DAEMON@example.org\r\nSubject: Undelivered\r\n\r\nno such user\r\n"
    queue_id, now = str(ULID()), time.time()
    report = NewMessage(
        id=queue_id,
        raw_id=queue_id,
        received_at=now,
        mail_from="",
        rcpt="research+bounce-x@agents.example.com",
        alias="research",
        sender=None,
        message_id=None,
        subject="Undelivered",
        dedupe_key=f"bounce-{queue_id}",
        state="ignored",
        reason="bounce",
    )
    bounce = NewBounce(outbox_id, "bob@example.org", "5.1.1", "smtp; 550 5.1.1 no such user", True)
    return Admitted(
        raw_id=queue_id,
        sha256=hashlib.sha256(raw).hexdigest(),
        data=raw,
        messages=[report],
        bounces=[(queue_id, bounce)],
        received_at=now,
        bounce_limit=limit,
    )


async def test_copy_moves_a_gateway_to_postgresql_and_its_threads_continue(
    tmp_path: Path, postgres_db: str, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """Messages, tasks, participants, thread ids, the outbox, bounces, the suppression list and the secret
    are copied: every row reads back the same (new bounces number after the copied ones), and a reply to
    a token minted on SQLite continues its task on PostgreSQL."""
    sqlite_path = tmp_path / "old.db"
    old = {"MAILGATE_DATABASE": str(sqlite_path), "MAILGATE_SECRET": ""}
    async with gateway(tmp_path, sandbox, relay, "old", **old) as gw:
        for n in range(3):
            assert (await smtp_send(gw.smtp_port, make_mail(subject=f"Before {n}", body=f"Old {n}"))).accepted
        await relay.wait_for(3, timeout=15)

        async def all_sent() -> bool:
            return [r.state for r in await gw.store.list_outbox()] == ["sent"] * 3

        await until(all_sent, timeout=15, what="the replies recorded as sent")
        before = {
            "inbound": await gw.store.list_inbound(),
            "outbox": await gw.store.list_outbox(),
            "tasks": await gw.store.list_tasks(),
        }
        raws = {r.raw_id: await gw.store.raw(r.raw_id) for r in before["inbound"]}
        participants = {t.id: await gw.store.participants(t.id) for t in before["tasks"]}
        secret = await gw.store.secret()
    old_store = await SqliteStore.open(sqlite_path)  # a reply bounced twice: its address is suppressed
    try:
        bounced = before["outbox"][0].id
        for _ in range(2):
            await old_store.admit(bounce_report(bounced, limit=2))
        before["inbound"] = await old_store.list_inbound()
        before["outbox"] = await old_store.list_outbox()
        bounces = await old_store.bounces_of([bounced])
        suppressed = await old_store.suppressed()
        assert len(bounces) == 2 and [s.addr for s in suppressed] == ["bob@example.org"]
        raws |= {r.raw_id: await old_store.raw(r.raw_id) for r in before["inbound"]}
    finally:
        await old_store.close()

    code, out, err = await mailgate(capsys, "copy", "--from", str(sqlite_path), "--to", postgres_db)
    assert code == 0, err
    assert "inbound" in out and "raw_message" in out

    from mailgate.store.postgres import PostgresStore

    store = await PostgresStore.open(postgres_db)
    try:
        assert await store.list_inbound() == before["inbound"]
        assert await store.list_outbox() == before["outbox"]
        assert await store.list_tasks() == before["tasks"]
        assert {raw_id: await store.raw(raw_id) for raw_id in raws} == raws
        assert {t: await store.participants(t) for t in participants} == participants
        assert await store.secret() == secret
        assert await store.bounces_of([bounced]) == bounces
        assert await store.suppressed() == suppressed
        await store.admit(bounce_report(bounced, limit=2))  # the next bounce id follows the copied ones
        assert [b.id for b in await store.bounces_of([bounced])] == [
            *(b.id for b in bounces),
            bounces[-1].id + 1,
        ]
    finally:
        await store.close()

    code, _, err = await mailgate(capsys, "copy", "--from", str(sqlite_path), "--to", postgres_db)
    assert code == 2 and "already holds" in err  # never merged into a database in use

    new = {"MAILGATE_DATABASE": postgres_db, "MAILGATE_SECRET": ""}
    token_address = reply_to(relay.messages[0][2])
    async with gateway(tmp_path, sandbox, relay, "new", **new) as gw:
        follow = make_mail(to=token_address, subject="Re: Before", body="After the move")
        assert (await smtp_send(gw.smtp_port, follow, rcpts=[token_address])).accepted
        await relay.wait_for(4, timeout=15)
    [continued] = [r for r in sandbox.state.requests if "After the move" in r.input]
    assert len(sandbox.state.turns_of(continued.task_id)) == 2


@pytest.mark.parametrize(
    ("source", "target", "code", "says"),
    [
        ("missing.db", "postgresql://mailgate@127.0.0.1:1/x", 2, "no such file"),
        ("present.db", "/var/lib/other.db", 2, "--to must be a postgresql:// URL"),
        ("present.db", "postgresql://mailgate@127.0.0.1:{port}/x?connect_timeout=2", 3, "cannot copy"),
    ],
)
async def test_copy_refuses_what_it_cannot_do(
    tmp_path: Path, capsys: Any, source: str, target: str, code: int, says: str
) -> None:
    """No source file or no PostgreSQL URL is a usage error (2); an unreachable database exit 3."""
    pytest.importorskip("psycopg")
    from mailgate.store import SqliteStore
    from tests.test_crash import free_port

    await (await SqliteStore.open(tmp_path / "present.db")).close()
    argv = ["copy", "--from", str(tmp_path / source), "--to", target.format(port=free_port())]
    got, _, err = await mailgate(capsys, *argv)
    assert (got, says in err) == (code, True), err
