"""The operator verbs, called as `mailgate.cli.main([...])` against a database a real gateway filled.

`main` runs its own event loop (`asyncio.run`), so each call runs in a worker thread while the sandbox
keeps serving in the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from mailgate import cli
from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from mailgate.store import Admitted, NewMessage, SqliteStore
from tests.conftest import settings_for
from tests.daemon import clean_environ
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


def env_file_for(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay) -> Path:
    values: Mapping[str, str] = {
        "HANDINGER_BASE_URL": sandbox.url,
        "HANDINGER_API_KEY": "test-key",
        "MAILGATE_DOMAIN": "agents.example.com",
        "MAILGATE_WORKERS": "research=wrk_research,writer=wrk_writer:low",
        "MAILGATE_ALLOWED_SENDERS": "@example.org,boss@example.net",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": "127.0.0.1:0",
        "MAILGATE_DATABASE": str(tmp_path / "mailgate.db"),
        "MAILGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay.port}",
        "MAILGATE_SECRET": "test-secret-0123456789abcdef",
        "MAILGATE_LOG_LEVEL": "ERROR",
    }
    path = tmp_path / "mailgate.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


async def run(capsys: pytest.CaptureFixture[str], env: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, [*argv, "--env-file", str(env)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
async def filled(tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay) -> dict[str, Any]:
    """One answered message and one failed one (the API said 422), with their outbox rows."""
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        good = await smtp_send(gw.smtp_port, make_mail(subject="Good one", body="Answer me"))
        bad = await smtp_send(
            gw.smtp_port, make_mail(subject="Bad one", body="Refuse me [sandbox:status=422 times=1]")
        )
        assert good.data is not None and bad.data is not None
        ids = {"good": good.data[1].rsplit(" ", 1)[1], "bad": bad.data[1].rsplit(" ", 1)[1]}
        await relay.wait_for(2, timeout=15)

        async def settled() -> bool:
            rows = await gw.store.list_outbox()
            return len(rows) == 2 and all(r.state == "sent" for r in rows)

        await until(settled, what="both outbox rows sent")
        good_row = await gw.store.inbound(ids["good"])
        assert good_row is not None
        ids["task"] = str(good_row.task_id)
        ids["outbox"] = (await gw.store.outbox_for(ids["good"]))[0].id
        ids["message_id"] = str(good_row.message_id)
        ids["reply_message_id"] = (await gw.store.outbox_for(ids["good"]))[0].message_id
        ids["url"] = str((await gw.store.task_row(ids["task"])).url)  # type: ignore[union-attr]
    return ids


async def test_messages_lists_by_state_readably_and_as_json(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`messages` prints a table with a header; `--state failed` filters; `--json` is one object a line."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "messages")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["RECEIVED", "ID", "STATE", "SENDER"]
    assert len(lines) == 3 and filled["good"] in out and filled["bad"] in out
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines[1:])

    code, out, _ = await run(capsys, env, "messages", "--state", "failed", "--json")
    assert code == 0
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["id"] == filled["bad"]
    assert row["state"] == "failed"
    assert row["reason"] == "API 422: sandbox directive: HTTP 422"
    assert row["attempts"] == 1

    code, out, _ = await run(capsys, env, "messages", "--state", "queued")
    assert (code, out.strip()) == (0, "(none)")


async def test_outbox_and_tasks_list(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`outbox` lists the reply and the notice with their Message-IDs; `tasks` lists both tasks."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "outbox", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["kind"] for r in rows) == ["answer", "notice"]
    assert all(r["state"] == "sent" and r["message_id"].endswith("@agents.example.com>") for r in rows)
    assert all("data" not in r for r in rows)

    code, out, _ = await run(capsys, env, "tasks")
    assert code == 0
    assert filled["task"] in out and "Good one" in out and "Bad one" in out


async def test_show_a_message_with_headers_states_errors_and_task_link(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`show` of a message: its headers, state, attempts, errors, its outbox rows; a task shows its link."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "show", filled["bad"], "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["inbound"]["state"] == "failed"
    assert shown["inbound"]["attempts"] == 1
    assert "Subject: Bad one" in shown["headers"]
    assert [o["notice"] for o in shown["outbox"]] == ["api_rejected"]

    code, out, _ = await run(capsys, env, "show", filled["good"])
    assert code == 0
    assert "== inbound" in out and "== headers" in out and "== outbox" in out
    assert any(line.split() == ["state", "answered"] for line in out.splitlines())
    assert f"/dashboard/tasks/{filled['task']}" in out  # the task link
    assert "  Subject: Good one" in out

    code, out, _ = await run(capsys, env, "show", filled["task"])
    assert code == 0
    assert f"/dashboard/tasks/{filled['task']}" in out
    assert "alice@example.org" in out

    code, out, _ = await run(capsys, env, "show", filled["outbox"], "--json")
    assert code == 0 and json.loads(out)["outbox"]["state"] == "sent"

    code, _, err = await run(capsys, env, "show", "nope")
    assert code == 1 and "no message, outbox row, task or Message-ID nope" in err


async def test_replay_requeues_only_failed_messages(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`replay` queues a failed message again (a gateway then answers it); an answered one is refused."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "replay", filled["bad"])
    assert code == 0 and "queued again" in out
    code, _, err = await run(capsys, env, "replay", filled["good"])
    assert code == 1 and "not a failed" in err

    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:

        async def answered() -> bool:
            row = await gw.store.inbound(filled["bad"])
            return row is not None and row.state == "answered"

        await until(answered, what="the replayed message answered")
        await relay.wait_for(3, timeout=15)
    assert sum("Refuse me" in r.input for r in sandbox.state.requests) == 1


async def test_archive_deletes_the_task_at_the_api(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`archive` sends DELETE /api/tasks/{id}; the sandbox archives it and the store remembers."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "archive", filled["task"])
    assert (code, out.strip()) == (0, f"{filled['task']}: archived")
    assert sandbox.state.tasks[filled["task"]].archived
    code, out, _ = await run(capsys, env, "show", filled["task"], "--json")
    assert json.loads(out)["task"]["archived"] is True


async def test_archive_reports_an_api_failure(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """An API that answers 503 to the DELETE: exit 1 with the reason, the task not marked archived."""
    env = env_file_for(tmp_path, sandbox, relay)
    sandbox.state.faults.push(status=503, times=1, path="DELETE /api/tasks/*")
    code, _, err = await run(capsys, env, "archive", filled["task"])
    assert code == 1 and "503" in err
    assert not sandbox.state.tasks[filled["task"]].archived


async def test_a_bad_env_file_exits_78_naming_only_the_keys_the_verbs_use(
    tmp_path: Path, capsys: Any
) -> None:
    """The operator verbs validate the keys they read (every bad one named) and ignore the gateway's."""
    env = tmp_path / "bad.env"
    env.write_text("MAILGATE_DOMAIN=not a domain\nMAILGATE_LOG_LEVEL=LOUD\nMAILGATE_METRICS_LISTEN=nowhere\n")
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, ["messages", "--env-file", str(env)])
    err = capsys.readouterr().err
    assert code == 78
    assert "MAILGATE_LOG_LEVEL" in err and "MAILGATE_METRICS_LISTEN" in err
    assert "MAILGATE_DOMAIN" not in err and "MAILGATE_WORKERS" not in err


ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_bare_mailgate_prints_the_help(capsys: Any) -> None:
    """`mailgate` alone lists what it can do (exit 2: no verb was given)."""
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mailgate")
    assert all(verb in out for verb in ("serve", "check", "messages", "status", "show", "replay"))


