"""Admission: every decision that can refuse a message at RCPT or at the end of DATA, then the durable commit.

A bounce of one of our replies comes to that reply's return path (`alias+bounce-<token>@domain`, see
`mailgate.tokens`): its RCPT is refused unless the token names a reply we sent, and at DATA it is read
(`mail.dsn`) and recorded before anything else: the reply is marked `bounced`, the message `ignored`
("bounce of our reply <id>"), never answered, whoever sent it.

Order at the end of DATA: header size; mail that must never be answered (accepted and recorded as
ignored, so bounces are not bounced; a `References` chain of more than 100 ids is a loop); sender
authentication (550); the allow-list, MAILGATE_ALLOWED_SENDERS or the stored one (550; with
MAILGATE_UNKNOWN_SENDERS=hold, 250 and the message waits as `held` for `mailgate approve`); the thread
and the rate limits (450, so the sender's MTA retries later); duplicates (250, nothing new); then the
raw message and its rows are committed with an fsync and only then answered 250. How the sender was
verified is kept on the row: the worker's input says so.

The header block is read here once (`mail.headers`); what later stages need of it is stored on each
message's row. Reading it, hashing the message and the decisions that need nothing but the message
(automatic mail, sender authentication) run off the event loop (`_read`) unless the message is small
(`INLINE_HEADER`, `INLINE_MESSAGE`: an ordinary mail is read faster than a thread hop), so a hostile
header (each read of it is bounded, see `mail.headers`) never holds the loop that serves every other
SMTP session: on one
thread of their own (`_header_thread`), one message after another, because that work is pure Python and
several threads running it at once take the interpreter lock from the loop for long stretches; hashing
and DKIM verification (DNS look-ups) run on the default pool. `Admission` speaks to the store and to the pure
policy modules; it knows nothing of SMTP sessions (see `smtp.handler`), only the reply each recipient
gets.

Duplicates: a message is the same as one already recorded when recipient, sender and Message-ID (or,
without one, the message's SHA-256) are: the sender is the authenticated From address, or, for mail
recorded without one (ignored mail, bounces), the envelope sender. A different sender reusing a known
Message-ID is a new message. Rows recorded before that rule (recipient and Message-ID only) still match
a retry of theirs: their old key counts when the row's sender is this message's (`_keys`).

Mail recorded as `ignored` (and nothing else of the same DATA) is stored as its header block and the
first `IGNORED_BODY_KEPT` bytes of its body: enough to see what it was, never its attachments.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ulid import ULID

from mailgate import tokens
from mailgate.admission import authn, policy, threads
from mailgate.config import Settings
from mailgate.errors import BadToken, MessageRejected
from mailgate.mail import dsn
from mailgate.mail.headers import Headers, header_block, header_size, read_facts, read_signals
from mailgate.models import BUDGETS, HeaderFacts, HeaderSignals, InboundState, SmtpReply
from mailgate.store import AdmissionFacts, Admitted, NewBounce, NewMessage, NewTask, OutboxRow, Store

log = logging.getLogger("mailgate.admission")

HOUR = 3600.0
MAX_ON_MESSAGE = 100  # To/Cc addresses kept on the row (candidates for the reply's Cc)
BAD_TOKEN = "5.1.1 This reply address is not valid (altered or unknown); write to the worker"  # noqa: S105
BAD_BOUNCE = "5.1.1 This return path is not valid (altered or unknown)"
# A message this small, with a header block this small, is read and hashed on the event loop: ~0.1 ms
# for an ordinary one, less than the hops to the header thread and the pool cost the loop
# (bench/sustained_accept.py); 2-3 ms at worst for 4 KiB of encoded words or quoted names, no more than
# the header thread holds the interpreter lock in one switch interval (5 ms).
INLINE_HEADER = 4 * 1024
INLINE_MESSAGE = 128 * 1024
IGNORED_BODY_KEPT = 64 * 1024  # bytes of an ignored message's body stored after its header block


@dataclass(frozen=True)
class _Read:
    """What one message's DATA decision needs of its bytes, read in a worker thread (`Admission._read`)."""

    signals: HeaderSignals
    facts: HeaderFacts
    head: (
        int  # the length of the header block (`header_block`): what ignored mail keeps, with its body's start
    )
    digest: str  # SHA-256 of the raw bytes, hex
    judged: _Judged | None = None  # the policy's decisions (None for a bounce of our reply)
    verdict: authn.AuthVerdict | None = None  # sender authentication (None for automatic mail)


