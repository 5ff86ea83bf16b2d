"""What every store does: the named operations the stages use, whatever the database.

Two backends implement `Store`: `sqlite.SqliteStore` (one process, one file: the default) and
`postgres.PostgresStore` (several gateways on one PostgreSQL). The stages see only this protocol, so a
stage never knows which one it talks to. The guarantees both keep:

- Every state change is one transaction, durable when the call returns (`admit` before the `250`).
- Errors of the database become `StoreBusy` at the store's boundary (`LeaseLost` for a fenced change
  refused, PostgreSQL only).
- **Claims.** The scheduler and the outbox take due work with `claim_inbound` / `claim_outbox` and hand
  it back with `release_*` when the job ends. SQLite: one process, so a claim is the caller's in-memory
  busy set (`busy`), as it always was. PostgreSQL: a lease on the row (owner, expiry by the database's
  clock) taken with `FOR UPDATE SKIP LOCKED`, renewed while the job runs; every change to a claimed row
  is fenced on the owner; a dead gateway's leases run out and another gateway claims the rows.
- A task's turns run in order: a message past `received` is claimable only when it is its task's oldest
  unfinished one; a message still to be read (`received`) only when no older one of its task is still to
  be read (reading changes nothing at the API, and a command such as `/status` is answered meanwhile).
- `watch` registers the wake-ups for work committed elsewhere (PostgreSQL: `LISTEN/NOTIFY` from other
  gateways; SQLite: nothing, the one process wakes itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from mailgate.models import TaskRef
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import (
    Admitted,
    AllowedSenderRow,
    BounceRow,
    InboundRow,
    NewReply,
    OutboxRow,
    Problem,
    Pruned,
    SuppressionRow,
    TaskListing,
    TaskRow,
)

Queue = Literal["inbound", "outbox"]


class Store(Protocol):
    """The store's named operations (see the module docstring for what each backend guarantees)."""

    batches: int  # transactions committed (benchmarks and tests)
    schema_version: int  # the schema version this mailgate writes
    migrated_from: int  # the version the store had when it was opened (0: it was new)

    async def close(self) -> None:
        """Hand back every claim still held, stop the background work, close the connections."""

    async def secret(self) -> str:
        """The reply-token key: generated and stored on first use, the same for every gateway."""

    async def watch(self, *, on_inbound: Callable[[], None], on_outbox: Callable[[], None]) -> None:
        """Call `on_inbound` / `on_outbox` when another gateway commits work for that queue."""

    # --- reads -------------------------------------------------------------------------------------

    async def admission_facts(
        self,
        keys: Sequence[str],
        *,
        token_task_ids: Sequence[str] = (),
        chain: Sequence[str] = (),
        aliases: Sequence[str] = (),
        sender: str | None = None,
        since: float = 0.0,
        max_turns: int,
        max_new_tasks: int,
        legacy_keys: Sequence[str] = (),
        who: str = "",
    ) -> AdmissionFacts:
        """The reads of one message's DATA decision at once (see `AdmissionFacts`). A duplicate is a row
        under one of `keys`, or under the matching one of `legacy_keys` (rows recorded before senders
        counted in the key) whose `coalesce(sender, 'env:' || mail_from)` is `who`."""

    async def task(self, task_id: str) -> TaskRef | None: ...

    async def participants(self, task_id: str) -> list[str]: ...

    async def count_notices(self, addr: str, since: float, notice: str | None = None) -> int: ...

    async def count_notices_for_task(self, task_id: str, notice: str, since: float) -> int: ...

    async def raw(self, raw_id: str) -> bytes:
        """A message's raw bytes; `RawMissing` when they are gone, or not all there (pruned, or an
        ignored message's head)."""

    async def raw_head(self, raw_id: str, size: int = 65536) -> bytes:
        """The start of a raw message, at most `size` bytes."""

    async def inbound(self, inbound_id: str) -> InboundRow | None: ...

    async def task_row(self, task_id: str) -> TaskRow | None: ...

    async def outbox_row(self, outbox_id: str) -> OutboxRow | None: ...

    async def next_due_after(self, table: Queue, now: float) -> float | None:
        """When the next row of `table` becomes due later than `now` (a retry time, or another gateway's
        lease running out), or None."""

    async def list_inbound(self, state: str | None = None, limit: int = 50) -> list[InboundRow]: ...

    async def list_outbox(self, state: str | None = None, limit: int = 50) -> list[OutboxRow]: ...

    async def list_tasks(self, limit: int = 50) -> list[TaskListing]:
        """The newest tasks, each with the state of its newest message (its status) and that one's time."""

    async def outbox_for(self, inbound_id: str) -> list[OutboxRow]: ...

    async def messages_of_task(self, task_id: str) -> list[InboundRow]: ...

    async def file_hashes_of_task(self, task_id: str, before: str) -> set[str]: ...

    async def thread_chain(self, task_id: str, before: str, *, limit: int) -> list[str]: ...

    async def outbox_by_mail_from(self, mail_from: str) -> OutboxRow | None:
        """The reply sent with envelope sender `mail_from` (its VERP return path), if any."""

    async def bounces_of(self, outbox_ids: Sequence[str]) -> list[BounceRow]:
        """The bounces recorded for the replies `outbox_ids`, oldest first."""

    async def bounce_reported_by(self, inbound_id: str) -> list[BounceRow]:
        """The bounces that the message `inbound_id` (a bounce report to a return path) recorded."""

    async def is_suppressed(self, addr: str) -> bool:
        """Does `addr` get no more notices (its hard bounces reached MAILGATE_BOUNCE_LIMIT)?"""

    async def suppressed(self) -> list[SuppressionRow]:
        """Every address that gets no more notices, oldest suppression first."""

    # --- for the operator (`mailgate status`, `show`) and the health checks ------------------------

    async def find_message_id(self, message_id: str) -> tuple[list[InboundRow], list[OutboxRow]]:
        """The inbound messages and the replies carrying Message-ID `message_id` (angle brackets or not)."""

    async def count_by_state(self) -> dict[str, dict[str, int]]:
        """Rows per state: `{"inbound": {"queued": 3, ...}, "outbox": {"sent": 9, ...}}`."""

    async def oldest_waiting(self) -> InboundRow | None:
        """The oldest inbound message not yet at rest (received, queued, submitting or running)."""

    async def recent_problems(self, limit: int = 5) -> list[Problem]:
        """The newest troubles, newest first: failed messages, messages waiting on a retry with an error,
        and replies dead or waiting on a retry."""

    async def api_hold(self) -> dict[str, Any] | None:
        """The hold a running gateway recorded while the API refuses its key: `{"since", "reason"}`."""

    async def set_api_hold(self, since: float, reason: str) -> None:
        """Record that the API refuses the key (for `mailgate status`; the gateway holds in memory)."""

    async def clear_api_hold(self) -> None:
        """The API takes the key again: the recorded hold is gone."""

    async def check_writable(self) -> None:
        """Commit a small write, so a store that cannot take writes says so with `StoreBusy`."""

    # --- claims --------------------------------------------------------------------------------------

    async def claim_inbound(self, now: float, limit: int, busy: set[str]) -> list[InboundRow]:
        """Up to `limit` due messages, none in `busy`, in their task's order (see the module docstring):
        claimed."""

    async def release_inbound(self, inbound_id: str) -> None:
        """The job on a claimed message ended: hand the claim back (a no-op once a change released it).
        Never raises."""

    async def claim_outbox(self, now: float, limit: int, busy: set[str]) -> list[OutboxRow]:
        """Up to `limit` due outbox rows not in `busy`: claimed."""

    async def release_outbox(self, outbox_id: str) -> None:
        """The send of a claimed outbox row ended: hand the claim back. Never raises."""

    # --- state changes (each one transaction; those of a claimed row fenced on the claim) ----------

    async def admit(self, admitted: Admitted) -> None:
        """Commit one accepted DATA: the raw bytes and every row that refers to them, durably."""

    async def prune_raw(self, before: float, *, limit: int = 200) -> Pruned:
        """Retention: cut up to `limit` raw messages whose messages all finished (answered, ignored,
        failed) and changed last before `before` to their header block, marking them pruned; what that
        did. Call again while it returns `limit` messages."""

    async def count_crash(self, inbound_id: str, crashes: int) -> None: ...

    async def set_turn_input(
        self,
        inbound_id: str,
        *,
        input: str,
        files: Sequence[dict[str, Any]],
        skipped: Sequence[dict[str, str]],
    ) -> None:
        """`received -> queued`: the turn's input and its spooled files are known."""

    async def set_files(self, inbound_id: str, files: Sequence[dict[str, Any]]) -> None:
        """The spooled files were made again (on another host, or after the spool was lost); the state
        and the input are kept."""

    async def mark_submitting(self, inbound_id: str, *, turn_seq: int, attempts: int) -> None: ...

    async def mark_running(self, inbound_id: str, *, turn_seq: int | None = None) -> None:
        """The API has the turn: wait for its end (`started_at` is now)."""

    async def reschedule(
        self,
        inbound_id: str,
        at: float,
        *,
        state: str | None = None,
        error: str | None = None,
        crashes: int | None = None,
        replies: Sequence[NewReply] = (),
    ) -> None:
        """Look at the message again at `at`, queueing `replies` (a notice to the sender of a held
        message) in the same transaction; releases the claim."""

    async def acknowledge(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> None:
        """The sender is told the turn is being worked on (`replies`: the notice, if the limits let it
        go): `acked_at` set in the same transaction, so a turn is acknowledged at most once. Keeps the
        claim and `updated_at`."""

    async def finish(
        self,
        inbound_id: str,
        state: str,
        reason: str | None,
        replies: Sequence[NewReply] = (),
        *,
        turn_seq: int | None = None,
        task_id: str | None = None,
        task_url: str | None = None,
        task_turns: int | None = None,
        turn_status: str | None = None,
    ) -> None:
        """End a message and queue its replies, in one transaction; releases the claim. `turn_status`:
        how its turn ended at the API, when it ran one to its end."""

    async def record_delivery(
        self,
        outbox_id: str,
        state: str,
        *,
        attempts: int,
        error: str | None,
        next_attempt_at: float = 0.0,
        refused: dict[str, str] | None = None,
        sent_at: float | None = None,
        reply: str | None = None,
    ) -> None:
        """What one delivery attempt came to (`error` None clears it; `reply`: the relay's answer when it
        took the message); releases the claim."""

    async def set_task_worker(self, task_id: str, worker_id: str) -> None:
        """A task not yet created at the API starts on `worker_id` (MAILGATE_WORKERS changed meanwhile)."""

    async def use_fallback(self, outbox_id: str) -> None:
        """The relay refused an outbox row's size: its links-only version becomes the message to send."""

    async def archive_task(self, task_id: str) -> None: ...

    async def reset_for_restart(self) -> None:
        """On start-up: make work in flight due now (where no other gateway holds it)."""

    async def replay_inbound(self, inbound_id: str) -> bool:
        """A `failed` or `ignored` message runs again (after a turn that ended in error: a new turn).
        False for any other state or an unknown id, and when its raw bytes are not all there (pruned, or
        an ignored message's head)."""

    async def replay_outbox(self, outbox_id: str) -> bool: ...

    # --- the loop breaker, held mail and the stored allow list (issue 19) ------------------------------

    async def reply_times(self, addr: str, since: float, limit: int) -> list[float]:
        """When the newest replies (answers and notices) to `addr` due from `since` on go or went, newest
        first, at most `limit` (as `reserve_reply` recorded them)."""

    async def reserve_reply(
        self, outbox_id: str, addrs: Sequence[str], now: float, limit: int, *, wait: bool
    ) -> float | None:
        """Take a place for the reply `outbox_id` to `addrs` under `limit` replies per address per hour,
        atomically (replies composed at once, on any gateway, count each other): the time it may go
        (`now`, or with `wait` the earliest time every address has room again), recorded for the counts;
        None when it would have to wait and `wait` is False (nothing recorded). A place taken for a
        reply that is then not queued still counts: the counts err on the side of fewer replies."""

    async def count_replies(self, since: float, until: float, limit: int) -> int:
        """Replies of the whole gateway (every gateway on the store) due between `since` and `until`,
        counted up to `limit`."""

    async def forget_replies(self, before: float) -> None:
        """Drop the record of replies due before `before`."""

    async def task_busy_before(self, task_id: str, before: str) -> bool:
        """Is a message of the task older than `before` still active (its turn comes first)?"""

    async def held_untold(self, limit: int = 50) -> list[InboundRow]:
        """`held` messages whose sender was not told yet that they wait for approval, oldest first."""

    async def count_held(self, limit: int) -> int:
        """`held` messages, counted up to `limit`."""

    async def tell_held(self, inbound_id: str, replies: Sequence[NewReply] = ()) -> bool:
        """The sender of a held message was told (`replies`: the notice, queued in the same transaction);
        False when it is no longer held or was told already (by another gateway)."""

    async def approve_held(self, inbound_id: str) -> InboundRow | None:
        """`held -> received` (the message runs); its row, or None when it is not held."""

    async def deny_held(self, inbound_id: str) -> bool:
        """`held -> ignored` (refused by the operator); False when it is not held."""

    async def drop_held(self, before: float) -> list[InboundRow]:
        """`held` messages received before `before` end `ignored`; returns them as they were."""

    async def allow_sender(self, addr: str, note: str | None = None) -> bool:
        """Put `addr` on the stored allow list; False when it was on it already."""

    async def is_allowed_sender(self, addr: str) -> bool: ...

    async def allowed_senders(self) -> list[AllowedSenderRow]:
        """The stored allow list, oldest first."""

    async def unsuppress(self, addr: str) -> bool:
        """Send notices to `addr` again; its earlier hard bounces no longer count. False when it was not
        suppressed."""
