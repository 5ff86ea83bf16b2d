"""Follow one message through the code: which mailgate modules it enters, in order, from DATA to the relay.

    python bench/module_walk.py            # this checkout
    python bench/module_walk.py --all      # also print the walk, and every call edge with its functions

A *visit* is a call from one mailgate module into a function written in another (returns are not
visits, and a module calling its own functions stays in it). The caller is the nearest mailgate frame
below the callee, so a call that passes through a library (jinja2 calling a filter, the email package
calling a policy) counts, and so does a call that crosses to another task or thread: a task's first
frame is called by the module that created the task, a worker thread's (`asyncio.to_thread`) by the
module that handed it the work. Code the module's file does not contain (the `__init__` and `__eq__`
that `dataclasses` writes, and what they call: a field's default factory) is not a visit: making a plain
value is not entering a module. A frame with no mailgate caller at all (the SMTP client closing its
connection, a timer) is not on the message's path, except where the walk starts: the SMTP handler's
DATA, called by `smtp/server.py`, which read the message.

The walk is the sequence of visited modules; a *re-entry* is a visit to a module the message had already
left for another one. Two counts are printed: over every module, and over the stage modules only (leaving
out the shared pieces every stage uses: the store (rows, and the spool's files), models, errors, config,
logs, loops, metrics, the owner-only file helpers, the API client with its download policy (`egress`,
which only the client calls) and the reply and return-path token formulas (`tokens`: the reply side makes
them, admission verifies them), whose calls are hand-offs rather than a return to an earlier stage). The
sandbox API and the test relay are outside the walk.

It runs the real gateway in-process (SMTP on 127.0.0.1, the sandbox, a recording relay), lets serve's
background API check finish, and traces one plain message with `sys.setprofile`/`threading.setprofile`
from the moment its DATA reaches the SMTP handler until the relay has it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures.thread
import dis
import functools
import sys
import tempfile
import threading
from collections.abc import Coroutine, Generator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: `python bench/module_walk.py`

PACKAGE = str(ROOT / "mailgate")
SHARED = (
    "mailgate.store",
    "mailgate.models",
    "mailgate.errors",
    "mailgate.config",
    "mailgate.logs",
    "mailgate.loops",
    "mailgate.metrics",
    "mailgate.private",
    "mailgate.api",
    "mailgate.egress",  # the API client's download policy: only api.py calls it
    "mailgate.tokens",  # the token formulas two stages share: replies make them, admission verifies
)
OUTSIDE = "(outside)"


def _module(frame: FrameType | None) -> str | None:
    """The mailgate module whose source file holds the frame's code, or None (a library, the sandbox,
    code that `dataclasses` or `namedtuple` wrote)."""
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    name = frame.f_globals.get("__name__", "")
    if not isinstance(name, str) or not name.startswith("mailgate") or name.startswith("mailgate.sandbox"):
        return None
    return name


def _nearest(frame: FrameType | None) -> str | None:
    """The module of the nearest mailgate frame from `frame` down its stack."""
    while frame is not None:
        module = _module(frame)
        if module is not None:
            return module
        frame = frame.f_back
    return None


@functools.cache
def _first_resume(code: CodeType) -> int:
    """The offset of a code object's first RESUME: where a fresh coroutine or generator frame starts."""
    for ins in dis.get_instructions(code):
        if ins.opname == "RESUME":
            return ins.offset
    return 0


def _fresh(frame: FrameType) -> bool:
    """A first call, not the resumption of a suspended coroutine or generator (profile calls both)."""
    return frame.f_lasti <= _first_resume(frame.f_code)