@dataclass(frozen=True)
class _Judged:
    """Every policy decision on one message, made in one place (`Admission._judge`) from plain values."""

    automatic: str | None  # why the message must never be answered (automatic mail, a loop's chain)
    from_allowed: bool  # its single From address is on MAILGATE_ALLOWED_SENDERS
    people: frozenset[str]  # To/Cc addresses off our domain that are allowed senders
    budgets: tuple[tuple[str, str | None] | None, ...]  # per recipient: (budget of a new task, the
    # budget its tag asked), None for no worker


@dataclass
class _Plan:
    rcpt: str
    reply: SmtpReply
    message: NewMessage | None = None
    task: NewTask | None = None
    participants: list[tuple[str, str]] = field(default_factory=list)


class Admission:
    """Decides on each message and commits the ones it accepts. One per running gateway."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        secret: bytes,
        *,
        dkim_dns: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.secret = secret
        self.dkim_dns = dkim_dns
        self.clock = clock

    async def check_recipient(self, address: str) -> SmtpReply:
        """RCPT TO: a worker address (with a budget word or a valid reply token), or a refusal."""
        split = tokens.split_recipient(address, self.settings.domain)
        if split is None:
            return SmtpReply(
                550,
                "5.7.1 Relaying denied: this server only accepts mail for its own workers",
                why="relay_denied",
            )
        alias, tag = split
        if tag is not None and tag.startswith(tokens.BOUNCE_PREFIX):  # before the alias: it may be gone
            ok = await self._bounced_reply(address) is not None
            return SmtpReply(250, "2.1.5 Ok") if ok else SmtpReply(550, BAD_BOUNCE)
        if self.settings.worker_for(alias) is None:
            return SmtpReply(550, "5.1.1 No such worker here", why="unknown_worker")
        if tag is not None and tokens.looks_like_token(tag):
            task_id = tokens.task_id_of_token(tag)
            ref = await self.store.task(task_id) if task_id else None
            if (
                ref is None
                or ref.alias != alias
                or not tokens.verify_token(self.secret, tag, ref.task_id, ref.owner)
            ):
                return SmtpReply(550, BAD_TOKEN, why="bad_token")
        return SmtpReply(250, "2.1.5 Ok", why="accepted")

    async def accept(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[SmtpReply]:
        """Decide on `raw` for each recipient; commit what is accepted. One reply per recipient.

        Raises `StoreBusy` when the commit fails (the caller answers 451 4.3.0 and keeps nothing).
        Return paths of our replies (bounces) and worker addresses in one message are decided apart.
        """
        split = {r: tokens.split_recipient(r, self.settings.domain) for r in rcpts}  # once per recipient
        returns = [r for r in rcpts if _is_return_path(split[r])]
        others = [r for r in rcpts if r not in returns]
        accept = functools.partial(self._accept, splits=[split[r] or ("", None) for r in others])
        replies: dict[str, SmtpReply] = {}
        for group, decide in ((returns, self._accept_bounce), (others, accept)):
            if not group:
                continue
            try:
                replies |= zip(group, await decide(mail_from, group, raw), strict=True)
            except MessageRejected as exc:
                replies |= dict.fromkeys(
                    group, SmtpReply(exc.code, f"{exc.status} {exc.reason}", why=exc.why)
                )
        return [replies[r] for r in rcpts]

    async def _bounced_reply(self, address: str) -> OutboxRow | None:
        """The reply whose return path `address` is, if its token verifies; else None."""
        split = tokens.split_recipient(address, self.settings.domain)
        token = tokens.token_of_tag(split[1] or "") if split else None
        if split is None or token is None:
            return None
        own = f"{split[0]}+{tokens.BOUNCE_PREFIX}{token}@{self.settings.domain}"
        row = await self.store.outbox_by_mail_from(own)
        if row is None or not tokens.verify_bounce_token(self.secret, token, row.id):
            return None
        return row

    async def _read_off_loop(
        self, raw: bytes, mail_from: str, splits: Sequence[tuple[str, str | None]] | None, head: int
    ) -> _Read:
        """`_read` on the header thread, the digest meanwhile on the default pool (hashing lets go of the
        interpreter lock: a 40 MB message does not hold up the next one's header); then
        (MAILGATE_AUTH=dkim) DKIM on the default pool."""
        if head <= INLINE_HEADER and len(raw) <= INLINE_MESSAGE:
            # an ordinary message: reading its header here costs less than the two hops to threads
            # (and the interpreter-lock hand-offs) would; its read is bounded by its small size
            read = replace(self._read(raw, mail_from, splits), digest=_sha256(raw))
        else:
            loop = asyncio.get_running_loop()
            read, digest = await asyncio.gather(
                loop.run_in_executor(_header_thread(), functools.partial(self._read, raw, mail_from, splits)),
                asyncio.to_thread(_sha256, raw),
            )
            read = replace(read, digest=digest)
        if read.judged is not None and read.judged.automatic is None and self.settings.auth == "dkim":
            verdict = await asyncio.to_thread(authn.verify_dkim, raw, read.signals, dnsfunc=self.dkim_dns)
            read = replace(read, verdict=verdict)
        return read

    async def _accept_bounce(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[SmtpReply]:
        """Mail to the return paths of our replies: record each as a bounce of its reply, never answer.

        Nothing is refused for who sent it (a bounce comes from MAILER-DAEMON, or from nobody); it is
        recorded before the policy that ignores automatic mail could say anything else of it.
        """
        head = header_size(raw, self.settings.max_header_size)
        if head > self.settings.max_header_size:
            raise MessageRejected(552, "5.3.4", "Message header too large")
        read = await self._read_off_loop(raw, mail_from, None, head)
        facts, digest = read.facts, read.digest
        now = self.clock()
        raw_id = str(ULID())
        keys, legacy, who = _keys(rcpts, None, mail_from, facts.message_id, digest)
        known = await self.store.admission_facts(
            keys, legacy_keys=legacy, who=who, max_turns=0, max_new_tasks=0
        )  # duplicates only
        out: list[SmtpReply] = []
        messages: list[NewMessage] = []
        found: list[tuple[str, NewBounce]] = []
        for rcpt, key in zip(rcpts, keys, strict=True):
            if (duplicate := known.duplicates.get(key)) is not None:
                out.append(SmtpReply(250, f"2.0.0 Ok: already queued as {duplicate}"))
                continue
            row = await self._bounced_reply(rcpt)
            if row is None:
                out.append(SmtpReply(550, BAD_BOUNCE))
                continue
            report = await asyncio.to_thread(dsn.read_report, raw, row.recipient_list)
            failures = report.failures
            if failures:
                why = f"bounce of our reply {row.id}"
            else:
                actions = sorted({r.action or "no failure" for r in report.recipients})
                why = f"delivery report ({', '.join(actions)}) of our reply {row.id}"
            message = _new_message(
                facts, raw_id, now, mail_from, rcpt, rcpt.partition("+")[0].lower(), None, key
            )
            messages.append(replace(message, reason=why))
            found += [
                (message.id, NewBounce(row.id, f.addr, f.status, f.diagnostic, f.hard)) for f in failures
            ]
            out.append(SmtpReply(250, f"2.0.0 Ok: queued as {message.id}"))
        if messages:
            await self.store.admit(
                Admitted(
                    raw_id=raw_id,
                    sha256=digest,
                    data=_ignored_head(raw, read.head),
                    size=len(raw),
                    messages=messages,
                    bounces=found,
                    received_at=now,
                    bounce_limit=self.settings.bounce_limit,
                )
            )
        return out

    async def _accept(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        raw: bytes,
        *,
        splits: Sequence[tuple[str, str | None]],
    ) -> list[SmtpReply]:
        """Mail to worker addresses; `splits` is each recipient's (alias, tag)."""
        settings = self.settings
        # The header read once, the policy's decisions and who sent it, off the loop (`_read`): plain
        # values from here on.
        head = header_size(raw, settings.max_header_size)
        if head > settings.max_header_size:
            raise MessageRejected(552, "5.3.4", "Message header too large", why="header_too_large")
        read = await self._read_off_loop(raw, mail_from, splits, head)
        assert read.judged is not None
        facts, digest, judged = read.facts, read.digest, read.judged
        reason = judged.automatic
        now = self.clock()
        raw_id = str(ULID())

        sender: str | None = None
        verified: str | None = None
        held = False
        if read.verdict is not None:
            verdict = read.verdict
            if verdict.sender is None and verdict.temporary:
                raise MessageRejected(
                    451,
                    "4.7.0",
                    f"Sender authentication could not complete: {verdict.reason}",
                    why="auth_temporary",
                )
            if verdict.sender is None:
                raise MessageRejected(
                    550, "5.7.1", f"Sender not authenticated: {verdict.reason}", why="not_authenticated"
                )
            # the verdict's sender is the single From address the policy judged
            if not judged.from_allowed and not await self.store.is_allowed_sender(verdict.sender):
                if settings.unknown_senders != "hold":
                    raise MessageRejected(
                        550,
                        "5.7.1",
                        f"{verdict.sender} may not send to this gateway",
                        why="sender_not_allowed",
                    )
                held = True  # it waits for `mailgate approve`; its sender is told once
            sender = verdict.sender
            verified = authn.how_verified(settings.auth, verdict, authserv_id=settings.authserv_id)

        # Every read the decisions below make, in one hop to the reader's thread.
        keys, legacy, who = _keys(rcpts, sender, mail_from, facts.message_id, digest)
        known = await self.store.admission_facts(
            keys,
            legacy_keys=legacy,
            who=who,
            token_task_ids=[
                task_id
                for _, tag in splits
                if tag is not None and tokens.looks_like_token(tag)
                if (task_id := tokens.task_id_of_token(tag))
            ],
            chain=_chain(facts),
            aliases=sorted({alias for alias, _ in splits}),
            sender=sender,
            since=now - HOUR,
            max_turns=settings.max_turns_per_thread_per_hour,
            max_new_tasks=settings.max_new_tasks_per_hour,
        )
        if held and any(known.duplicates.get(key) is None for key in keys):
            await self._room_to_hold()

        plans: list[_Plan] = []
        new_tasks_here = 0
        continued: dict[str, str] = {}  # task id -> the queue id of this message's turn for it
        for rcpt, (alias, tag), key, budget in zip(rcpts, splits, keys, judged.budgets, strict=True):
            duplicate = known.duplicates.get(key)
            if duplicate is not None:
                plans.append(
                    _Plan(rcpt, SmtpReply(250, f"2.0.0 Ok: already queued as {duplicate}", why="duplicate"))
                )
                continue
            message = _new_message(facts, raw_id, now, mail_from, rcpt, alias, sender, key, verified)
            if sender is None:
                message = replace(message, state=InboundState.IGNORED, reason=reason)
                reply = SmtpReply(250, f"2.0.0 Ok: queued as {message.id}", why="ignored", note=reason or "")
                plans.append(_Plan(rcpt, reply, message))
                continue
            try:
                plan = self._plan_task(
                    known,
                    rcpt,
                    alias,
                    tag,
                    sender,
                    judged.people,
                    message,
                    now,
                    new_tasks_here,
                    budget,
                    held=held,
                )
            except MessageRejected as exc:
                plan = _Plan(rcpt, SmtpReply(exc.code, f"{exc.status} {exc.reason}", why=exc.why))
            else:
                assert plan.message is not None and plan.message.task_id is not None
                first = continued.setdefault(plan.message.task_id, plan.message.id)
                if (
                    first != plan.message.id
                ):  # one task reached through two addresses (token and plain): one turn
                    ignored = replace(
                        message, state=InboundState.IGNORED, reason=f"same task as {first}", task_id=None
                    )
                    reply = SmtpReply(
                        250,
                        f"2.0.0 Ok: already queued as {first}",
                        why="ignored",
                        note=f"same task as {first}",
                    )
                    plan = _Plan(rcpt, reply, ignored)
            new_tasks_here += plan.task is not None
            plans.append(plan)

        messages = [p.message for p in plans if p.message is not None]
        if not messages:
            return [p.reply for p in plans]
        all_ignored = all(m.state == InboundState.IGNORED for m in messages)
        await self.store.admit(
            Admitted(
                raw_id=raw_id,
                sha256=digest,
                data=_ignored_head(raw, read.head) if all_ignored else raw,
                size=len(raw),
                messages=messages,
                tasks=[p.task for p in plans if p.task is not None],
                participants=sorted({pair for p in plans for pair in p.participants}),
                thread_ids=[
                    (m.message_id, m.task_id)
                    for m in messages
                    if m.message_id and m.task_id and m.state in (InboundState.RECEIVED, InboundState.HELD)
                ],
            )
        )
        return [p.reply for p in plans]

    def _read(self, raw: bytes, mail_from: str, splits: Sequence[tuple[str, str | None]] | None) -> _Read:
        """On the header thread: the header block read once (`mail.headers`), then, for mail to worker
        addresses (`splits`, one per recipient), what can be decided from the message alone, on those
        plain values: every policy decision (`_judge`), then who sent it (but DKIM: see `_read_off_loop`)."""
        # the header block is at most max_header_size (checked before): no need to search the body for its end
        head = header_block(raw[: self.settings.max_header_size + 4])
        headers = Headers.parse(head)
        signals = read_signals(headers)
        read = _Read(signals, read_facts(headers), len(head), digest="")
        if splits is None:
            return read
        judged = self._judge(signals, read.facts, mail_from, splits)
        read = replace(read, judged=judged)
        if judged.automatic is not None:
            return read
        mode = self.settings.auth
        if mode == "none":
            verdict = authn.trust_from_header(signals)
        elif mode == "dkim":
            return read  # verified on the default pool: its key look-ups wait on the network
        else:
            verdict = authn.verify_dmarc_results(signals, authserv_id=self.settings.authserv_id or "")
        return replace(read, verdict=verdict)

    def _judge(
        self,
        signals: HeaderSignals,
        facts: HeaderFacts,
        mail_from: str,
        splits: Sequence[tuple[str, str | None]],
    ) -> _Judged:
        """Every policy decision on the message, in one place: automatic mail (and a loop's References
        chain), whether its From address and which of its To/Cc addresses are allowed senders, and the
        budget a new task would get at each recipient."""
        settings = self.settings
        automatic = policy.automatic_reason(signals, mail_from, own_domain=settings.domain)
        automatic = automatic or policy.long_chain(facts.references)
        from_ = signals.from_addresses
        from_allowed = (
            from_ is not None
            and len(from_) == 1
            and policy.sender_allowed(from_[0], settings.allowed_senders)
        )
        people = frozenset(
            a.addr
            for a in (*facts.to, *facts.cc)
            if a.domain != settings.domain and policy.sender_allowed(a.addr, settings.allowed_senders)
        )
        budgets: list[tuple[str, str | None] | None] = []
        for alias, tag in splits:
            worker = settings.worker_for(alias)
            budget_tag = tag if tag in BUDGETS else None
            budgets.append(
                None
                if worker is None
                else (
                    policy.requested_budget(budget_tag, worker.budget, settings.max_budget),
                    policy.asked_budget(budget_tag),
                )
            )
        return _Judged(automatic, from_allowed, people, tuple(budgets))

    async def _room_to_hold(self) -> None:
        """Held mail waits for an operator, who may be away for days: past MAILGATE_MAX_HELD messages
        waiting, a new one gets 452 (its MTA keeps it and retries) rather than strangers filling the
        store and the disk that every allowed sender's mail needs."""
        limit = self.settings.max_held
        if await self.store.count_held(limit) >= limit:
            log.warning("held_full", extra={"held": limit, "hint": "mailgate messages --state held"})
            raise MessageRejected(
                452, "4.3.1", "Too many messages are waiting for approval; try again later", why="held_full"
            )

    def _plan_task(
        self,
        known: AdmissionFacts,
        rcpt: str,
        alias: str,
        tag: str | None,
        sender: str,
        people: frozenset[str],
        message: NewMessage,
        now: float,
        new_tasks_here: int,
        budgets: tuple[str, str | None] | None,
        *,
        held: bool = False,
    ) -> _Plan:
        settings = self.settings
        try:
            found = threads.resolve(known, self.secret, alias=alias, tag=tag, sender=sender)
        except BadToken:
            raise MessageRejected(
                550, "5.1.1", "This reply address is not valid (altered or unknown)", why="bad_token"
            ) from None
        task: NewTask | None = None
        if found.task is not None:
            task_id = found.task.task_id
            turns = known.turns.get(task_id, 0)
            if turns >= settings.max_turns_per_thread_per_hour:
                raise MessageRejected(
                    450,
                    "4.7.1",
                    "Too many messages in this conversation in the last hour; try later",
                    why="rate_limited",
                )
        else:
            worker = settings.worker_for(alias)
            assert worker is not None  # checked at RCPT
            recent = (known.new_tasks or 0) + new_tasks_here
            if recent >= settings.max_new_tasks_per_hour:
                raise MessageRejected(
                    450,
                    "4.7.1",
                    "Too many new tasks from you in the last hour; try later",
                    why="rate_limited",
                )
            task_id = threads.new_task_id()
            assert budgets is not None  # a worker's address
            budget, asked = budgets
            task = NewTask(
                id=task_id,
                alias=alias,
                worker_id=worker.worker_id,
                owner=sender,
                budget=budget,
                subject=message.subject,
                created_at=now,
                budget_asked=asked,
            )
        message = replace(
            message,
            task_id=task_id,
            state=InboundState.HELD if held else InboundState.RECEIVED,
            note=found.note,
            new_task=int(task is not None),
        )
        return _Plan(
            rcpt,
            SmtpReply(250, f"2.0.0 Ok: queued as {message.id}", why="held" if held else "accepted"),
            message,
            task,
            [(task_id, p) for p in sorted({sender} | people)],
        )


@functools.cache
def _header_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread every gateway in this process reads headers on (made on first use)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailgate-header")


def _is_return_path(split: tuple[str, str | None] | None) -> bool:
    """Is this (alias, tag) of a recipient on our domain the return path of one of our replies
    (`alias+bounce-...@domain`)?"""
    return split is not None and (split[1] or "").startswith(tokens.BOUNCE_PREFIX)


def _keys(
    rcpts: Sequence[str], sender: str | None, mail_from: str, message_id: str | None, digest: str
) -> tuple[list[str], list[str], str]:
    """The duplicate key of each recipient's row, the key rows recorded before senders counted have
    for it, and who sent it as both kinds of row say: the authenticated sender, or `env:` and the
    envelope sender for a row recorded without one (`coalesce(sender, 'env:' || mail_from)`)."""
    who = sender if sender is not None else f"env:{mail_from}"
    what = message_id or f"sha256:{digest}"
    keys = [_digest(f"{rcpt.lower()}\n{who}\n{what}") for rcpt in rcpts]
    legacy = [_digest(f"{rcpt.lower()}\n{what}") for rcpt in rcpts]
    return keys, legacy, who


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _ignored_head(raw: bytes, head: int) -> bytes:
    """What is kept of mail recorded as ignored: its header block (`head` bytes) and the start of its body."""
    return raw[: head + IGNORED_BODY_KEPT]


def _chain(facts: HeaderFacts) -> list[str]:
    """The Message-IDs a reply may continue, strongest first: In-Reply-To, then References newest first."""
    return list(dict.fromkeys([*facts.in_reply_to, *reversed(facts.references)]))


def _new_message(
    facts: HeaderFacts,
    raw_id: str,
    now: float,
    mail_from: str,
    rcpt: str,
    alias: str,
    sender: str | None,
    key: str,
    verified: str | None = None,
) -> NewMessage:
    on_message = list(dict.fromkeys(a.addr for a in (*facts.to, *facts.cc)))[:MAX_ON_MESSAGE]
    return NewMessage(
        id=str(ULID()),
        raw_id=raw_id,
        received_at=now,
        mail_from=mail_from,
        rcpt=rcpt.lower(),
        alias=alias,
        sender=sender,
        message_id=facts.message_id,
        subject=facts.subject,
        dedupe_key=key,
        state=InboundState.IGNORED,
        in_reply_to=" ".join(facts.in_reply_to) or None,
        refs=" ".join(facts.references) or None,
        to_cc=json.dumps(on_message) if on_message else None,
        sender_name=(facts.from_.name if facts.from_ else "") or None,
        verified=verified,
    )
