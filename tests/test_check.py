"""`mailgate check` as an operator runs it (a subprocess): one line per check, exit 1 when any fails,
and nothing created or changed: no database, directory, spool, Maildir or socket appears."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from mailgate.service import Gateway
from mailgate.store.schema import VERSION
from tests.conftest import env_for, settings_for
from tests.daemon import run_cli, write_env
from tests.relay import RecordingRelay

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api() -> AsyncIterator[RunningSandbox]:
    """A sandbox that knows exactly the two workers the test settings name."""
    options = SandboxOptions(api_key="test-key", workers=frozenset({"wrk_research", "wrk_writer"}))
    async with run_sandbox(options) as sb:
        yield sb


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return port


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def check(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[str], str]:
    """Run `mailgate check`; (exit code, the lines it printed, stderr). Asserts nothing was created."""
    env_file = write_env(tmp_path / "mailgate.env", env)
    before = listing(tmp_path)
    code, out, err = await run_cli("check", env_file=env_file)
    assert listing(tmp_path) == before, "check created or removed something"
    return code, out.splitlines(), err


def line(lines: list[str], start: str) -> str:
    found = [x for x in lines if x.split("  ", 1)[-1].lstrip().startswith(start)]
    assert len(found) == 1, f"one line about {start!r} in {lines}"
    return found[0]


async def test_all_good(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, free_port: int) -> None:
    """Every check passes: exit 0, an `ok` line for each thing looked at, and none of it created."""
    sock = tmp_path / "lmtp.sock"
    env = env_for(
        tmp_path,
        api.url,
        relay.port,
        MAILGATE_LISTEN=f"127.0.0.1:{free_port}",
        MAILGATE_LMTP_LISTEN=f"unix:{sock}",
        MAILGATE_HELO_NAME="mx.agents.example.com",
    )
    code, lines, err = await check(tmp_path, env)
    assert code == 0, (lines, err)
    assert all(x.startswith("ok  ") for x in lines), lines
    assert line(lines, "configuration")
    assert "not created yet" in line(lines, f"database {tmp_path / 'mailgate.db'}")
    assert "made at first use" in line(lines, f"spool {tmp_path / 'spool'}")
    assert line(lines, f"SMTP listener 127.0.0.1:{free_port}").endswith(": free")
    assert line(lines, f"LMTP listener unix:{sock}").endswith(": free")
    assert "(EHLO mx.agents.example.com)" in line(lines, f"relay smtp://127.0.0.1:{relay.port}")
    assert "the key is accepted" in line(lines, f"API {api.url}")
    assert "known to the API" in line(lines, "worker research=wrk_research")
    assert "known to the API" in line(lines, "worker writer=wrk_writer")
    assert "render" in line(lines, "templates (packaged)")
    assert not any("outbox" in x for x in lines)  # a relay is configured: no Maildir to look at


async def test_relay_down(tmp_path: Path, api: RunningSandbox, free_port: int) -> None:
    """Nothing listens at the relay's address: its line fails, exit 1; the rest still passes."""
    code, lines, _ = await check(tmp_path, env_for(tmp_path, api.url, free_port))
    assert code == 1
    failed = [x for x in lines if x.startswith("FAIL")]
    assert failed == [line(lines, f"relay smtp://127.0.0.1:{free_port}")]
    assert "Error" in failed[0]


async def test_relay_with_starttls_and_auth(tmp_path: Path, api: RunningSandbox) -> None:
    """smtp+starttls:// with credentials: check upgrades and logs in; a wrong password fails with the
    relay's own reply; no mail is ever sent."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server)
    relay = RecordingRelay(tls_context=server, require_starttls=True, logins={"mailgate": "right"})
    port = await relay.start()
    try:
        url = f"smtp+starttls://mailgate:{{}}@127.0.0.1:{port}"
        env = env_for(
            tmp_path,
            api.url,
            None,
            MAILGATE_SMTP_RELAY=url.format("wrong"),
            MAILGATE_RELAY_VERIFY_TLS="false",
        )
        code, lines, _ = await check(tmp_path, env)
        assert code == 1
        assert line(lines, "relay smtp+starttls://").startswith(
            f"FAIL  relay smtp+starttls://127.0.0.1:{port}: 535"
        )
        env["MAILGATE_SMTP_RELAY"] = url.format("right")
        code, lines, _ = await check(tmp_path, env)
        assert code == 0, lines
        assert line(lines, "relay smtp+starttls://").endswith(", STARTTLS, AUTH as mailgate)")
    finally:
        await relay.close()
    assert relay.messages == []


async def test_port_taken(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay) -> None:
    """Another process listens on MAILGATE_LISTEN's port (no gateway holds the store): it fails."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = env_for(tmp_path, api.url, relay.port, MAILGATE_LISTEN=f"127.0.0.1:{port}")
        code, lines, _ = await check(tmp_path, env)
    assert code == 1
    assert line(lines, f"SMTP listener 127.0.0.1:{port}") == (
        f"FAIL  SMTP listener 127.0.0.1:{port}: cannot bind: Address already in use"
    )


async def test_lmtp_path_that_is_a_file(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay) -> None:
    """A regular file where the LMTP socket goes fails (serve would refuse it too); a stale socket
    file is fine (serve replaces it)."""
    path = tmp_path / "lmtp.sock"
    path.write_text("not a socket")
    env = env_for(tmp_path, api.url, relay.port, MAILGATE_LMTP_LISTEN=f"unix:{path}")
    code, lines, _ = await check(tmp_path, env)
    assert code == 1
    assert line(lines, f"LMTP listener unix:{path}").startswith("FAIL")
    assert "exists and is not a socket" in line(lines, "LMTP listener")

    path.unlink()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    code, lines, _ = await check(tmp_path, env)
    assert code == 0, lines
    assert "left by an earlier run" in line(lines, "LMTP listener")


