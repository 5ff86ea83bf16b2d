"""Settings: read once from a `.env` file with the process environment on top, validated once.

`load_settings(env_file, environ)` is the only place that looks at configuration. Every problem is
collected and raised together as one `ConfigError`, so an operator fixes them in one go (exit 78).
"""

from __future__ import annotations

import functools
import grp
import importlib.util
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from mailgate.errors import ConfigError
from mailgate.models import BUDGETS

MiB = 1024 * 1024
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("logfmt", "json")
RUNNER_MODES = ("auto", "inline", "process")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
AuthMode = Literal["dmarc", "dkim", "none"]
T = TypeVar("T")

_LOCAL_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,23}$")  # room for "+<39-char token>" in 64 octets
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


@dataclass(frozen=True)
class Worker:
    alias: str
    worker_id: str
    budget: str = "standard"


@dataclass(frozen=True)
class Relay:
    scheme: Literal["smtp", "smtp+starttls", "smtps"]
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OutputHost:
    """One MAILGATE_OUTPUT_HOSTS entry: a host mailgate may download output files from.

    A host is the URL's host as written (a name or an IP literal), never what it resolves to: listing
    `127.0.0.1` does not allow `localhost`, nor the other way round. Without a port, only the scheme's
    default port (80 for http, 443 for https); `*.example.com` allows every name under example.com (not
    example.com itself). Where it resolves is checked separately (no private addresses).
    """

    host: str  # lower case, IDNA, no trailing dot; an IPv6 literal without brackets
    port: int | None = None
    subdomains: bool = False

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        """Whether `scheme://host:port` (host already in lower-case IDNA form) is this entry."""
        default = {"http": 80, "https": 443}.get(scheme)
        if (port or default) != (self.port or default) or default is None:
            return False
        host = host.rstrip(".")
        return host.endswith("." + self.host) if self.subdomains else host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return ("*." if self.subdomains else "") + host + (f":{self.port}" if self.port else "")


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 2525
    unix_path: str | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    domain: str
    workers: Mapping[str, Worker]
    allowed_senders: tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    base_url: str = "https://handinger.com"
    auth: AuthMode = "dmarc"
    authserv_id: str | None = None
    listen: Listen = Listen()
    lmtp_listen: Listen | None = None
    lmtp_socket_mode: int = 0o660
    lmtp_socket_group: int | None = None  # a gid; None keeps the group the socket was created with
    database: Path = Path("var/mailgate.db")
    # MAILGATE_DATABASE as a libpq URL (postgresql:// or postgres://): PostgreSQL instead of `database`.
    # It may hold a password, so it stays out of repr; `store_label` is the form to show.
    database_url: str | None = field(default=None, repr=False)
    lease_seconds: float = 60.0
    smtp_relay: Relay | None = None
    relay_verify_tls: bool = True
    helo_name: str | None = None  # the EHLO name towards the relay; None: `default_helo_name(domain)`
    outbox_dir: Path = Path("var/outbox")
    spool_dir: Path = Path("var/spool")
    max_message_size: int = 40 * MiB
    concurrency: int = 64
    secret: str | None = field(default=None, repr=False)
    max_budget: str = "high"
    templates_dir: Path | None = None
    # API behaviour that the public documentation leaves open (see handinger-api.md)
    send_triggered_by: bool = True
    files_field: str = "files"
    stream: bool = True
    api_timeout: float = 120.0
    # retries and recovery
    retry_horizon: float = 24 * 3600.0
    max_processing_attempts: int = 5
    # what the worker's output may attach to a reply
    output_file_max: int = 10 * MiB
    output_total_max: int = 20 * MiB
    output_hosts: tuple[OutputHost, ...] = ()  # besides the API's own origin
    # how big a reply may get
    max_answer_inline: int = 64 * 1024  # bytes of the answer shown in the body; the rest is attached
    max_reply_size: int = 10 * MiB  # bytes on the wire, attachments included
    # limits against abuse and loops
    max_new_tasks_per_hour: int = 20
    max_turns_per_thread_per_hour: int = 12
    max_notices_per_day: int = 10
    max_replies_per_address_per_hour: int = 30  # answers and notices to one address (the loop breaker)
    max_replies_per_minute: int = 120  # the whole gateway; over it, notices pause
    unknown_senders: str = "refuse"  # or "hold": an authenticated sender not allowed waits for approval
    max_held: int = 1000  # held messages at once (all senders); over it, new strangers' mail gets 452
    max_recipients: int = 20
    max_connections: int = 200
    max_connections_per_client: int = 20
    smtp_timeout: float = 300.0
    smtp_session_timeout: float = 3600.0
    min_free_space: int = 60 * MiB  # refuse new mail below this much free disk; 0: off
    max_header_size: int = 100 * 1024  # Postfix's header_size_limit
    retention_days: float = 30.0  # finished messages' raw bytes are pruned after this long; 0: kept
    # transport security of the listener
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False
    log_level: str = "INFO"
    # what the sender hears besides the answer
    ack_after: float = 120.0  # seconds a turn runs before the sender is told it is being worked on; 0: off
    bounce_limit: int = 3  # hard bounces of our replies in 30 days after which an address gets no notices
    dkim_selector: str | None = None  # sign replies as `selector._domainkey.<domain>` (with `dkim_key`)
    dkim_key: Path | None = None  # the PEM file of the RSA private key
    log_format: str = "logfmt"  # or "json"
    metrics_listen: Listen | None = None  # /metrics, /healthz, /readyz; None: off
    # how `serve` runs: the turn scheduler and the outbox in the listener's process ("inline"), in a
    # process of their own ("process"), or "auto" (a process of their own with two CPUs or more)
    runner: str = "auto"
    event_loop: str = "auto"  # "asyncio", "uvloop", or "auto" (uvloop when it is installed)

    @property
    def runner_process(self) -> bool:
        """Does `serve` run the turns in a process of their own?"""
        if self.runner == "auto":
            return usable_cpus() >= 2
        return self.runner == "process"

    def worker_for(self, alias: str) -> Worker | None:
        return self.workers.get(alias.lower())

    @property
    def store_label(self) -> str:
        """Where the store is, fit for a log line or a message: the path, or the URL without a password."""
        if self.database_url is None:
            return str(self.database)
        return redact_url(self.database_url)


