"""Shared fixtures: everything runs in the test's own event loop, on real sockets bound to port 0."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailgate.config import Settings, load_settings
from mailgate.sandbox import RunningSandbox, SandboxOptions, run_sandbox
from mailgate.service import Gateway
from tests.relay import RecordingRelay

pytest_plugins = ("tests.pgserver",)  # postgres_server, postgres_url, postgres_db

DOMAIN = "agents.example.com"
# The real-mail corpus, read in place beside the checkout (never copied into it). Tests that need it skip
# with `needs_corpus`'s reason where it is absent (a user's own clone).
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
needs_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"the mail corpus is not at {CORPUS} (it lives beside the project, in shared/)",
)


# Run a test on both stores: `@both_stores` (the `database` fixture gives MAILGATE_DATABASE).
both_stores = pytest.mark.parametrize("database", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """MAILGATE_DATABASE for the test: an SQLite file in its tmp dir, or (parametrized "postgres") a fresh
    PostgreSQL database on the session's server."""
    if getattr(request, "param", "sqlite") == "postgres":
        return str(request.getfixturevalue("postgres_db"))
    return str(tmp_path / "mailgate.db")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with run_sandbox(SandboxOptions(api_key="test-key")) as sb:
        yield sb


@pytest.fixture
async def relay() -> AsyncIterator[RecordingRelay]:
    r = RecordingRelay()
    await r.start()
    try:
        yield r
    finally:
        await r.close()


def settings_for(tmp_path: Path, api_url: str, relay_port: int | None, **env: str) -> Settings:
    """Settings on the test's own paths and ports; `env` overrides any MAILGATE_/HANDINGER_ name."""
    return load_settings(environ=env_for(tmp_path, api_url, relay_port, **env))


def env_for(tmp_path: Path, api_url: str, relay_port: int | None, **env: str) -> dict[str, str]:
    """The settings of `settings_for` as MAILGATE_/HANDINGER_ names (for an env file or a subprocess)."""
    values = {
        "HANDINGER_BASE_URL": api_url,
        "HANDINGER_API_KEY": "test-key",
        "MAILGATE_DOMAIN": DOMAIN,
        "MAILGATE_WORKERS": "research=wrk_research,writer=wrk_writer:low",
        "MAILGATE_ALLOWED_SENDERS": "@example.org,boss@example.net",
        "MAILGATE_AUTH": "none",
        "MAILGATE_LISTEN": "127.0.0.1:0",
        "MAILGATE_DATABASE": str(tmp_path / "mailgate.db"),
        "MAILGATE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "MAILGATE_SPOOL_DIR": str(tmp_path / "spool"),
        "MAILGATE_SECRET": "test-secret-0123456789abcdef",
    }
    if relay_port is not None:
        values["MAILGATE_SMTP_RELAY"] = f"smtp://127.0.0.1:{relay_port}"
    values.update(env)
    return values


@pytest.fixture
def make_gateway(
    tmp_path: Path, sandbox: RunningSandbox, relay: RecordingRelay, database: str
) -> Callable[..., Any]:
    """`async with make_gateway(**env) as gw:` a gateway wired to the sandbox, the relay and the test's
    store (`database`)."""

    def make(*, with_relay: bool = True, **env: str) -> Gateway:
        env = {"MAILGATE_DATABASE": database, **env}
        settings = settings_for(tmp_path, sandbox.url, relay.port if with_relay else None, **env)
        return Gateway(settings, poll_base=0.05, retry_base=0.05, settle_seconds=0.2, shutdown_deadline=2.0)

    return make


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """`cli.main` and `runner_main` point the mailgate logger at stderr; put it back for the tests that
    follow (whatever a test did to it)."""
    logger = logging.getLogger("mailgate")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
