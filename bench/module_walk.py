"""Follow one message through the code: which mailgate modules it enters, in order, from DATA to the relay.

    python bench/module_walk.py            # this checkout
    python bench/module_walk.py --all      # also list every entry, not only the re-entries

A *visit* is a call from one mailgate module into a function of another (returns are not visits, and a
module calling its own functions stays in it). The walk is the sequence of visited modules; a *re-entry*
is a visit to a module the message had already left for another one. Two counts are printed: over every
module, and over the stage modules only (leaving out the shared pieces every stage uses: the store,
models, errors, config, logs, loops and the API client, whose calls are hand-offs rather than a return
to an earlier stage). The sandbox API and the test relay are outside the walk.

It runs the real gateway in-process (SMTP on 127.0.0.1, the sandbox, a recording relay) and traces one
plain message with `sys.setprofile`/`threading.setprofile`, worker threads included.
"""

from __future__ import annotations

import argparse
import asyncio
import dis
import functools
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: `python bench/module_walk.py`

SHARED = (
    "mailgate.store",
    "mailgate.queries",
    "mailgate.models",
    "mailgate.errors",
    "mailgate.config",
    "mailgate.logs",
    "mailgate.loops",
    "mailgate.jobs",
    "mailgate.api",
)


def _module(frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    name = frame.f_globals.get("__name__", "")
    if not isinstance(name, str) or not name.startswith("mailgate") or name.startswith("mailgate.sandbox"):
        return None
    return name


@functools.cache
def _first_resume(code: Any) -> int:
    """The offset of a code object's first RESUME: where a fresh coroutine or generator frame starts."""
    for ins in dis.get_instructions(code):
        if ins.opname == "RESUME":
            return ins.offset
    return 0


def _fresh(frame: FrameType) -> bool:
    """A first call, not the resumption of a suspended coroutine or generator (profile calls both)."""
    return frame.f_lasti <= _first_resume(frame.f_code)


class Walk:
    def __init__(self) -> None:
        self.visits: list[str] = []
        self.on = False
        self.lock = threading.Lock()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.on or not _fresh(frame):
            return
        callee = _module(frame)
        caller = _module(frame.f_back)
        if callee is None or caller is None or callee == caller:
            return
        with self.lock:
            self.visits.append(callee)


def reentries(walk: list[str]) -> tuple[int, list[str]]:
    """How many visits return to a module already left, and which modules they were."""
    seen: set[str] = set()
    last: str | None = None
    again: list[str] = []
    for module in walk:
        if module == last:
            continue
        if module in seen:
            again.append(module)
        seen.add(module)
        last = module
    return len(again), again


async def run_one() -> list[str]:
    from mailgate.config import load_settings
    from mailgate.sandbox import SandboxOptions, run_sandbox
    from mailgate.service import Gateway
    from tests.mail import make_mail, smtp_send
    from tests.relay import RecordingRelay

    walk = Walk()
    sys.setprofile(walk.profile)
    threading.setprofile(walk.profile)
    relay = RecordingRelay()
    await relay.start()
    with tempfile.TemporaryDirectory() as tmp:
        async with run_sandbox(SandboxOptions(api_key="k")) as sandbox:
            settings = load_settings(
                environ={
                    "HANDINGER_BASE_URL": sandbox.url,
                    "HANDINGER_API_KEY": "k",
                    "MAILGATE_DOMAIN": "agents.example.com",
                    "MAILGATE_WORKERS": "research=wrk_research",
                    "MAILGATE_ALLOWED_SENDERS": "@example.org",
                    "MAILGATE_AUTH": "none",
                    "MAILGATE_LISTEN": "127.0.0.1:0",
                    "MAILGATE_DATABASE": f"{tmp}/mailgate.db",
                    "MAILGATE_SPOOL_DIR": f"{tmp}/spool",
                    "MAILGATE_SMTP_RELAY": f"smtp://127.0.0.1:{relay.port}",
                    "MAILGATE_SECRET": "module-walk-secret-0123456789",
                }
            )
            async with Gateway(settings, poll_base=0.05, retry_base=0.05) as gw:
                walk.on = True
                mail = make_mail(body="Please summarise this.", attachments=[("a.txt", "text/plain", b"hi")])
                await smtp_send(gw.smtp_port, mail)
                await relay.wait_for(1, timeout=30)
                walk.on = False
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    await relay.close()
    return walk.visits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="print the whole walk")
    args = parser.parse_args()
    walk = asyncio.run(run_one())
    stages = [m for m in walk if not m.startswith(SHARED)]
    collapsed = [m for i, m in enumerate(stages) if i == 0 or stages[i - 1] != m]
    n_all, _ = reentries(walk)
    n_stage, again = reentries(stages)
    if args.all:
        print("walk:", " -> ".join(m.removeprefix("mailgate.") for m in collapsed))
    print(f"visits: {len(walk)} ({len(set(walk))} modules)")
    print(f"re-entries, every module: {n_all}")
    print(f"re-entries, stage modules: {n_stage}  ({', '.join(sorted(set(again))) or 'none'})")


if __name__ == "__main__":
    main()
