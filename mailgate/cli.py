"""The `mailgate` command: serve, sandbox, demo, check, migrate, copy, and the operator verbs (in `admin`).

Exit codes: 0 clean stop, 1 crash (or a failed `check`, or an operator verb's "not found"), 2 usage
error (bare `mailgate` prints the help), 3 start-up failure, 78 bad configuration. Output cut short by
a closed pipe (`mailgate messages | head`) is no error.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate import __version__, logs
from mailgate.config import OperatorSettings, Settings, load_operator_settings, load_settings
from mailgate.errors import ConfigError, SourceInUse, StartupError, StoreBusy, TargetNotEmpty
from mailgate.models import InboundState, OutboxState

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_STARTUP, EXIT_CONFIG = 0, 1, 2, 3, 78
OPERATOR_VERBS = (
    *("messages", "outbox", "tasks", "show", "status", "replay", "archive"),
    *("migrate", "suppressed", "unsuppress", "prune", "approve", "deny", "senders"),
)
INBOUND_STATES = tuple(str(s) for s in InboundState)
OUTBOX_STATES = tuple(str(s) for s in OutboxState)

if TYPE_CHECKING:
    from mailgate.store import Store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate", description="Email-triggered task gateway for Handinger workers."
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help_: str, *, env: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if env:
            p.add_argument(
                "--env-file", metavar="PATH", help="read settings from this .env file (environment wins)"
            )
        return p

    verb("serve", "run the gateway (SMTP/LMTP in, replies out)")
    verb(
        "check",
        "check the configuration, the store, the listeners, the relay, the API key, the workers and the "
        "templates without changing anything; exit 1 when a check fails",
    )
    verb("migrate", "bring the store (SQLite or PostgreSQL) to this mailgate's schema version, then exit")
    p = verb(
        "copy",
        "copy a gateway's state from its SQLite file into a new PostgreSQL database (gateway stopped)",
        env=False,
    )
    p.add_argument("--from", dest="source", required=True, metavar="SQLITE_PATH")
    p.add_argument("--to", dest="target", required=True, metavar="POSTGRESQL_URL")
    p = verb(
        "sandbox", "run the local Handinger-compatible API (for trying mailgate and for tests)", env=False
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--api-key", default=None, help="require this bearer key (default: none)")
    p.add_argument("--era", choices=("seed", "new"), default="seed", help="API behaviour to imitate")
    p.add_argument("--turn-seconds", type=float, default=0.0, help="how long each echo turn works")
    p = verb(
        "demo", "run the sandbox and the gateway on the embedded defaults and send a sample email", env=False
    )
    p.add_argument("--dir", default="var/demo", help="where the demo keeps its database and Maildir")
    p.add_argument("--smtp-port", type=int, default=2525)
    p.add_argument("--api-port", type=int, default=8787)
    p.add_argument("--once", action="store_true", help="exit after the sample reply instead of running on")

    def positive(value: str) -> int:
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
        return int(value)

    for name, help_, states in (
        ("messages", "list inbound messages, newest first", INBOUND_STATES),
        ("outbox", "list replies and notices, newest first", OUTBOX_STATES),
        ("tasks", "list tasks, newest first", ()),
    ):
        p = verb(name, help_)
        if states:
            p.add_argument(
                "--state", choices=states, default=None, help=f"only rows in this state: {', '.join(states)}"
            )
        p.add_argument("--limit", type=positive, default=50, help="at most this many rows (default 50)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = verb(
        "show",
        "show one message (by queue id or Message-ID), reply (by outbox id or Message-ID) or task (by id)",
    )
    p.add_argument(
        "id", help="a queue id, outbox id, task id, or a Message-ID (<...@...>, brackets optional)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = verb(
        "status",
        "the queue at a glance (like postqueue -p): rows per state, the oldest waiting message, running "
        "turns, the API hold, the last problems",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = verb("replay", "queue a failed or ignored message, or a dead outbox row, again")
    p.add_argument("id")
    p = verb("archive", "archive a task at the API (DELETE /api/tasks/{id})")
    p.add_argument("task_id")
    p = verb(
        "prune",
        "retention, now: cut the raw bytes of messages finished more than MAILGATE_RETENTION_DAYS ago to "
        "their header block (serve does it every hour)",
    )
    p.add_argument("--days", type=_days, default=None, help="this many days instead (0 < DAYS)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = verb("approve", "run a held message (MAILGATE_UNKNOWN_SENDERS=hold) as if its sender were allowed")
    p.add_argument("id", help="the queue id of a held message (mailgate messages --state held)")
    p.add_argument(
        "--always", action="store_true", help="and allow its sender from now on (the list `senders` shows)"
    )
    p = verb("deny", "refuse a held message: it ends ignored, never run")
    p.add_argument("id", help="the queue id of a held message (mailgate messages --state held)")
    p = verb(
        "senders", "list the senders approved with `approve --always` (besides MAILGATE_ALLOWED_SENDERS)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_sender_verbs(verb)
    parser.epilog = (
        "The operator verbs (messages, outbox, tasks, show, status, replay, archive, prune, approve, deny, "
        "senders) need only the database: without --env-file they read ./.env when there is one."
    )
    return parser


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {value!r}") from None
    if not 0 < days < 100_000:
        raise argparse.ArgumentTypeError(f"expected a positive number of days, got {value!r}")
    return days


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version exit 0, usage errors exit 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    if args.verb is None:  # bare `mailgate`: what it can do
        parser.print_help()
        return EXIT_USAGE
    try:
        code = _main(args)
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print("mailgate: bad configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `mailgate messages | head`: the reader has all it wanted
        _stdout_to_devnull()
        return EXIT_OK


def _main(args: argparse.Namespace) -> int:
    if args.verb == "sandbox":
        return _run(_sandbox(args))
    if args.verb == "copy":
        return _run(_copy(args))
    if args.verb == "dkim-keygen":
        return _dkim_keygen(args)
    if args.verb == "demo":
        from mailgate.demo import demo

        return _run(demo(Path(args.dir), smtp_port=args.smtp_port, api_port=args.api_port, once=args.once))
    if args.verb in OPERATOR_VERBS:
        operator = load_operator_settings(args.env_file, os.environ)
        if args.verb == "archive" and (problem := operator.api_problem()) is not None:
            raise ConfigError([problem])
        logs.setup(operator.log_level, operator.log_format)
        return _run(_operator(args, operator))
    settings = load_settings(args.env_file, os.environ)
    logs.setup(settings.log_level, settings.log_format)
    if args.verb == "serve":
        from mailgate.loops import run_loop

        return int(run_loop(serve(settings), settings.event_loop))
    return _run(_check(settings))


def _stdout_to_devnull() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's last flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a real file (a test's capture)
        pass


def _run(coro: Any) -> int:
    return int(asyncio.run(coro))


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; exit code as documented."""
    from mailgate.service import Gateway
    from mailgate.systemd import Notifier

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    systemd = Notifier.from_environ(os.environ)
    gateway = Gateway(settings, role="listener" if settings.runner_process else "all")
    try:
        await gateway.start()
    except StartupError as exc:
        print(f"mailgate: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    listening = f"smtp {settings.listen.host}:{gateway.smtp_port}, lmtp {settings.lmtp_listen or 'off'}"
    systemd.notify(f"READY=1\nSTATUS=listening: {listening}")
    watchdog = asyncio.create_task(systemd.watchdog(), name="watchdog")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1\nSTATUS=stopping: finishing the work in hand")
        await gateway.stop()
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
    return EXIT_OK


async def _sandbox(args: argparse.Namespace) -> int:
    from mailgate.sandbox import SandboxOptions, serve_sandbox

    logs.setup("INFO")
    options = SandboxOptions(api_key=args.api_key, era=args.era, turn_seconds=args.turn_seconds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = asyncio.create_task(serve_sandbox(options, args.host, args.port))
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({server, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in (server, waiter):
        task.cancel()
    await asyncio.gather(server, waiter, return_exceptions=True)
    if server in done and server.exception() is not None:
        print(f"mailgate: sandbox failed: {server.exception()}", file=sys.stderr)
        return EXIT_STARTUP
    return EXIT_OK


async def _copy(args: argparse.Namespace) -> int:
    from mailgate.config import POSTGRES_SCHEMES, redact_url
    from mailgate.store.copy import copy_sqlite_to_postgres

    if not args.target.startswith(POSTGRES_SCHEMES):
        print("mailgate: --to must be a postgresql:// URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        counts = await copy_sqlite_to_postgres(Path(args.source), args.target)
    except (FileNotFoundError, SourceInUse, TargetNotEmpty) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreBusy as exc:
        print(f"mailgate: cannot copy: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    print(f"copied {args.source} to {redact_url(args.target)}:")
    for table, n in counts.items():
        print(f"  {table:<15} {n}")
    return EXIT_OK


async def _check(settings: Settings) -> int:
    """One line per check (`ok` or `FAIL` and what was seen); exit 1 when any failed. Changes nothing."""
    from mailgate.checks import run_checks
    from mailgate.service import make_api_client

    api = make_api_client(settings, concurrency=1, timeout=15)
    try:
        results = await run_checks(settings, api)
    finally:
        await api.aclose()
    for result in results:
        print(result)
    return EXIT_OK if all(r.ok for r in results) else EXIT_CRASH


async def _operator(args: argparse.Namespace, settings: OperatorSettings) -> int:
    from mailgate.admin import run
    from mailgate.service import open_store

    # `migrate` makes a new store (version 0 to the current one); the other verbs read an existing one
    if args.verb != "migrate" and settings.database_url is None and not settings.database.is_file():
        print(
            f"mailgate: no database at {settings.database} (set MAILGATE_DATABASE, in ./.env or with "
            "--env-file)",
            file=sys.stderr,
        )
        return EXIT_STARTUP
    try:
        store = await open_store(settings)
    except StartupError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    try:
        if args.verb == "migrate":
            before, now = store.migrated_from, store.schema_version
            done = (
                f"migrated from version {before} to {now}" if before != now else f"already at version {now}"
            )
            print(f"store {settings.store_label}: {done}")
            return EXIT_OK
        if args.verb in ("suppressed", "unsuppress"):
            return await _suppression(args, store)
        return await run(args.verb, args, settings, store)
    finally:
        await store.close()


# --- what the sender hears: bounces, suppression, DKIM keys (issue 15) ---------------------------------


def _add_sender_verbs(verb: Any) -> None:
    p = verb("suppressed", "list the addresses that get no more notices (their replies kept bouncing)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = verb("unsuppress", "send notices to ADDR again; its earlier bounces no longer count")
    p.add_argument("addr")
    p = verb(
        "dkim-keygen",
        "write a new 2048-bit RSA key for DKIM-signed replies (0600) and print its DNS TXT record",
    )
    p.add_argument("selector", help="the DKIM selector (MAILGATE_DKIM_SELECTOR), e.g. mailgate2025")
    p.add_argument(
        "--out", metavar="PATH", help="where to write the key (default: ./SELECTOR.pem); never overwritten"
    )
    p.add_argument("--domain", help="the signing domain (default: MAILGATE_DOMAIN of the settings)")


async def _suppression(args: argparse.Namespace, store: Store) -> int:
    """`suppressed`: the list (exit 0); `unsuppress ADDR`: exit 0 when cleared, 2 when not suppressed."""
    from mailgate.admin import print_rows, public

    if args.verb == "suppressed":
        rows = [public(r) for r in await store.suppressed()]
        print_rows(rows, ("addr", "suppressed_at", "reason"), rows, args.json)
        return EXIT_OK
    if await store.unsuppress(args.addr):
        print(f"{args.addr.lower()}: gets notices again")
        return EXIT_OK
    print(f"mailgate: {args.addr} is not suppressed", file=sys.stderr)
    return EXIT_USAGE


def _dkim_keygen(args: argparse.Namespace) -> int:
    """Write the key (0600, never over an existing file) and print the TXT record to publish."""
    from mailgate import private
    from mailgate.config import dkim_selector_name, domain_name
    from mailgate.replies.signing import new_key, txt_record

    try:
        selector = dkim_selector_name(args.selector)
        domain = domain_name(args.domain) if args.domain else None
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if domain is None:  # a bad configuration is exit 78, as for every verb
        domain = load_settings(args.env_file, os.environ).domain
    path = Path(args.out or f"{selector}.pem")
    if path.exists():
        print(f"mailgate: {path} exists; it is not overwritten", file=sys.stderr)
        return EXIT_USAGE
    pem, public_der = new_key()
    try:
        private.write_file(path, pem)
    except OSError as exc:
        print(f"mailgate: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CRASH
    print(txt_record(selector, domain, public_der))
    print(
        f"mailgate: the key is in {path} (0600). Publish the record above in DNS, then set "
        f"MAILGATE_DKIM_SELECTOR={selector} and MAILGATE_DKIM_KEY={path.resolve()}",
        file=sys.stderr,
    )
    return EXIT_OK
