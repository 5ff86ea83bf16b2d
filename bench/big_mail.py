"""How much memory a big message costs mailgate, and how long its upload takes.

Runs the real gateway (`python -m mailgate serve`) in a subprocess against an in-process sandbox, with
replies going to a Maildir, then sends one ~40 MB message (5 attachments of ~6 MB, base64) over SMTP and
prints:

- mailgate's peak RSS growth (the kernel's high-water mark, VmHWM, minus the idle RSS just before the
  message), as a multiple of the message size, up to the 250, the upload and the reply: for the SMTP
  listener, and for the runner process that reads, parses, spools and uploads the message when there is
  one (MAILGATE_RUNNER=process; `auto` with two CPUs or more; `--runner inline` measures one process);
- the seconds from the 250 reply to the sandbox having received the whole upload;
- then `--sessions` (8) sessions that each send `--unfinished` (39 MB) into DATA and stop there: the
  gateway's RSS growth while they hang (DATA past 1 MiB is spooled to `spool/incoming`), the bytes in
  the spool, and the RSS and spool once they hang up.

    .venv/bin/python bench/big_mail.py [--files 5] [--size 6000000] [--keep] [--runner auto]
                                       [--sessions 8] [--unfinished 39000000]

Needs `psutil` (the `bench` extra) and Linux (/proc for the high-water mark).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import mailbox
import os
import socket
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import psutil  # type: ignore[import-untyped, unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: `python bench/big_mail.py`

from _common import verdict  # noqa: E402

from mailgate.sandbox import SandboxOptions, run_sandbox  # noqa: E402

MB = 1_000_000


def build_message(count: int, size: int) -> tuple[bytes, list[str]]:
    """A message with `count` random attachments of `size` bytes, and their sha256s."""
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "research@agents.example.com"
    msg["Subject"] = "Big attachments"
    msg["Message-ID"] = "<big-mail-bench@example.org>"
    msg.set_content("Please look at these files.")
    digests = []
    for n in range(count):
        data = os.urandom(size)
        digests.append(hashlib.sha256(data).hexdigest())
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=f"part-{n + 1}.bin")
    return msg.as_bytes(), digests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def high_water_mark(pid: int) -> int:
    """VmHWM of `pid` in bytes: the peak resident set size since the process started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc (not Linux?)")