def load_settings(env_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read `env_file` (if given) with `environ` on top and validate every key.

    Raises `ConfigError` naming every bad key. `environ` defaults to nothing: the caller (the CLI)
    passes `os.environ` explicitly, so tests never pick up the developer's environment by accident.
    """
    raw: dict[str, str] = {}
    problems: list[str] = []
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise ConfigError([f"--env-file: {path} does not exist or is not a file"])
        raw.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    if environ:
        raw.update({k: v for k, v in environ.items() if k.startswith(("MAILGATE_", "HANDINGER_"))})
    values = {k: v.strip() for k, v in raw.items() if v.strip() != ""}
    p = _Parser(values, problems)

    domain = p.get("MAILGATE_DOMAIN", _domain, required=True)
    workers = p.get("MAILGATE_WORKERS", _workers, required=True)
    allowed = p.get("MAILGATE_ALLOWED_SENDERS", _senders, required=True)
    base_url = p.get("HANDINGER_BASE_URL", _url, "https://handinger.com")
    api_key = p.get("HANDINGER_API_KEY", str, None)
    if api_key is None and base_url is not None and not _is_loopback_url(base_url):
        problems.append("HANDINGER_API_KEY: required (only a sandbox on a loopback address runs without one)")
    auth = p.get("MAILGATE_AUTH", _choice("dmarc", "dkim", "none"), "dmarc")
    authserv_id = p.get("MAILGATE_AUTHSERV_ID", str, None)
    if auth == "dmarc" and authserv_id is None:
        problems.append(
            "MAILGATE_AUTHSERV_ID: required with MAILGATE_AUTH=dmarc (the authserv-id your own MTA writes "
            "in Authentication-Results)"
        )
    max_budget = p.get("MAILGATE_MAX_BUDGET", _choice(*BUDGETS), "high")
    if workers and max_budget:
        cap = BUDGETS.index(max_budget)
        for w in workers.values():
            if BUDGETS.index(w.budget) > cap:
                problems.append(
                    f"MAILGATE_WORKERS: {w.alias} asks for budget {w.budget}, "
                    f"above MAILGATE_MAX_BUDGET={max_budget}"
                )
    tls_cert = p.get("MAILGATE_TLS_CERT", _existing_file, None)
    tls_key = p.get("MAILGATE_TLS_KEY", _existing_file, None)
    if (
        (tls_cert is None) != (tls_key is None)
        and "MAILGATE_TLS_CERT" in values
        and "MAILGATE_TLS_KEY" in values
    ):
        pass  # one of them is already reported as missing
    elif (tls_cert is None) != (tls_key is None):
        problems.append("MAILGATE_TLS_CERT / MAILGATE_TLS_KEY: set both or neither")
    database = p.get("MAILGATE_DATABASE", str, "./var/mailgate.db") or "./var/mailgate.db"
    database_url = None
    if database.startswith(POSTGRES_SCHEMES):
        database_url = p.get("MAILGATE_DATABASE", _postgres_url, None)
        database = "./var/mailgate.db"
    require_starttls = p.get("MAILGATE_REQUIRE_STARTTLS", _bool, False)
    if require_starttls and tls_cert is None:
        problems.append("MAILGATE_REQUIRE_STARTTLS: needs MAILGATE_TLS_CERT and MAILGATE_TLS_KEY")
    dkim_selector = p.get("MAILGATE_DKIM_SELECTOR", dkim_selector_name, None)
    dkim_key = p.get("MAILGATE_DKIM_KEY", _dkim_key, None)
    for given, missing in (
        ("MAILGATE_DKIM_SELECTOR", "MAILGATE_DKIM_KEY"),
        ("MAILGATE_DKIM_KEY", "MAILGATE_DKIM_SELECTOR"),
    ):
        if given in values and missing not in values:
            problems.append(f"{missing}: required with {given} (replies are DKIM-signed only with both)")

    max_message_size = p.get("MAILGATE_MAX_MESSAGE_SIZE", _positive_int, 40 * MiB) or 40 * MiB
    settings = Settings(
        domain=domain or "",
        workers=workers or {},
        allowed_senders=allowed or (),
        api_key=api_key,
        base_url=(base_url or "").rstrip("/"),
        auth=auth or "dmarc",  # type: ignore[arg-type]
        authserv_id=authserv_id,
        listen=p.get("MAILGATE_LISTEN", _listen, Listen()) or Listen(),
        lmtp_listen=p.get("MAILGATE_LMTP_LISTEN", _listen_or_unix, None),
        lmtp_socket_mode=p.get("MAILGATE_LMTP_SOCKET_MODE", _file_mode, 0o660) or 0o660,
        lmtp_socket_group=p.get("MAILGATE_LMTP_SOCKET_GROUP", _group, None),
        database=Path(database),
        database_url=database_url,
        lease_seconds=p.get("MAILGATE_LEASE_SECONDS", _lease_seconds, 60.0) or 60.0,
        smtp_relay=p.get("MAILGATE_SMTP_RELAY", _relay, None),
        relay_verify_tls=p.get("MAILGATE_RELAY_VERIFY_TLS", _bool, True) is not False,
        helo_name=p.get("MAILGATE_HELO_NAME", _helo_name, None) or default_helo_name(domain or ""),
        outbox_dir=Path(p.get("MAILGATE_OUTBOX_DIR", str, "./var/outbox") or "./var/outbox"),
        spool_dir=Path(p.get("MAILGATE_SPOOL_DIR", str, "./var/spool") or "./var/spool"),
        max_message_size=max_message_size,
        concurrency=p.get("MAILGATE_CONCURRENCY", _positive_int, 64) or 64,
        secret=p.get("MAILGATE_SECRET", _secret, None),
        max_budget=max_budget or "high",
        templates_dir=p.get("MAILGATE_TEMPLATES_DIR", _existing_dir, None),
        send_triggered_by=p.get("MAILGATE_SEND_TRIGGERED_BY", _bool, True) is not False,
        files_field=p.get("MAILGATE_FILES_FIELD", _choice("files", "files[]"), "files") or "files",
        stream=p.get("MAILGATE_STREAM", _bool, True) is not False,
        api_timeout=p.get("MAILGATE_API_TIMEOUT", _positive_float, 120.0) or 120.0,
        retry_horizon=p.get("MAILGATE_RETRY_HORIZON", _positive_float, 86400.0) or 86400.0,
        max_processing_attempts=p.get("MAILGATE_MAX_PROCESSING_ATTEMPTS", _positive_int, 5) or 5,
        output_file_max=p.get("MAILGATE_OUTPUT_FILE_MAX", _positive_int, 10 * MiB) or 10 * MiB,
        output_total_max=p.get("MAILGATE_OUTPUT_TOTAL_MAX", _positive_int, 20 * MiB) or 20 * MiB,
        output_hosts=p.get("MAILGATE_OUTPUT_HOSTS", _output_hosts, ()) or (),
        max_answer_inline=p.get("MAILGATE_MAX_ANSWER_INLINE", _positive_int, 64 * 1024) or 64 * 1024,
        max_reply_size=p.get("MAILGATE_MAX_REPLY_SIZE", _positive_int, 10 * MiB) or 10 * MiB,
        max_new_tasks_per_hour=p.get("MAILGATE_MAX_NEW_TASKS_PER_HOUR", _positive_int, 20) or 20,
        max_turns_per_thread_per_hour=p.get("MAILGATE_MAX_TURNS_PER_THREAD_PER_HOUR", _positive_int, 12)
        or 12,
        max_notices_per_day=p.get("MAILGATE_MAX_NOTICES_PER_DAY", _positive_int, 10) or 10,
        max_replies_per_address_per_hour=p.get("MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR", _positive_int, 30)
        or 30,
        max_replies_per_minute=p.get("MAILGATE_MAX_REPLIES_PER_MINUTE", _positive_int, 120) or 120,
        unknown_senders=p.get("MAILGATE_UNKNOWN_SENDERS", _choice("refuse", "hold"), "refuse") or "refuse",
        max_held=p.get("MAILGATE_MAX_HELD", _positive_int, 1000) or 1000,
        max_recipients=p.get("MAILGATE_MAX_RECIPIENTS", _positive_int, 20) or 20,
        max_connections=p.get("MAILGATE_MAX_CONNECTIONS", _positive_int, 200) or 200,
        max_connections_per_client=p.get("MAILGATE_MAX_CONNECTIONS_PER_CLIENT", _positive_int, 20) or 20,
        smtp_timeout=p.get("MAILGATE_SMTP_TIMEOUT", _positive_float, 300.0) or 300.0,
        smtp_session_timeout=p.get("MAILGATE_SMTP_SESSION_TIMEOUT", _positive_float, 3600.0) or 3600.0,
        min_free_space=_or(p.get("MAILGATE_MIN_FREE_SPACE", _bytes_or_off, None), max_message_size * 3 // 2),
        max_header_size=p.get("MAILGATE_MAX_HEADER_SIZE", _positive_int, 100 * 1024) or 100 * 1024,
        retention_days=_or(p.get("MAILGATE_RETENTION_DAYS", _days_or_off, 30.0), 30.0),
        tls_cert=tls_cert,
        tls_key=tls_key,
        require_starttls=bool(require_starttls),
        log_level=p.get("MAILGATE_LOG_LEVEL", _choice(*LOG_LEVELS), "INFO") or "INFO",
        ack_after=_or(p.get("MAILGATE_ACK_AFTER", _seconds_or_off, 120.0), 120.0),
        bounce_limit=p.get("MAILGATE_BOUNCE_LIMIT", _positive_int, 3) or 3,
        dkim_selector=dkim_selector if dkim_key is not None else None,
        dkim_key=dkim_key if dkim_selector is not None else None,
        log_format=p.get("MAILGATE_LOG_FORMAT", _choice(*LOG_FORMATS), "logfmt") or "logfmt",
        metrics_listen=p.get("MAILGATE_METRICS_LISTEN", _listen, None),
        runner=p.get("MAILGATE_RUNNER", _choice(*RUNNER_MODES), "auto") or "auto",
        event_loop=p.get("MAILGATE_EVENT_LOOP", _choice(*EVENT_LOOPS), "auto") or "auto",
    )
    if settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.append("MAILGATE_EVENT_LOOP=uvloop: uvloop is not installed (pip install 'mailgate[fast]')")
    if problems:
        raise ConfigError(problems)
    return settings


def usable_cpus() -> int:
    """The CPUs this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator verbs (`messages`, `outbox`, `tasks`, `show`, `status`, `replay`, `archive`)
    need: the database, how to log, and the API only for `archive`."""

    database: Path = Path("var/mailgate.db")
    database_url: str | None = field(default=None, repr=False)  # a PostgreSQL store
    lease_seconds: float = 60.0
    base_url: str = "https://handinger.com"
    api_key: str | None = field(default=None, repr=False)
    metrics_listen: Listen | None = None
    log_level: str = "WARNING"
    log_format: str = "logfmt"
    retention_days: float = 30.0  # `prune`: finished messages' raw bytes older than this go; 0: kept

    @property
    def store_label(self) -> str:
        """Where the store is, fit for a message: the path, or the URL without a password."""
        return str(self.database) if self.database_url is None else redact_url(self.database_url)

    def api_problem(self) -> str | None:
        """Why `archive` cannot call the API with these settings, or None."""
        if self.api_key is None and not _is_loopback_url(self.base_url):
            return (
                "HANDINGER_API_KEY: required to call the API "
                "(only a sandbox on a loopback address runs without one)"
            )
        return None


def load_operator_settings(
    env_file: str | Path | None = None, environ: Mapping[str, str] | None = None, *, cwd: Path | None = None
) -> OperatorSettings:
    """The operator verbs' settings: `env_file`, or else `./.env` when there is one (python-dotenv's
    convention), with `environ` on top. Only the keys those verbs use are read and validated (every bad
    one named in one `ConfigError`); the workers, senders and API key a gateway needs are not asked for.
    """
    if env_file is None and (found := (cwd or Path.cwd()) / ".env").is_file():
        env_file = found
    raw: dict[str, str] = {}
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise ConfigError([f"--env-file: {path} does not exist or is not a file"])
        raw.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    if environ:
        raw.update({k: v for k, v in environ.items() if k.startswith(("MAILGATE_", "HANDINGER_"))})
    values = {k: v.strip() for k, v in raw.items() if v.strip() != ""}
    problems: list[str] = []
    p = _Parser(values, problems)
    database = p.get("MAILGATE_DATABASE", str, "./var/mailgate.db") or "./var/mailgate.db"
    database_url = None
    if database.startswith(POSTGRES_SCHEMES):
        database_url = p.get("MAILGATE_DATABASE", _postgres_url, None)
        database = "./var/mailgate.db"
    lease_seconds = p.get("MAILGATE_LEASE_SECONDS", _lease_seconds, 60.0) or 60.0
    settings = OperatorSettings(
        database=Path(database),
        database_url=database_url,
        lease_seconds=lease_seconds,
        base_url=(
            p.get("HANDINGER_BASE_URL", _url, "https://handinger.com") or "https://handinger.com"
        ).rstrip("/"),
        api_key=p.get("HANDINGER_API_KEY", str, None),
        metrics_listen=p.get("MAILGATE_METRICS_LISTEN", _listen, None),
        log_level=p.get("MAILGATE_LOG_LEVEL", _choice(*LOG_LEVELS), "WARNING") or "WARNING",
        log_format=p.get("MAILGATE_LOG_FORMAT", _choice(*LOG_FORMATS), "logfmt") or "logfmt",
        retention_days=_or(p.get("MAILGATE_RETENTION_DAYS", _days_or_off, 30.0), 30.0),
    )
    if problems:
        raise ConfigError(problems)
    return settings


class _Parser:
    def __init__(self, values: Mapping[str, str], problems: list[str]) -> None:
        self.values = values
        self.problems = problems

    def get(
        self, key: str, parse: Callable[[str], T], default: T | None = None, *, required: bool = False
    ) -> T | None:
        value = self.values.get(key)
        if value is None:
            if required:
                self.problems.append(f"{key}: required")
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problems.append(f"{key}: {exc}")
            return default


def _bool(value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _positive_int(value: str) -> int:
    try:
        n = int(value.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"must be positive, got {n}")
    return n


def _positive_float(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"must be positive, got {value}")
    return n


def _bytes_or_off(value: str) -> int:
    try:
        n = int(value.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number of bytes (0: off), got {value!r}") from None
    if n < 0:
        raise ValueError(f"must be 0 (off) or a positive number of bytes, got {n}")
    return n


def _seconds_or_off(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds (0: off), got {value!r}") from None
    if not 0 <= n < float("inf"):
        raise ValueError(f"must be 0 (off) or a positive number of seconds, got {value}")
    return n


def _days_or_off(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ValueError(f"expected a number of days (0: keep forever), got {value!r}") from None
    if not 0 <= n < 100_000:
        raise ValueError(f"must be 0 (keep forever) or a positive number of days, got {value}")
    return n


def _or(value: T | None, default: T) -> T:
    """`value` unless it is None (a 0 is a value, unlike `value or default`)."""
    return default if value is None else value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        for option in options:
            if value.lower() == option.lower():
                return option
        raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")

    return parse


def domain_name(value: str) -> str:
    """A domain name, lower-case, without a trailing dot; ValueError when `value` is not one."""
    return _domain(value)


def _domain(value: str) -> str:
    v = value.lower().rstrip(".")
    if not _DOMAIN.match(v):
        raise ValueError(f"not a domain name: {value!r}")
    return v


def _workers(value: str) -> dict[str, Worker]:
    workers: dict[str, Worker] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        alias, sep, rest = item.partition("=")
        alias = alias.strip().lower()
        if not sep or not rest.strip():
            raise ValueError(f"{item!r}: expected alias=wrk_id[:budget]")
        if not _LOCAL_PART.match(alias) or "+" in alias:
            raise ValueError(
                f"{alias!r}: an alias is a plain local part of at most 24 characters (letters, digits, . _ -)"
            )
        worker_id, _, budget = rest.strip().partition(":")
        budget = budget.strip().lower() or "standard"
        if budget not in BUDGETS:
            raise ValueError(f"{item!r}: budget must be one of {', '.join(BUDGETS)}")
        if alias in workers:
            raise ValueError(f"alias {alias!r} appears twice")
        workers[alias] = Worker(alias, worker_id.strip(), budget)
    if not workers:
        raise ValueError("no workers given")
    return workers


def _senders(value: str) -> tuple[str, ...]:
    """Allowed senders; an internationalised domain (`@mächine.example`) is kept in its IDNA form."""
    from mailgate.models import ascii_domain

    senders = []
    for item in filter(None, (part.strip().lower() for part in value.split(","))):
        local, at, domain = item.rpartition("@")
        domain = ascii_domain(domain)
        if item != "*" and not (at and _DOMAIN.match(domain) and "@" not in local):
            raise ValueError(f"{item!r}: expected user@domain, @domain or *")
        senders.append(item if item == "*" else f"{local}@{domain}")
    if not senders:
        raise ValueError("no senders given")
    return tuple(senders)


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


def _output_hosts(value: str) -> tuple[OutputHost, ...]:
    hosts = []
    for item in filter(None, (part.strip().lower() for part in value.split(","))):
        if "/" in item or "@" in item:
            raise ValueError(f"{item!r}: expected host, host:port or *.domain (a host, not a URL)")
        subdomains = item.startswith("*.")
        rest = item.removeprefix("*.")
        if rest.startswith("["):  # [IPv6]:port
            host, _, port = rest[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = rest.partition(":")
        host = host.rstrip(".")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"{item!r}: not a host name") from None
        try:
            number = int(port) if port else None
        except ValueError:
            raise ValueError(f"{item!r}: bad port {port!r}") from None
        if number is not None and not 0 < number < 65536:
            raise ValueError(f"{item!r}: port out of range")
        literal = _ip_literal(host)
        if (literal and subdomains) or not (literal or _DOMAIN.match(host)):
            raise ValueError(f"{item!r}: expected host, host:port or *.domain")
        hosts.append(OutputHost(literal or host, number, subdomains))
    return tuple(hosts)


def _ip_literal(host: str) -> str | None:
    """`host` in canonical form when it is an IP address, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(value: str) -> Listen:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"expected host:port, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number, got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range: {number}")
    return Listen(host, number)


