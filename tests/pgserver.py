"""A throwaway PostgreSQL server for the tests and the benchmarks.

`running_postgres()` is a plain context manager (bench scripts use it); the pytest fixtures
`postgres_url` (one server per session) and `postgres_db` (a fresh database per test) wrap it.

Where the server comes from, first match wins:
- `MAILGATE_TEST_POSTGRES_URL`: an existing server; nothing is started. Its role needs CREATEDB for
  `postgres_db`.
- `MAILGATE_TEST_POSTGRES_BIN`: a directory holding `initdb` and `pg_ctl` (a pip-installed server, say).
- `pg_ctl` on PATH, then the newest `/usr/lib/postgresql/<ver>/bin` (Debian's `postgresql` package).
With none of these the fixtures skip with the reason, unless `MAILGATE_TEST_POSTGRES_REQUIRED=1`
(set by `.ci/run`), where a missing server is a failure rather than a silent skip.

Invariants of a started server:
- A new cluster in a new temp dir, listening on 127.0.0.1 on a free port and on a unix socket in that
  dir; `fsync=on` and `synchronous_commit=on`, since durability is what the store's tests are about;
  trust auth for the superuser `mailgate`, and a database `mailgate`.
- initdb refuses to run as root: as root the cluster belongs to Debian's `postgres` user (or `nobody`)
  and the temp dir is chowned to it; as anyone else it belongs to the current user.
- Stopped with `pg_ctl stop -m immediate` in a `finally`, and its dir removed. A run killed before its
  `finally` leaves a cluster behind; it never collides with later runs (new dir, new port), and the
  next start stops and removes every leftover whose owning process is gone (`owner` file: pid and
  start time, so a reused pid is not mistaken for the owner).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

URL_ENV = "MAILGATE_TEST_POSTGRES_URL"
BIN_ENV = "MAILGATE_TEST_POSTGRES_BIN"
REQUIRED_ENV = "MAILGATE_TEST_POSTGRES_REQUIRED"
SUPERUSER = "mailgate"
DATABASE = "mailgate"
DIR_PREFIX = "mailgate-pg-"
START_TIMEOUT = 60  # seconds for `pg_ctl start -w`; a cold start on a busy 2-core box takes ~1 s

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",  # several gateways with pools, plus the tests' own connections
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


class PostgresUnavailable(Exception):
    """No PostgreSQL server binaries can be found: the reason says where we looked."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: `url` is a libpq URL to its `mailgate` database."""

    url: str
    host: str
    port: int
    user: str
    database: str
    data_dir: Path | None  # None for a server we did not start (MAILGATE_TEST_POSTGRES_URL)

    def url_for(self, database: str) -> str:
        """The same server and credentials, another database."""
        return urlunsplit(urlsplit(self.url)._replace(path=f"/{database}"))


def find_bin_dir() -> Path:
    """The directory holding `initdb` and `pg_ctl`, or PostgresUnavailable saying where we looked."""
    candidates: list[Path] = []
    if explicit := os.environ.get(BIN_ENV):
        candidates.append(Path(explicit))
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).resolve().parent)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    tried = [str(c) for c in candidates]
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl) in "
        + (", ".join(tried) if tried else f"${BIN_ENV}, PATH or /usr/lib/postgresql/*/bin")
        + f"; install Debian's `postgresql`, or set ${BIN_ENV} or ${URL_ENV}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_account() -> pwd.struct_passwd | None:
    """Who runs the cluster: None for the current user, else the unprivileged account root hands it to."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and neither a `postgres` nor a `nobody` account exists")


def _run(
    argv: list[str], account: pwd.struct_passwd | None, *, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a server binary as `account` (None: as ourselves), output captured for the error message."""
    env = dict(os.environ)
    if account is not None:
        env["HOME"] = account.pw_dir
    env.pop("PGDATA", None)
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        user=account.pw_uid if account else None,
        group=account.pw_gid if account else None,
        extra_groups=[] if account else None,
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{Path(argv[0]).name} failed ({result.returncode}): {result.stdout}{result.stderr}".strip()
        )
    return result


def _process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(owner_file: Path) -> bool:
    try:
        pid_text, started = owner_file.read_text().split()
    except FileNotFoundError:
        # Between mkdtemp and the owner file a starting run has none yet: give it a grace period.
        with contextlib.suppress(OSError):
            return time.time() - owner_file.parent.stat().st_mtime < 300
        return False
    except (OSError, ValueError):
        return False
    return _process_start_time(int(pid_text)) == started


