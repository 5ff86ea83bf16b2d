"""Retention: the raw bytes of finished messages are kept MAILGATE_RETENTION_DAYS, then pruned.

A message is finished when it is `answered`, `ignored` or `failed`; its raw message is pruned once every
message of it (one per recipient) finished and none changed for that long. Pruning keeps the header block
(what `mailgate show` prints) and drops the body with its attachments; the rows (who, when, subject, state,
the replies sent) stay. A pruned message can no longer be replayed. Mail that ended `ignored` never had
more than its header block and the start of its body stored (`admission.admit`).

`serve` prunes once shortly after it starts and then every `EVERY` seconds (`run`); `mailgate prune` does
it once, now (`prune`). Each batch is its own short transaction, so SMTP sessions commit between them.
SQLite reuses the space freed for new mail; the file itself shrinks only with `VACUUM` (gateway stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from mailgate.store import Pruned, Store

log = logging.getLogger("mailgate.retention")

DAY = 86400.0
EVERY = 3600.0  # seconds between two prunings in `serve`
FIRST = 60.0  # seconds after start of the first one (start-up stays quick)
BATCH = 200  # raw messages per transaction


async def prune(store: Store, *, before: float, batch: int = BATCH) -> Pruned:
    """Prune every finished message's raw bytes last changed before `before`, a batch at a time."""
    total = Pruned()
    while True:
        done = await store.prune_raw(before, limit=batch)
        total += done
        if done.messages < batch:
            return total
        await asyncio.sleep(0)  # let the sessions waiting on the store go first


async def run(
    store: Store,
    days: float,
    *,
    every: float = EVERY,
    first: float = FIRST,
    clock: Callable[[], float] = time.time,
) -> None:
    """`serve`'s pruning: every `every` seconds, what finished more than `days` days ago (0: never)."""
    if days <= 0:
        return
    await asyncio.sleep(first)
    while True:
        done = await prune(store, before=clock() - days * DAY)
        if done.messages:
            log.info(
                "raw_pruned",
                extra={"messages": done.messages, "bytes": done.bytes, "retention_days": f"{days:g}"},
            )
        await asyncio.sleep(every)