def _listen_or_unix(value: str) -> Listen:
    if value.startswith("unix:"):
        if not value[5:]:
            raise ValueError("unix: needs a path")
        return Listen(unix_path=value[5:])
    return _listen(value)


def _file_mode(value: str) -> int:
    try:
        mode = int(value.removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"expected an octal mode such as 0660, got {value!r}") from None
    if not 0 < mode <= 0o777:
        raise ValueError(f"expected a mode between 0001 and 0777, got {value!r}")
    return mode


def _group(value: str) -> int:
    """A group name or number, resolved to a gid now so a typo is a bad key, not a failed start."""
    try:
        return grp.getgrnam(value).gr_gid if not value.isdigit() else grp.getgrgid(int(value)).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {value!r}") from None


def default_helo_name(domain: str, fqdn: str | None = None) -> str:
    """The machine's fully qualified name (`fqdn`, default `socket.getfqdn()`), or `domain` when the
    machine knows itself only as localhost (or by a bare host name, which no relay can look up)."""
    fqdn = (_fqdn() if fqdn is None else fqdn).lower().rstrip(".")
    local = fqdn in ("localhost", "localhost.localdomain") or fqdn.endswith(".localdomain")
    return domain if local or "." not in fqdn else fqdn


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn().lower().rstrip(".")