def reap_stale_clusters(bin_dir: Path, root: Path | None = None) -> int:
    """Stop and remove clusters left by runs that were killed before their `finally`; returns how many."""
    root = root or Path(tempfile.gettempdir())
    reaped = 0
    for stale in root.glob(f"{DIR_PREFIX}*"):
        if not stale.is_dir() or _owner_alive(stale / "owner"):
            continue
        data = stale / "data"
        if (data / "postmaster.pid").exists():
            _stop(bin_dir, data, _server_account())
        shutil.rmtree(stale, ignore_errors=True)
        reaped += 1
    return reaped


def _stop(bin_dir: Path, data: Path, account: pwd.struct_passwd | None) -> None:
    """Stop at once (no checkpoint: the files are thrown away next); a server already gone is fine."""
    _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"], account, check=False)


def _write_owner(base: Path) -> None:
    pid = os.getpid()
    (base / "owner").write_text(f"{pid} {_process_start_time(pid) or 0}\n")


@contextlib.contextmanager
def running_postgres(bin_dir: Path | None = None) -> Iterator[PostgresServer]:
    """Start a throwaway cluster, yield it, stop it (immediate) and remove its files, whatever happens."""
    bin_dir = bin_dir or find_bin_dir()
    reap_stale_clusters(bin_dir)
    account = _server_account()
    base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
    _write_owner(base)
    data = base / "data"
    log = base / "server.log"
    started = False
    try:
        base.chmod(0o755)  # the server account only needs to reach its own data dir and the socket
        if account is not None:
            os.chown(base, account.pw_uid, account.pw_gid)
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",  # initdb's own flush only; the server runs with fsync=on
            ],
            account,
        )
        port = _start(bin_dir, data, base, log, account)
        started = True
        server = PostgresServer(
            url=f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}",
            host="127.0.0.1",
            port=port,
            user=SUPERUSER,
            database=DATABASE,
            data_dir=data,
        )
        createdb = [str(bin_dir / "createdb"), "-h", str(base), "-p", str(port), "-U", SUPERUSER, DATABASE]
        _run(createdb, account)
        yield server
    finally:
        if started:
            _stop(bin_dir, data, account)
        shutil.rmtree(base, ignore_errors=True)


def _start(bin_dir: Path, data: Path, base: Path, log: Path, account: pwd.struct_passwd | None) -> int:
    """Start the server on a free port (retried: another process may take the port first); returns it."""
    last = ""
    for _ in range(3):
        port = _free_port()
        settings = {**SETTINGS, "port": str(port), "unix_socket_directories": f"'{base}'"}
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pgserver.py\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        start = [str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w"]
        result = _run([*start, "-t", str(START_TIMEOUT)], account, check=False, timeout=START_TIMEOUT + 10)
        if result.returncode == 0:
            return port
        last = log.read_text(errors="replace")[-2000:] if log.exists() else result.stdout + result.stderr
        if "could not bind" not in last and "already in use" not in last:
            break
    raise RuntimeError(f"PostgreSQL did not start: {last}")


def skip_or_fail(reason: str) -> None:
    """Skip for want of a server, or fail where one is required (CI)."""
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{REQUIRED_ENV}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session: $MAILGATE_TEST_POSTGRES_URL or a throwaway cluster."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    if url := os.environ.get(URL_ENV):
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(url)
        yield PostgresServer(
            url=url,
            host=str(info.get("host", "127.0.0.1")),
            port=int(info.get("port", 5432)),
            user=str(info.get("user", SUPERUSER)),
            database=str(info.get("dbname", DATABASE)),
            data_dir=None,
        )
        return
    try:
        bin_dir = find_bin_dir()
    except PostgresUnavailable as e:
        skip_or_fail(str(e))
        return
    with running_postgres(bin_dir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A libpq URL to the session's server (shared by every test that asks: isolate by table or db)."""
    return postgres_server.url


@pytest.fixture
def postgres_dbs(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    """`postgres_dbs()` makes a new empty database for this test and returns its libpq URL; every one
    made is dropped afterwards."""
    import psycopg
    from psycopg import sql

    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        made.append(name)
        return postgres_server.url_for(name)

    try:
        yield make
    finally:
        with psycopg.connect(postgres_server.url, autocommit=True) as admin:
            for name in made:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def postgres_db(postgres_dbs: Callable[[], str]) -> str:
    """A libpq URL to a new empty database for this test alone, dropped afterwards."""
    return postgres_dbs()
