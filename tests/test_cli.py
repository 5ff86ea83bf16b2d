"""The operator verbs, called as `mailgate.cli.main([...])` against a database a real gateway filled.

`main` runs its own event loop (`asyncio.run`), so each call runs in a worker thread while the sandbox
keeps serving in the test's loop.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from mailgate import cli
from mailgate.sandbox import RunningSandbox
from mailgate.service import Gateway
from tests.conftest import settings_for
from tests.mail import make_mail, smtp_send, until
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`main` points the mailgate logger at stderr; put it back for the tests that follow."""
    logger = logging.getLogger("mailgate")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


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