async def test_wrong_worker_id(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay) -> None:
    """A worker id the API does not know fails by alias and id; the known one passes."""
    env = env_for(tmp_path, api.url, relay.port, MAILGATE_WORKERS="research=wrk_research,writer=wrk_wrong")
    code, lines, _ = await check(tmp_path, env)
    assert code == 1
    assert line(lines, "worker writer=wrk_wrong") == (
        "FAIL  worker writer=wrk_wrong: unknown to the API (404): fix MAILGATE_WORKERS"
    )
    assert line(lines, "worker research=wrk_research").startswith("ok")


async def test_a_refused_api_key(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay) -> None:
    """A wrong HANDINGER_API_KEY fails once (the worker lookups would only repeat the 401)."""
    code, lines, _ = await check(tmp_path, env_for(tmp_path, api.url, relay.port, HANDINGER_API_KEY="wrong"))
    assert code == 1
    assert line(lines, f"API {api.url}") == (
        f"FAIL  API {api.url}: the key was refused (401): check HANDINGER_API_KEY"
    )
    assert not any(" worker " in x for x in lines)


async def test_missing_database_directory_is_not_created(tmp_path: Path, api: RunningSandbox) -> None:
    """The database's directory is missing: its line fails, naming it, and check does not create it
    (nor the spool or the Maildir, which `serve` makes at first use)."""
    missing = tmp_path / "missing"
    env = env_for(
        tmp_path,
        api.url,
        None,
        MAILGATE_DATABASE=str(missing / "db" / "mailgate.db"),
        MAILGATE_SPOOL_DIR=str(missing / "spool"),
        MAILGATE_OUTBOX_DIR=str(missing / "outbox"),
    )
    code, lines, _ = await check(tmp_path, env)
    assert code == 1
    assert line(lines, "database") == (
        f"FAIL  database {missing / 'db' / 'mailgate.db'}: the directory {missing / 'db'} does not exist"
    )
    assert line(lines, "spool").startswith("ok") and line(lines, "outbox Maildir").startswith("ok")
    assert not missing.exists()


async def test_beside_a_running_gateway_and_after_it(
    tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, free_port: int
) -> None:
    """A gateway holds the store and its port: check says so and passes; the existing database is read
    read-only. After the gateway stopped, reading it leaves no -wal or -shm behind."""
    env = env_for(tmp_path, api.url, relay.port, MAILGATE_LISTEN=f"127.0.0.1:{free_port}")
    settings = settings_for(tmp_path, api.url, relay.port, MAILGATE_LISTEN=f"127.0.0.1:{free_port}")
    async with Gateway(settings, shutdown_deadline=2):
        code, lines, _ = await check(tmp_path, env)
        assert code == 0, lines
        pid = line(lines, "gateway: running").split("pid ")[1].rstrip(")")
        assert line(lines, f"SMTP listener 127.0.0.1:{free_port}").endswith(
            f"held by the running gateway (pid {pid})"
        )
        assert line(lines, "database").endswith(f"opens, schema version {VERSION}")
    assert not (tmp_path / "mailgate.db-wal").exists()
    code, lines, _ = await check(tmp_path, env)  # `check` asserts the listing did not change
    assert code == 0, lines
    assert line(lines, f"SMTP listener 127.0.0.1:{free_port}").endswith(": free")
    assert line(lines, "database").endswith(f"opens, schema version {VERSION}")


async def test_a_database_that_is_not_one(tmp_path: Path, api: RunningSandbox, relay: RecordingRelay) -> None:
    """A file at MAILGATE_DATABASE that SQLite cannot read fails, and is left as it was."""
    (tmp_path / "mailgate.db").write_bytes(b"not a database" * 100)
    code, lines, _ = await check(tmp_path, env_for(tmp_path, api.url, relay.port))
    assert code == 1
    assert "file is not a database" in line(lines, "database")
    assert (tmp_path / "mailgate.db").read_bytes() == b"not a database" * 100


@pytest.mark.parametrize(
    ("template", "says"),
    [("{% if %}", "template answer.html"), ("{{ no_such_thing.attribute }}", "UndefinedError")],
)
async def test_templates_that_do_not_render(
    tmp_path: Path, api: RunningSandbox, relay: RecordingRelay, template: str, says: str
) -> None:
    """A custom template that does not parse, or parses and fails to render, fails its line."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "answer.html").write_text(template)
    env = env_for(tmp_path, api.url, relay.port, MAILGATE_TEMPLATES_DIR=str(folder))
    code, lines, _ = await check(tmp_path, env)
    assert code == 1
    assert line(lines, f"templates {folder}").startswith("FAIL") and says in line(lines, "templates")


async def test_a_bad_configuration_still_exits_78(tmp_path: Path) -> None:
    """A bad key is the configuration's exit code, 78, with the key named, not a list of checks."""
    env_file = write_env(tmp_path / "bad.env", {"MAILGATE_DOMAIN": "not a domain"})
    code, out, err = await run_cli("check", env_file=env_file)
    assert (code, out) == (78, "")
    assert "MAILGATE_DOMAIN" in err
