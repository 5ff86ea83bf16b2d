"""The `mailgate` command: serve, sandbox, demo, check, and the operator verbs (migrate and copy among them).

Exit codes: 0 clean stop, 1 crash (or a failed `check`), 2 usage error, 3 start-up failure, 78 bad
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate import __version__, logs
from mailgate.config import Settings, load_settings
from mailgate.errors import ConfigError, MailgateError, StartupError, StoreBusy
from mailgate.mail.headers import header_block

if TYPE_CHECKING:
    from mailgate.store import Store

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_STARTUP, EXIT_CONFIG = 0, 1, 2, 3, 78
_STATES = {
    "messages": "received, queued, submitting, running, answered, ignored, failed",
    "outbox": "pending, retry, sent, dead, bounced",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgate", description="Email-triggered task gateway for Handinger workers."
    )
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

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
    for name, help_ in (
        ("messages", "list inbound messages"),
        ("outbox", "list outbound messages"),
        ("tasks", "list tasks"),
    ):
        p = verb(name, help_)
        if name != "tasks":
            p.add_argument("--state", default=None, help=f"only rows in this state: {_STATES[name]}")
        p.add_argument("--limit", type=int, default=50)
        p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = verb("show", "show one inbound message, outbox row or task by id")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = verb("replay", "queue a failed message or a dead outbox row again")
    p.add_argument("id")
    p = verb("archive", "archive a task at the API (DELETE /api/tasks/{id})")
    p.add_argument("task_id")
    _add_sender_verbs(verb)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version exit 0, usage errors exit 2
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.verb == "sandbox":
            return _run(_sandbox(args))
        if args.verb == "copy":
            return _run(_copy(args))
        if args.verb == "demo":
            from mailgate.demo import demo

            return _run(
                demo(Path(args.dir), smtp_port=args.smtp_port, api_port=args.api_port, once=args.once)
            )
        if args.verb == "dkim-keygen":
            return _dkim_keygen(args)
        settings = load_settings(args.env_file, os.environ)
        logs.setup(settings.log_level)
        if args.verb == "serve":
            return _run(serve(settings))
        if args.verb == "check":
            return _run(_check(settings))
        return _run(_operator(args, settings))
    except ConfigError as exc:
        print("mailgate: bad configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


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
    gateway = Gateway(settings)
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
    from mailgate.store.copy import SourceInUse, TargetNotEmpty, copy_sqlite_to_postgres

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


async def _operator(args: argparse.Namespace, settings: Settings) -> int:
    from mailgate.service import open_store

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
        return await _operate(args, settings, store)
    finally:
        await store.close()


async def _operate(args: argparse.Namespace, settings: Settings, store: Store) -> int:
    verb = args.verb
    from mailgate.service import make_api_client

    if verb in ("messages", "outbox", "tasks"):
        cols: tuple[str, ...]
        rows: Sequence[Any]
        if verb == "messages":
            rows = await store.list_inbound(args.state, args.limit)
            cols = ("id", "state", "sender", "alias", "task_id", "attempts", "subject", "reason")
        elif verb == "outbox":
            rows = await store.list_outbox(args.state, args.limit)
            cols = ("id", "state", "kind", "notice", "task_id", "attempts", "message_id", "last_error")
        else:
            rows = await store.list_tasks(args.limit)
            cols = ("id", "alias", "owner", "budget", "turns", "subject", "url")
        _print_rows([_public(r) for r in rows], cols, as_json=args.json)
        return EXIT_OK
    if verb == "show":
        found: dict[str, Any] | None = None
        if (row := await store.inbound(args.id)) is not None:
            head = header_block(await store.raw_head(row.raw_id)).decode("utf-8", "replace").rstrip()
            task = await store.task_row(row.task_id) if row.task_id else None
            found = {
                "inbound": _public(row),
                "task": {"id": task.id, "url": task.url, "turns": task.turns} if task else None,
                "headers": head,
                "outbox": [_public(o) for o in await store.outbox_for(row.id)],
            }
        elif (o := await store.outbox_row(args.id)) is not None:
            found = {"outbox": _public(o)}
        elif (t := await store.task_row(args.id)) is not None:
            found = {
                "task": _public(t),
                "participants": await store.participants(t.id),
                "messages": [_public(m) for m in await store.messages_of_task(t.id)],
            }
        if found is None:
            print(f"mailgate: no message, outbox row or task {args.id}", file=sys.stderr)
            return EXIT_USAGE
        found |= await _bounces_shown(store, found)
        if args.json:
            print(json.dumps(found, default=str))
        else:
            _print_found(found)
        return EXIT_OK
    if verb == "replay":
        if await store.replay_inbound(args.id) or await store.replay_outbox(args.id):
            print(f"queued again: {args.id} (a running gateway picks it up within seconds)")
            return EXIT_OK
        print(f"mailgate: {args.id} is not a failed/ignored message or a dead outbox row", file=sys.stderr)
        return EXIT_USAGE
    if verb == "archive":
        api = make_api_client(settings, concurrency=1, timeout=30)
        try:
            archived = await api.delete_task(args.task_id)
        except MailgateError as exc:
            print(f"mailgate: could not archive {args.task_id}: {exc}", file=sys.stderr)
            return EXIT_CRASH
        finally:
            await api.aclose()
        if archived:
            await store.archive_task(args.task_id)
        print(f"{args.task_id}: {'archived' if archived else 'not archived'}")
        return EXIT_OK
    if verb in ("suppressed", "unsuppress"):
        return await _suppression(args, store)
    return EXIT_USAGE  # pragma: no cover (argparse allows only the verbs above)


def _public(row: Any) -> dict[str, Any]:
    data = asdict(row)
    data.pop("data", None)
    for key in ("received_at", "updated_at", "created_at", "sent_at", "next_attempt_at"):
        if isinstance(data.get(key), float) and data[key] > 0:
            data[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(data[key]))
    return data


_SHOW_COLS = {
    "outbox": ("id", "state", "kind", "notice", "attempts", "message_id", "refused", "last_error"),
    "messages": ("id", "state", "sender", "attempts", "subject", "reason"),
}


def _print_found(found: dict[str, Any]) -> None:
    """`show` for a terminal: one section per part, `key  value` lines, tables for lists of rows."""
    for section, value in found.items():
        if value is None:
            continue
        print(f"== {section}")
        if isinstance(value, dict):
            width = max(map(len, value), default=0)
            for key, item in value.items():
                if item is not None and item != "":
                    print(f"  {key.ljust(width)}  {item}")
        elif isinstance(value, str):
            print("\n".join("  " + line for line in value.splitlines()))
        elif value and isinstance(value[0], dict):
            _print_rows(value, _SHOW_COLS.get(section, tuple(value[0])), as_json=False)
        else:
            print("\n".join(f"  {item}" for item in value) or "  (none)")
        print()


def _print_rows(rows: list[dict[str, Any]], cols: Sequence[str], *, as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    if not rows:
        print("(none)")
        return
    table = [[str(row.get(c) if row.get(c) is not None else "-")[:60] for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


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
    if args.verb == "suppressed":
        rows = [_public(r) | {"suppressed_at": _when(r.suppressed_at)} for r in await store.suppressed()]
        _print_rows(rows, ("addr", "suppressed_at", "reason"), as_json=args.json)
        return EXIT_OK
    if await store.unsuppress(args.addr):
        print(f"{args.addr.lower()}: gets notices again")
        return EXIT_OK
    print(f"mailgate: {args.addr} is not suppressed", file=sys.stderr)
    return EXIT_USAGE


async def _bounces_shown(store: Store, found: dict[str, Any]) -> dict[str, Any]:
    """`show`'s bounces section: the bounces of the replies shown, and those a bounce message reported."""
    outbox = found.get("outbox")
    rows = [outbox] if isinstance(outbox, dict) else outbox if isinstance(outbox, list) else []
    bounces = await store.bounces_of([r["id"] for r in rows])
    if isinstance(found.get("inbound"), dict):
        bounces += await store.bounce_reported_by(found["inbound"]["id"])
    shown = [_public(b) | {"at": _when(b.at), "hard": bool(b.hard)} for b in bounces]
    return {"bounces": shown} if shown else {}


def _when(at: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) if at else None


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
