"""What `mailgate check` looks at before a start, and what `serve` checks about the API once started.

Every check returns a `Check` (passed or not, and what was seen, naming the path, address or key) and
changes nothing: no directory, database, spool or Maildir is created; an existing database is read with
`store.probe` (read-only, no `-wal`/`-shm` of its own); a listener's address is bound and released at
once; the relay gets a connection, EHLO (STARTTLS and AUTH when configured) and QUIT; the API only GETs.
A running gateway is recognised by the store's lock: its addresses in use are no failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from mailgate.api import HandingerClient
from mailgate.config import Listen, Settings, default_helo_name
from mailgate.errors import ApiRejected, ApiUnauthorized, ApiUnavailable, ConfigError, StoreBusy
from mailgate.models import ReplyHeaders, SkippedFile, Source
from mailgate.replies.render import NOTICE_KINDS, Renderer
from mailgate.store import holder, probe
from mailgate.store.schema import VERSION

RELAY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.what}"


async def run_checks(settings: Settings, api: HandingerClient) -> list[Check]:
    """Every check, in the order an operator reads them: files, listeners, relay, API, templates."""
    running = holder(settings.database) if settings.database_url is None else None
    checks = [Check(True, "configuration: valid")]
    if running is not None:
        checks.append(Check(True, f"gateway: running on this store (pid {running or '?'})"))
    if settings.database_url is not None:
        checks.append(await postgres_check(settings))
    checks += await asyncio.to_thread(_files, settings)
    checks += [_listener(listen, lmtp, running) for listen, lmtp in _listeners(settings)]
    checks.append(await relay_check(settings))
    checks += await api_checks(api, settings)
    checks.append(templates_check(settings))
    return checks


# --- files ---------------------------------------------------------------------------------------------


def _files(settings: Settings) -> list[Check]:
    checks = [] if settings.database_url is not None else [database_check(settings.database)]
    checks.append(_directory("spool", settings.spool_dir))
    if settings.smtp_relay is None:
        checks.append(_directory("outbox Maildir", settings.outbox_dir))
    return checks


def database_check(db: Path) -> Check:
    """The database opens read-only (when it exists) and its directory is there and writable."""
    folder = db.parent
    if not folder.is_dir():
        return Check(False, f"database {db}: the directory {folder} does not exist")
    if not _writable(folder):
        return Check(False, f"database {db}: the directory {folder} is not writable by this user")
    if not db.exists():
        return Check(True, f"database {db}: not created yet ({folder} is writable)")
    try:
        version = probe(db)
    except StoreBusy as exc:
        return Check(False, f"database {db}: {exc}")
    if not os.access(db, os.R_OK | os.W_OK):
        return Check(False, f"database {db}: not readable and writable by this user")
    upgrade = "" if version == VERSION else f", upgraded to {VERSION} at start"
    return Check(True, f"database {db}: opens, schema version {version}{upgrade}")


async def postgres_check(settings: Settings) -> Check:
    """The PostgreSQL database answers and its schema is one this mailgate can use (read, not changed)."""
    from mailgate.store.pg_schema import VERSION as PG_VERSION
    from mailgate.store.pg_schema import probe as pg_probe

    label = f"database {settings.store_label}"
    assert settings.database_url is not None
    try:
        version = await pg_probe(settings.database_url)
    except StoreBusy as exc:
        return Check(False, f"{label}: {exc}")
    if version > PG_VERSION:
        return Check(False, f"{label}: schema version {version} is newer than this mailgate's ({PG_VERSION})")
    upgrade = "" if version == PG_VERSION else f", upgraded to {PG_VERSION} at start"
    return Check(True, f"{label}: answers, schema version {version}{upgrade}")


def _directory(label: str, path: Path) -> Check:
    """`path` is a writable directory, or the nearest existing folder above it is (made at first use)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing == path:
        if not path.is_dir():
            return Check(False, f"{label} {path}: exists and is not a directory")
        if not _writable(path):
            return Check(False, f"{label} {path}: not writable by this user")
        return Check(True, f"{label} {path}: writable")
    if existing is None or not existing.is_dir() or not _writable(existing):
        return Check(False, f"{label} {path}: cannot be created: {existing} is not a writable directory")
    return Check(True, f"{label} {path}: made at first use ({existing} is writable)")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


# --- listeners -----------------------------------------------------------------------------------------


def _listeners(settings: Settings) -> list[tuple[Listen, bool]]:
    listeners = [(settings.listen, False)]
    if settings.lmtp_listen is not None:
        listeners.append((settings.lmtp_listen, True))
    return listeners


def _listener(listen: Listen, lmtp: bool, running: int | None) -> Check:
    label = f"{'LMTP' if lmtp else 'SMTP'} listener {listen}"
    held = f"{label}: held by the running gateway (pid {running or '?'})"
    if listen.unix_path:
        return _unix_listener(label, Path(listen.unix_path), held if running is not None else None)
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener binds it
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            if running is not None:
                return Check(True, held)
            return Check(False, f"{label}: cannot bind: {exc.strerror or exc}")
    return Check(True, f"{label}: free")