def test_state_values_are_checked_and_listed_in_help(capsys: Any) -> None:
    """`--state bogus` is a usage error naming the choices; `--help` lists every state."""
    assert cli.main(["messages", "--state", "bogus"]) == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    assert cli.main(["messages", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "received, queued, submitting, running, answered, ignored, failed" in out
    assert cli.main(["outbox", "--help"]) == 0
    assert "pending, retry, sent, dead" in " ".join(capsys.readouterr().out.split())
    assert cli.main(["tasks", "--limit", "0"]) == 2


async def test_show_finds_a_message_or_a_reply_by_its_message_id(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """The Message-ID of a received mail (brackets or not) shows that message; a reply's shows the reply."""
    env = env_file_for(tmp_path, sandbox, relay)
    for wanted in (filled["message_id"], filled["message_id"].strip("<>")):
        code, out, _ = await run(capsys, env, "show", wanted, "--json")
        assert code == 0 and json.loads(out)["inbound"]["id"] == filled["good"]
    code, out, _ = await run(capsys, env, "show", filled["reply_message_id"], "--json")
    shown = json.loads(out)
    assert code == 0 and shown["outbox"]["id"] == filled["outbox"]
    assert shown["inbound"]["id"] == filled["good"]
    code, _, err = await run(capsys, env, "show", "<nobody@nowhere.example>")
    assert code == 1 and "<nobody@nowhere.example>" in err


async def test_tables_show_times_recipients_the_relays_answer_task_status_and_whole_urls(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`outbox` has a time, the recipients and the relay's answer; `tasks` has status, turns, archived,
    created and the whole URL."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "outbox")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["CREATED", "ID", "STATE", "KIND", "RECIPIENTS", "ATTEMPTS", "ANSWER"]
    assert len(rows) == 2 and all(ISO.match(r) and "alice@example.org" in r for r in rows)
    assert all("250 2.0.0 Ok: queued as" in r for r in rows)
    assert any(" api_rejected " in r for r in rows) and any(" answer " in r for r in rows)

    code, out, _ = await run(capsys, env, "tasks")
    header, *rows = out.splitlines()
    assert header.split() == [
        "CREATED", "ID", "ALIAS", "OWNER", "STATUS", "TURNS", "ARCHIVED", "SUBJECT", "URL"
    ]  # fmt: skip
    [good] = [r for r in rows if filled["task"] in r]
    assert ISO.match(good) and " answered " in good and " no " in good
    assert good.endswith(filled["url"]) and len(filled["url"]) > 60
    assert any(" failed " in r for r in rows)


async def test_json_outputs_are_parsed_and_typed(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`--json`: times are ISO-8601 UTC with Z (null when unset), flags booleans, nested values JSON."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, _ = await run(capsys, env, "messages", "--json")
    assert code == 0
    messages = {m["id"]: m for m in map(json.loads, out.splitlines())}
    good = messages[filled["good"]]
    assert ISO.fullmatch(good["received_at"]) and ISO.fullmatch(good["updated_at"])
    assert good["next_attempt_at"] is None
    assert good["new_task"] is True and isinstance(good["attempts"], int)
    assert good["files"] == [] and good["skipped"] == [] and good["to_cc"] == ["research@agents.example.com"]
    assert good["turn_status"] == "completed" and good["in_reply_to"] == []

    code, out, _ = await run(capsys, env, "outbox", "--json")
    assert code == 0
    for row in map(json.loads, out.splitlines()):
        assert row["recipients"] == ["alice@example.org"] and row["refused"] is None
        assert ISO.fullmatch(row["created_at"]) and ISO.fullmatch(row["sent_at"])
        assert row["relay_reply"].startswith("250 ") and row["last_error"] is None

    code, out, _ = await run(capsys, env, "tasks", "--json")
    assert code == 0
    tasks = {t["id"]: t for t in map(json.loads, out.splitlines())}
    task = tasks[filled["task"]]
    assert task["archived"] is False and task["turns"] == 1 and task["status"] == "answered"
    assert ISO.fullmatch(task["created_at"]) and task["url"] == filled["url"]

    code, out, _ = await run(capsys, env, "show", filled["task"], "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["participants"] == ["alice@example.org"]
    assert shown["messages"][0]["new_task"] is True


async def test_archive_of_an_unknown_task_exits_1(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """Neither here nor at the API: exit 1, saying so."""
    env = env_file_for(tmp_path, sandbox, relay)
    code, out, err = await run(capsys, env, "archive", "tsk_nonexistent")
    assert code == 1 and out == ""
    assert "tsk_nonexistent: not archived (no such task here or at the API)" in err


async def test_status_shows_the_queue_the_hold_and_the_last_problems(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, filled: dict[str, Any], capsys: Any
) -> None:
    """`status`: rows per state, nothing waiting, the hold a gateway recorded and why, the failed message;
    `--json` the same as typed JSON."""
    env = env_file_for(tmp_path, sandbox, relay)
    store = await SqliteStore.open(tmp_path / "mailgate.db")
    await store.set_api_hold(
        time.time() - 90, "POST /api/tasks: HTTP 401 (the API key is missing, wrong or revoked)"
    )
    await store.close()

    code, out, _ = await run(capsys, env, "status")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) <= 24  # one screen
    assert lines[0].endswith("gateway not running")
    assert (
        "inbound   received 0  queued 0  submitting 0  running 0  answered 1  ignored 0  failed 1  held 0"
        in lines
    )
    assert "outbox    pending 0  retry 0  sent 2  dead 0  bounced 0" in lines
    assert "oldest    nothing waiting" in lines and "running   0 turn(s)" in lines
    assert any(x.startswith("api hold  since ") and "HTTP 401" in x for x in lines)
    assert any(filled["bad"] in x and "failed" in x and "API 422" in x for x in lines)

    code, out, _ = await run(capsys, env, "status", "--json")
    found = json.loads(out)
    assert found["gateway"] == {"running": False, "pid": None}
    assert found["inbound"]["answered"] == 1 and found["outbox"]["sent"] == 2
    assert found["oldest_waiting"] is None and found["running_turns"] == 0 and found["running"] == []
    assert ISO.fullmatch(found["api_hold"]["since"]) and "401" in found["api_hold"]["reason"]
    [problem] = found["problems"]
    assert (problem["table"], problem["id"], problem["state"]) == ("inbound", filled["bad"], "failed")
    assert ISO.fullmatch(problem["at"])


async def test_status_of_a_running_gateway_shows_its_pid_and_the_waiting_message(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """While a turn runs: the gateway's pid, the oldest waiting message and the running turn."""
    env = env_file_for(tmp_path, sandbox, relay)
    settings = settings_for(tmp_path, sandbox.url, relay.port)
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=0.5) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Slow [sandbox:slow=30]"))
        assert seen.data is not None
        queue_id = seen.data[1].rsplit(" ", 1)[1]

        async def running() -> bool:
            row = await gw.store.inbound(queue_id)
            return row is not None and row.state == "running"

        await until(running, what="the turn running")
        code, out, _ = await run(capsys, env, "status", "--json")
    found = json.loads(out)
    assert code == 0 and found["gateway"]["running"] is True and found["gateway"]["pid"] == os.getpid()
    assert found["oldest_waiting"]["id"] == queue_id and found["oldest_waiting"]["state"] == "running"
    assert found["running_turns"] == 1 and found["running"][0]["id"] == queue_id


async def test_replay_of_a_message_whose_turn_ended_in_error_runs_a_new_turn(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, capsys: Any
) -> None:
    """The errored turn is not taken for the replay's: a second POST makes turn 1 of the task."""
    env = env_file_for(tmp_path, sandbox, relay)
    settings = settings_for(tmp_path, sandbox.url, relay.port)

    async def ended(gw: Gateway, queue_id: str, posts: int) -> None:
        async def failed() -> bool:
            row = await gw.store.inbound(queue_id)
            return row is not None and row.state == "failed" and len(sandbox.state.requests) >= posts

        await until(failed, timeout=15, what="the message failed")

    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        seen = await smtp_send(gw.smtp_port, make_mail(body="Break [sandbox:error]"))
        assert seen.data is not None
        queue_id = seen.data[1].rsplit(" ", 1)[1]
        await ended(gw, queue_id, 1)
        await relay.wait_for(1, timeout=15)
    code, _, _ = await run(capsys, env, "replay", queue_id)
    assert code == 0
    async with Gateway(settings, poll_base=0.05, retry_base=0.05, shutdown_deadline=2) as gw:
        await until(lambda: len(sandbox.state.requests) == 2, timeout=15, what="a second POST")
        await ended(gw, queue_id, 2)
        row = await gw.store.inbound(queue_id)
        await relay.wait_for(2, timeout=15)
    assert row is not None and (row.turn_seq, row.turn_status) == (1, "error")
    task_id = str(row.task_id)
    assert [t.seq for t in sandbox.state.turns_of(task_id)] == [0, 1]
    assert all("Break" in r.input for r in sandbox.state.requests)


async def test_a_missing_database_is_named_and_not_created(tmp_path: Path, capsys: Any) -> None:
    """An operator verb in the wrong directory says where it looked (exit 3) and creates nothing."""
    env = tmp_path / "op.env"
    env.write_text(f"MAILGATE_DATABASE={tmp_path / 'nope' / 'mailgate.db'}\n")
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(cli.main, ["status", "--env-file", str(env)])
    assert code == 3 and "no database at" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


async def test_operator_verbs_read_dot_env_and_need_only_the_database(
    tmp_path: Path, filled: dict[str, Any]
) -> None:
    """In a directory whose .env names only the database, `messages` and `status` work (no API key,
    workers or senders asked for)."""
    (tmp_path / ".env").write_text(f"MAILGATE_DATABASE={tmp_path / 'mailgate.db'}\n")
    for argv in (["messages"], ["status", "--json"]):
        proc = await anyio.run_process(
            [sys.executable, "-m", "mailgate", *argv], cwd=tmp_path, env=clean_environ(), check=False
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert filled["good"] in proc.stdout.decode() or json.loads(proc.stdout)["inbound"]["answered"] == 1


async def test_output_into_a_closed_pipe_is_no_error(tmp_path: Path) -> None:
    """`mailgate messages --json | head -1`: the reader stops early; no BrokenPipeError, exit 0."""
    database = tmp_path / "mailgate.db"
    store = await SqliteStore.open(database)
    now = time.time()
    await store.admit(
        Admitted(
            raw_id="raw1",
            sha256="0" * 64,
            data=b"Subject: x\r\n\r\nx\r\n",
            messages=[
                NewMessage(
                    id=f"m{i:05d}",
                    raw_id="raw1",
                    received_at=now,
                    mail_from="alice@example.org",
                    rcpt="research@agents.example.com",
                    alias="research",
                    sender="alice@example.org",
                    message_id=None,
                    subject="A subject long enough to fill the pipe quickly " * 2,
                    dedupe_key=f"k{i}",
                    state="ignored",
                    reason="auto-reply",
                )
                for i in range(3000)
            ],
        )
    )
    await store.close()
    (tmp_path / ".env").write_text(f"MAILGATE_DATABASE={database}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailgate", "messages", "--json", "--limit", "3000",
        cwd=tmp_path, env=clean_environ(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = await proc.stdout.readline()
    assert json.loads(first)["id"] == "m02999"
    transport = proc._transport  # type: ignore[attr-defined]
    # what `head` does after its line; the transport ends the stream itself (a read already queued for
    # this loop iteration still lands before the end: feeding the end here first raced with it)
    transport.get_pipe_transport(1).close()
    err = await proc.stderr.read()
    assert await proc.wait() == 0
    assert b"BrokenPipeError" not in err and b"Traceback" not in err, err.decode()