def _helo_name(value: str) -> str:
    """A host name, or an address literal such as [192.0.2.1] (RFC 5321 4.1.3)."""
    if value.startswith("[") and value.endswith("]"):
        try:
            ipaddress.ip_address(value[1:-1].removeprefix("IPv6:"))
        except ValueError:
            raise ValueError(f"not an address literal: {value!r}") from None
        return value
    return _domain(value)


def _relay(value: str) -> Relay:
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtp+starttls", "smtps"):
        raise ValueError(
            f"scheme must be smtp://, smtp+starttls:// or smtps://, got {parts.scheme or value!r}://"
        )
    if not parts.hostname:
        raise ValueError("no host given")
    try:
        port = parts.port or (
            465 if parts.scheme == "smtps" else 587 if parts.scheme == "smtp+starttls" else 25
        )
    except ValueError:
        raise ValueError("bad port") from None
    return Relay(
        parts.scheme,  # type: ignore[arg-type]
        parts.hostname,
        port,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def _postgres_url(value: str) -> str:
    """A libpq URL, checked by libpq's own parser (the `postgres` extra)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ValueError(
            "a PostgreSQL URL needs the PostgreSQL driver: pip install 'mailgate[postgres]'"
        ) from None
    try:
        conninfo_to_dict(value)
    except Exception as exc:  # psycopg.ProgrammingError; its text does not echo the password
        raise ValueError(f"not a usable PostgreSQL URL: {str(exc).strip()}") from None
    return value


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _lease_seconds(value: str) -> float:
    seconds = _positive_float(value)
    if seconds < 1:
        raise ValueError(f"must be at least 1 second, got {value}")
    return seconds


def _secret(value: str) -> str:
    if len(value) < 16:
        raise ValueError("too short: use at least 16 random characters")
    return value


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{value}: no such file")
    return path


_SELECTOR = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?)*$")
MIN_DKIM_BITS = 1024  # receivers ignore shorter keys (RFC 8301); `dkim-keygen` makes 2048


def dkim_selector_name(value: str) -> str:
    """A DKIM selector: one or more DNS labels (`s=` of the signature, `SELECTOR._domainkey.DOMAIN`)."""
    v = value.lower()
    if not _SELECTOR.match(v) or len(v) > 63:
        raise ValueError(f"not a DKIM selector (DNS labels: letters, digits, - and _): {value!r}")
    return v


def _dkim_key(value: str) -> Path:
    """A PEM RSA private key that dkimpy can sign with, of at least MIN_DKIM_BITS bits."""
    from dkim.crypto import UnparsableKeyError, parse_pem_private_key

    path = Path(value)
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{value}: cannot read it: {exc.strerror or exc}") from None
    try:
        key = parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, IndexError, TypeError) as exc:
        raise ValueError(f"{value}: not a PEM RSA private key ({str(exc).splitlines()[0]})") from None
    bits = int(key["modulus"]).bit_length()
    if bits < MIN_DKIM_BITS:
        raise ValueError(f"{value}: a {bits}-bit key is too short; use at least {MIN_DKIM_BITS} bits")
    return path


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise ValueError(f"{value}: no such directory")
    return path