class Walk:
    """The visits, in order, with the call edges that made them."""

    def __init__(self, start: CodeType) -> None:
        self.start = start  # the walk begins when this code (the handler's DATA) is first called
        self.visits: list[str] = []
        self.edges: list[str] = []
        self.on = False
        self.done = False
        self.lock = threading.Lock()
        self.tasks: dict[asyncio.Task[Any], str | None] = {}  # task -> the module that created it
        self.local = threading.local()  # .origin: the module that handed this thread its work

    def origin(self) -> str | None:
        """Who called into the current task or worker thread: the module that made it, else None."""
        here: str | None = getattr(self.local, "origin", None)
        if here is not None:
            return here
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return None
        return self.tasks.get(task) if task is not None else None

    def caller(self, frame: FrameType | None) -> str | None:
        return _nearest(frame) or self.origin()

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or self.done:
            return
        if not self.on:
            if frame.f_code is not self.start:
                return
            self.on = True
            self.visits.append(self.caller(frame.f_back) or OUTSIDE)  # where DATA was read: smtp.server
        if not _fresh(frame) or frame.f_back is None or frame.f_back.f_code.co_filename == "<string>":
            return  # resumed, or called by code `dataclasses` wrote (a default factory, `__post_init__`)
        callee = _module(frame)
        if callee is None:
            return
        caller = self.caller(frame.f_back)
        if caller is None or callee == caller:
            return  # another SMTP connection's event, a timer: not this message's path
        with self.lock:
            self.visits.append(callee)
            self.edges.append(f"{caller} -> {callee}.{frame.f_code.co_qualname}")

    def task_factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Generator[Any, None, Any] | Coroutine[Any, Any, Any],
        **kw: Any,
    ) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        self.tasks[task] = self.caller(sys._getframe(1))
        return task

    def follow_threads(self) -> None:
        """Give each thread-pool work item the module that submitted it, for the time it runs."""
        item = concurrent.futures.thread._WorkItem
        init, run, walk = item.__init__, item.run, self

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self.walk_origin = walk.caller(sys._getframe(1))

        def run_(self: Any) -> None:
            walk.local.origin = getattr(self, "walk_origin", None)
            try:
                run(self)
            finally:
                walk.local.origin = None

        item.__init__, item.run = __init__, run_  # type: ignore[method-assign]


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


async def run_one() -> Walk:
    from mailgate.config import load_settings
    from mailgate.sandbox import SandboxOptions, run_sandbox
    from mailgate.service import Gateway
    from mailgate.smtp.handler import Handler
    from tests.mail import make_mail, smtp_send
    from tests.relay import RecordingRelay

    walk = Walk(Handler.handle_DATA.__code__)
    walk.follow_threads()
    asyncio.get_running_loop().set_task_factory(walk.task_factory)
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
                check = next(t for t in asyncio.all_tasks() if t.get_name() == "api-check")
                await check  # serve's background API check is not the message's path
                sys.setprofile(walk.profile)
                threading.setprofile(walk.profile)
                mail = make_mail(body="Please summarise this.", attachments=[("a.txt", "text/plain", b"hi")])
                await smtp_send(gw.smtp_port, mail)
                await relay.wait_for(1, timeout=30)
                walk.done = True
                sys.setprofile(None)
                threading.setprofile(None)
    await relay.close()
    return walk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="print the whole walk and every call edge")
    args = parser.parse_args()
    walk = asyncio.run(run_one())
    visits = walk.visits
    stages = [m for m in visits if not m.startswith(SHARED)]
    collapsed = [m for i, m in enumerate(stages) if i == 0 or stages[i - 1] != m]
    n_all, _ = reentries(visits)
    n_stage, again = reentries(stages)
    if args.all:
        for edge in walk.edges:
            print("  " + edge.replace("mailgate.", ""))
        print("walk:", " -> ".join(m.removeprefix("mailgate.") for m in collapsed))
    print(f"visits: {len(visits)} ({len(set(visits))} modules)")
    print(f"re-entries, every module: {n_all}")
    print(f"re-entries, stage modules: {n_stage}  ({', '.join(sorted(set(again))) or 'none'})")


if __name__ == "__main__":
    main()
