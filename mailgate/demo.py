"""`mailgate demo`: the sandbox API, the gateway on the embedded defaults, and one sample email.

Everything stays on 127.0.0.1: the sandbox answers as a Handinger worker would (an echo agent), and
replies land in a local Maildir, which the demo prints.
"""

from __future__ import annotations

import asyncio
import mailbox
import signal
import sys
import time
from email.message import EmailMessage
from email.policy import default
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib

from mailgate import logs
from mailgate.config import load_settings

DOMAIN = "agents.example.com"
SENDER = "you@example.org"


async def demo(folder: Path, *, smtp_port: int, api_port: int, once: bool = False) -> int:
    from mailgate.errors import StartupError
    from mailgate.sandbox import SandboxOptions, run_sandbox
    from mailgate.service import Gateway

    logs.setup("ERROR")  # the demo runs with MAILGATE_AUTH=none on purpose: no warning about it
    folder.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before anything runs)
    try:
        sandbox_cm = run_sandbox(SandboxOptions(), port=api_port)
        sandbox = await sandbox_cm.__aenter__()
    except OSError as exc:
        print(f"mailgate demo: cannot start the sandbox API on 127.0.0.1:{api_port}: {exc}", file=sys.stderr)
        return 3
    settings = load_settings(
        environ={
            "HANDINGER_BASE_URL": sandbox.url,
            "MAILGATE_DOMAIN": DOMAIN,
            "MAILGATE_WORKERS": "research=wrk_demo_research,writer=wrk_demo_writer",
            "MAILGATE_ALLOWED_SENDERS": "*",
            "MAILGATE_AUTH": "none",
            "MAILGATE_LISTEN": f"127.0.0.1:{smtp_port}",
            "MAILGATE_DATABASE": str(folder / "mailgate.db"),
            "MAILGATE_OUTBOX_DIR": str(folder / "outbox"),
            "MAILGATE_SPOOL_DIR": str(folder / "spool"),
        }
    )
    gateway = Gateway(settings, poll_base=0.2)
    try:
        await gateway.start()
    except StartupError as exc:
        print(f"mailgate demo: {exc}", file=sys.stderr)
        await sandbox_cm.__aexit__(None, None, None)
        return 3
    try:
        print(f"sandbox API  {sandbox.url}")
        print(f"gateway SMTP 127.0.0.1:{gateway.smtp_port}  (workers: research@{DOMAIN}, writer@{DOMAIN})")
        print(f"replies go to the Maildir {settings.outbox_dir}\n")
        outbox = mailbox.Maildir(settings.outbox_dir, create=True)
        before = set(outbox.keys())
        message = EmailMessage()
        message["From"] = f"You <{SENDER}>"
        message["To"] = f"research@{DOMAIN}"
        message["Subject"] = "What can you do?"
        message["Message-ID"] = make_msgid(domain="example.org")
        message.set_content("Hello! Please tell me what you would do with this email.\n\nThanks,\nYou\n")
        print(f"sending a sample email from {SENDER} to research@{DOMAIN} ...")
        await aiosmtplib.send(message, hostname="127.0.0.1", port=gateway.smtp_port)
        reply = await _wait_for_new(outbox, before, timeout=30)
        if reply is None:
            print("no reply arrived within 30 s: see `mailgate messages --env-file ...`", file=sys.stderr)
            return 1
        print("\n----- the reply -----")
        print(reply)
        print("----- end of reply -----\n")
        if once:
            return 0
        print(
            "The gateway keeps running; press Ctrl-C to stop it. Send more mail, for example:\n"
            f"  swaks --server 127.0.0.1:{gateway.smtp_port} --from {SENDER} "
            f"--to research@{DOMAIN} --header 'Subject: Hello' --body 'Summarise this'\n"
            "or with Python:\n"
            f"  python -c \"import smtplib; smtplib.SMTP('127.0.0.1', {gateway.smtp_port}).sendmail("
            f"'{SENDER}', ['research@{DOMAIN}'], "
            f"'From: {SENDER}\\r\\nTo: research@{DOMAIN}\\r\\nSubject: Hi\\r\\n\\r\\nHello')\"\n"
            f"Replies appear in {settings.outbox_dir}/new/ (one file per message)."
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await gateway.stop()
        await sandbox_cm.__aexit__(None, None, None)


async def _wait_for_new(box: mailbox.Maildir, before: set[str], *, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(box.keys()) - before
        if new:
            data = box.get_bytes(sorted(new)[0])
            msg = mailbox.MaildirMessage(data)
            from email import message_from_bytes

            parsed = message_from_bytes(data, policy=default)
            head = "\n".join(
                f"{k}: {v}"
                for k, v in parsed.items()
                if k
                in (
                    "From",
                    "To",
                    "Reply-To",
                    "Subject",
                    "Message-ID",
                    "In-Reply-To",
                    "References",
                    "Auto-Submitted",
                )
            )
            body = parsed.get_body(preferencelist=("plain",))
            del msg
            return head + "\n\n" + (body.get_content() if body is not None else "")
        await asyncio.sleep(0.1)
    return None