def reset_high_water_mark(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_for_port(port: int, proc: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            raise SystemExit(f"mailgate exited early with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("mailgate did not start listening") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def unfinished(port: int, pid: int, sessions: int, size: int, spool: Path) -> None:
    """`sessions` sessions each `size` bytes into DATA, left there: RSS and spool while they hang, after."""
    incoming = spool / "incoming"

    def spooled() -> int:
        return sum(p.stat().st_size for p in incoming.iterdir()) if incoming.is_dir() else 0

    async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
        while (line := await reader.readline())[3:4] == b"-":
            pass
        if not line.startswith(code):
            raise SystemExit(f"expected {code!r}, got {line!r}")

    opened = []
    for _ in range(sessions):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await expect(reader, b"220")
        for command, code in (
            (b"EHLO bench.example.org", b"250"),
            (b"MAIL FROM:<alice@example.org>", b"250"),
            (b"RCPT TO:<research@agents.example.com>", b"250"),
            (b"DATA", b"354"),
        ):
            writer.write(command + b"\r\n")
            await expect(reader, code)
        opened.append((reader, writer))
    idle = psutil.Process(pid).memory_info().rss
    chunk = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n" * 1000

    async def stream(writer: asyncio.StreamWriter) -> None:
        writer.write(b"From: alice@example.org\r\nSubject: never finished\r\n\r\n")
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    started = time.monotonic()
    await asyncio.gather(*(stream(w) for _, w in opened))
    sent = sessions * (size // len(chunk)) * len(chunk)
    await wait_until(lambda: spooled() >= sent - sessions * 2 * MB, 300, "the sessions' data in the spool")
    hanging = psutil.Process(pid).memory_info().rss
    print(
        f"{sessions} unfinished sessions of {size / MB:.0f} MB ({sent / MB:.0f} MB sent in "
        f"{time.monotonic() - started:.1f} s): RSS {idle / MB:.1f} -> {hanging / MB:.1f} MB "
        f"(+{(hanging - idle) / MB:.1f} MB = {(hanging - idle) / sent:.3f}x what they sent); "
        f"spool/incoming holds {spooled() / MB:.0f} MB in {len(list(incoming.iterdir()))} files"
    )
    for _, writer in opened:
        writer.close()
    await wait_until(lambda: spooled() == 0, 60, "the spool files removed")
    await asyncio.sleep(1.0)
    after = psutil.Process(pid).memory_info().rss
    print(f"after they hung up: RSS {after / MB:.1f} MB, spool/incoming empty")


async def runner_of(pid: int, mode: str) -> int | None:
    """The pid of the runner process `serve` starts (None when it runs inline)."""
    if mode == "inline":
        return None
    deadline = time.monotonic() + 20
    while not (children := psutil.Process(pid).children()):
        if mode == "process" and time.monotonic() > deadline:
            raise SystemExit("no runner process")
        if mode == "auto" and time.monotonic() > deadline - 15:
            return None  # one CPU: inline
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # let it settle into its idle size
    child: int = children[0].pid
    return child


async def bench(
    count: int, size: int, sessions: int, unfinished_size: int, workdir: Path, runner: str
) -> None:
    raw, digests = build_message(count, size)
    print(f"message: {len(raw) / MB:.1f} MB ({count} attachments of {size / MB:.1f} MB, base64)")
    async with run_sandbox(SandboxOptions(api_key="bench-key")) as sandbox:
        port = free_port()
        env = {
            **os.environ,
            "HANDINGER_BASE_URL": sandbox.url,
            "HANDINGER_API_KEY": "bench-key",
            "MAILGATE_DOMAIN": "agents.example.com",
            "MAILGATE_WORKERS": "research=wrk_research",
            "MAILGATE_ALLOWED_SENDERS": "@example.org",
            "MAILGATE_AUTH": "none",
            "MAILGATE_LISTEN": f"127.0.0.1:{port}",
            "MAILGATE_DATABASE": str(workdir / "mailgate.db"),
            "MAILGATE_OUTBOX_DIR": str(workdir / "outbox"),
            "MAILGATE_SPOOL_DIR": str(workdir / "spool"),
            "MAILGATE_SECRET": "bench-secret-0123456789abcdef",
            "MAILGATE_LOG_LEVEL": "WARNING",
            "MAILGATE_RUNNER": runner,
        }
        env.pop("MAILGATE_SMTP_RELAY", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailgate", "serve", cwd=str(ROOT), env=env
        )
        try:
            await wait_for_port(port, proc)
            pid = proc.pid
            runner_pid = await runner_of(pid, runner)
            pids = {"listener": pid} if runner_pid is None else {"listener": pid, "runner": runner_pid}
            idles = {name: psutil.Process(p).memory_info().rss for name, p in pids.items()}
            reset = all(reset_high_water_mark(p) for p in pids.values())
            print(
                "mailgate idle RSS: "
                + ", ".join(f"{name} {idle / MB:.1f} MB" for name, idle in idles.items())
                + f" (high-water marks reset: {reset})"
            )

            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=120, start_tls=False)
            await client.connect()
            started = time.monotonic()
            await client.sendmail("alice@example.org", ["research@agents.example.com"], raw)
            accepted = time.monotonic()
            peak_accept = {name: high_water_mark(p) for name, p in pids.items()}
            await client.quit()
            print(f"SMTP DATA -> 250: {accepted - started:.2f} s")

            await wait_until(lambda: sandbox.state.requests, 120, "the upload to reach the sandbox")
            uploaded = time.monotonic()
            peak_upload = {name: high_water_mark(p) for name, p in pids.items()}
            [request] = sandbox.state.requests
            received = [f.sha256 for f in request.files]
            same = "identical" if received == digests else f"DIFFERENT ({len(received)} files)"
            print(f"250 -> upload received: {uploaded - accepted:.2f} s; bytes at the API: {same}")

            box = mailbox.Maildir(workdir / "outbox", create=True)
            await wait_until(lambda: len(box.keys()) > 0, 120, "the reply in the Maildir")
            peak_reply = {name: high_water_mark(p) for name, p in pids.items()}
            peaks = (
                ("to the 250", peak_accept),
                ("to the upload", peak_upload),
                ("to the reply", peak_reply),
            )
            worst = 0.0
            for name, idle in idles.items():
                for label, peak in peaks:
                    growth = peak[name] - idle
                    worst = max(worst, growth / len(raw))
                    print(
                        f"peak RSS growth of the {name} {label}: {growth / MB:.1f} MB = "
                        f"{growth / len(raw):.2f}x the message size"
                    )
            ok = verdict(worst <= 1.5)
            print(f"largest peak RSS growth: {worst:.2f}x the message size (target <= 1.5x): {ok}")
            if sessions:
                await unfinished(port, pid, sessions, unfinished_size, workdir / "spool")
        finally:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--files", type=int, default=5, help="attachments (default 5)")
    parser.add_argument("--size", type=int, default=6 * MB, help="bytes per attachment (default 6 MB)")
    parser.add_argument(
        "--sessions", type=int, default=8, help="unfinished DATA sessions (default 8; 0: none)"
    )
    parser.add_argument("--unfinished", type=int, default=39 * MB, help="bytes each sends (default 39 MB)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--runner", choices=("auto", "inline", "process"), default="auto", help="MAILGATE_RUNNER (auto)"
    )
    args = parser.parse_args()
    figures = (args.files, args.size, args.sessions, args.unfinished)
    if args.keep:
        tmp = tempfile.mkdtemp(prefix="mailgate-bench-")
        print(f"working directory: {tmp}")
        asyncio.run(bench(*figures, Path(tmp), args.runner))
        return
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmp:
        asyncio.run(bench(*figures, Path(tmp), args.runner))


if __name__ == "__main__":
    main()