def _unix_listener(label: str, path: Path, held: str | None) -> Check:
    if not path.parent.is_dir():
        return Check(False, f"{label}: the directory {path.parent} does not exist")
    if not _writable(path.parent):
        return Check(False, f"{label}: the directory {path.parent} is not writable by this user")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return Check(True, f"{label}: free")
    if not stat.S_ISSOCK(mode):
        return Check(False, f"{label}: {path} exists and is not a socket (it is never removed)")
    if held is not None:
        return Check(True, held)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return Check(True, f"{label}: a socket left by an earlier run (replaced at start)")
    return Check(False, f"{label}: another process listens on {path}")


# --- the relay -----------------------------------------------------------------------------------------


async def relay_check(settings: Settings, *, timeout: float = RELAY_TIMEOUT) -> Check:
    """The relay answers EHLO with our name, then STARTTLS and AUTH when the relay URL asks for them."""
    relay = settings.smtp_relay
    if relay is None:
        return Check(True, "relay: none configured (replies go to the outbox Maildir)")
    where = f"relay {relay.scheme}://{relay.host}:{relay.port}"
    helo = settings.helo_name or default_helo_name(settings.domain)
    smtp = aiosmtplib.SMTP(
        hostname=relay.host,
        port=relay.port,
        username=relay.username,
        password=relay.password,
        local_hostname=helo,
        timeout=timeout,
        use_tls=relay.scheme == "smtps",
        start_tls=relay.scheme == "smtp+starttls",
        validate_certs=settings.relay_verify_tls,
    )
    try:
        await smtp.connect()  # greeting, EHLO, STARTTLS and AUTH as configured
        if smtp.is_ehlo_or_helo_needed:
            await smtp.ehlo()
        done = [f"EHLO {helo}"]
        if relay.scheme != "smtp":
            done.append("TLS" if relay.scheme == "smtps" else "STARTTLS")
        if relay.username:
            done.append(f"AUTH as {relay.username}")
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
        return Check(True, f"{where}: answers ({', '.join(done)})")
    except aiosmtplib.SMTPResponseException as exc:
        return Check(False, f"{where}: {exc.code} {exc.message}")
    except (aiosmtplib.SMTPException, OSError) as exc:  # refused, timed out, TLS failed
        return Check(False, f"{where}: {type(exc).__name__}: {exc}")
    finally:
        smtp.close()


# --- the API -------------------------------------------------------------------------------------------


async def api_checks(api: HandingerClient, settings: Settings) -> list[Check]:
    """The key is accepted and every configured worker id exists (`GET /api/workers/{id}` for each).

    The first answer that is not a 401 proves the key; a 401 or an unreachable API ends the checks there
    (every other answer would say the same).
    """
    where = f"API {settings.base_url}"
    workers: list[Check] = []
    for worker in settings.workers.values():
        name = f"worker {worker.alias}={worker.worker_id}"
        try:
            known = await api.worker_known(worker.worker_id)
        except ApiUnauthorized:
            return [Check(False, f"{where}: the key was refused (401): check HANDINGER_API_KEY")]
        except ApiUnavailable as exc:
            return [Check(False, f"{where}: unreachable or failing: {exc}")]
        except ApiRejected as exc:
            workers.append(Check(False, f"{name}: the API refused to look it up: {exc}"))
            continue
        if known:
            workers.append(Check(True, f"{name}: known to the API"))
        else:
            workers.append(Check(False, f"{name}: unknown to the API (404): fix MAILGATE_WORKERS"))
    key = "the key is accepted" if settings.api_key else "answers without a key"
    return [Check(True, f"{where}: {key}"), *workers]


# --- templates -----------------------------------------------------------------------------------------


def templates_check(settings: Settings) -> Check:
    """A sample answer and every notice render from the configured templates."""
    where = f"templates {settings.templates_dir or '(packaged)'}"
    headers = ReplyHeaders(
        from_addr=f"check@{settings.domain}",
        from_name="check (mailgate)",
        to=["someone@example.org"],
        cc=[],
        reply_to=f"check+token@{settings.domain}",
        subject="mailgate check",
        message_id=f"<check.mailgate@{settings.domain}>",
        in_reply_to="<original@example.org>",
        references=["<original@example.org>"],
        loop_header_value=settings.domain,
    )
    skipped: Sequence[SkippedFile] = [SkippedFile("big.zip", "over the size limit")]
    try:
        renderer = Renderer(settings.templates_dir)
        renderer.answer(
            headers,
            answer_markdown="**A sample answer** with [a link](https://example.org).",
            sources=[Source(url="https://example.org", title="Example")],
            task_url="https://handinger.com/dashboard/tasks/tsk_check",
            skipped=skipped,
        )
        for kind in NOTICE_KINDS:
            renderer.notice(headers, kind, reason="a sample reason", skipped=skipped)
    except ConfigError as exc:
        return Check(False, f"{where}: {'; '.join(exc.problems)}")
    except Exception as exc:  # a template that parses but fails to render (an unknown variable, ...)
        return Check(False, f"{where}: {type(exc).__name__}: {exc}")
    return Check(True, f"{where}: the answer and {len(NOTICE_KINDS)} notices render")
