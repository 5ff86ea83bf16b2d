"""Admission: every decision that can refuse a message at RCPT or at the end of DATA, then the durable commit.

A bounce of one of our replies comes to that reply's return path (`alias+bounce-<token>@domain`, see
`admission.bounces`): its RCPT is refused unless the token names a reply we sent, and at DATA it is read
(`mail.dsn`) and recorded before anything else: the reply is marked `bounced`, the message `ignored`
("bounce of our reply <id>"), never answered, whoever sent it.

Order at the end of DATA: header size; mail that must never be answered (accepted and recorded as
ignored, so bounces are not bounced); sender authentication (550); the allow-list (550); the thread
and the rate limits (450, so the sender's MTA retries later); duplicates (250, nothing new); then the
raw message and its rows are committed with an fsync and only then answered 250.

The header block is read here once (`mail.headers`); what later stages need of it is stored on each
message's row. `Admission` speaks to the store and to the pure policy modules; it knows nothing of SMTP
sessions (see `smtp.handler`), only the reply each recipient gets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ulid import ULID

from mailgate.admission import authn, bounces, policy, threads
from mailgate.config import Settings
from mailgate.errors import BadToken, MessageRejected
from mailgate.mail import dsn
from mailgate.mail.headers import Headers, header_size, read_facts
from mailgate.models import HeaderFacts, InboundState, SmtpReply
from mailgate.store import AdmissionFacts, Admitted, NewBounce, NewMessage, NewTask, OutboxRow, Store

HOUR = 3600.0
BIG_HEADER = 16 * 1024  # bytes of header read in a worker thread rather than on the loop
BIG_BODY = 1024 * 1024  # bytes of message hashed in a worker thread
MAX_ON_MESSAGE = 100  # To/Cc addresses kept on the row (candidates for the reply's Cc)
BAD_TOKEN = "5.1.1 This reply address is not valid (altered or unknown); write to the worker"  # noqa: S105
BAD_BOUNCE = "5.1.1 This return path is not valid (altered or unknown)"


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
        split = threads.split_recipient(address, self.settings.domain)
        if split is None:
            return SmtpReply(
                550,
                "5.7.1 Relaying denied: this server only accepts mail for its own workers",
                why="relay_denied",
            )
        alias, tag = split
        if tag is not None and tag.startswith(bounces.BOUNCE_PREFIX):  # before the alias: it may be gone
            ok = await self._bounced_reply(address) is not None
            return SmtpReply(250, "2.1.5 Ok") if ok else SmtpReply(550, BAD_BOUNCE)
        if self.settings.worker_for(alias) is None:
            return SmtpReply(550, "5.1.1 No such worker here", why="unknown_worker")
        if tag is not None and threads.looks_like_token(tag):
            task_id = threads.task_id_of_token(tag)
            ref = await self.store.task(task_id) if task_id else None
            if (
                ref is None
                or ref.alias != alias
                or not threads.verify_token(self.secret, tag, ref.task_id, ref.owner)
            ):
                return SmtpReply(550, BAD_TOKEN, why="bad_token")
        return SmtpReply(250, "2.1.5 Ok", why="accepted")

    async def accept(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[SmtpReply]:
        """Decide on `raw` for each recipient; commit what is accepted. One reply per recipient.

        Raises `StoreBusy` when the commit fails (the caller answers 451 4.3.0 and keeps nothing).
        Return paths of our replies (bounces) and worker addresses in one message are decided apart.
        """
        returns = [r for r in rcpts if _is_return_path(r, self.settings.domain)]
        others = [r for r in rcpts if r not in returns]
        replies: dict[str, SmtpReply] = {}
        for group, decide in ((returns, self._accept_bounce), (others, self._accept)):
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
        split = threads.split_recipient(address, self.settings.domain)
        token = bounces.token_of_tag(split[1] or "") if split else None
        if split is None or token is None:
            return None
        own = f"{split[0]}+{bounces.BOUNCE_PREFIX}{token}@{self.settings.domain}"
        row = await self.store.outbox_by_mail_from(own)
        if row is None or not bounces.verify_bounce_token(self.secret, token, row.id):
            return None
        return row

    async def _accept_bounce(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[SmtpReply]:
        """Mail to the return paths of our replies: record each as a bounce of its reply, never answer.

        Nothing is refused for who sent it (a bounce comes from MAILER-DAEMON, or from nobody); it is
        recorded before the policy that ignores automatic mail could say anything else of it.
        """
        if header_size(raw, self.settings.max_header_size) > self.settings.max_header_size:
            raise MessageRejected(552, "5.3.4", "Message header too large")
        facts = read_facts(Headers.parse(raw))
        now = self.clock()
        raw_id = str(ULID())
        digest = hashlib.sha256(raw).hexdigest()
        keys = [_dedupe_key(rcpt, facts.message_id, digest) for rcpt in rcpts]
        known = await self.store.admission_facts(keys, max_turns=0, max_new_tasks=0)  # duplicates only
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
                    data=raw,
                    messages=messages,
                    bounces=found,
                    received_at=now,
                    bounce_limit=self.settings.bounce_limit,
                )
            )
        return out

    async def _accept(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[SmtpReply]:
        settings = self.settings
        size = header_size(raw, settings.max_header_size)
        if size > settings.max_header_size:
            raise MessageRejected(552, "5.3.4", "Message header too large", why="header_too_large")
        # A big header (encoded words by the thousand) takes a while to read, and a big message to
        # hash: in a worker thread, where the interpreter hands the loop a turn every few milliseconds
        # (and hashlib lets go of it altogether), the other SMTP sessions are not held meanwhile.
        if size > BIG_HEADER:
            headers, facts, reason = await asyncio.to_thread(self._read_header, raw, mail_from)
        else:
            headers, facts, reason = self._read_header(raw, mail_from)
        now = self.clock()
        raw_id = str(ULID())
        if len(raw) > BIG_BODY:
            digest = await asyncio.to_thread(_sha256, raw)
        else:
            digest = _sha256(raw)

        sender: str | None = None
        if reason is None:
            verdict = await self._authenticate(raw, headers)
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
            if not policy.sender_allowed(verdict.sender, settings.allowed_senders):
                raise MessageRejected(
                    550, "5.7.1", f"{verdict.sender} may not send to this gateway", why="sender_not_allowed"
                )
            sender = verdict.sender

        # Every read the decisions below make, in one hop to the reader's thread.
        splits = [threads.split_recipient(rcpt, settings.domain) or ("", None) for rcpt in rcpts]
        keys = [_dedupe_key(rcpt, facts.message_id, digest) for rcpt in rcpts]
        known = await self.store.admission_facts(
            keys,
            token_task_ids=[
                task_id
                for _, tag in splits
                if tag is not None and threads.looks_like_token(tag)
                if (task_id := threads.task_id_of_token(tag))
            ],
            chain=_chain(facts),
            aliases=sorted({alias for alias, _ in splits}),
            sender=sender,
            since=now - HOUR,
            max_turns=settings.max_turns_per_thread_per_hour,
            max_new_tasks=settings.max_new_tasks_per_hour,
        )

        plans: list[_Plan] = []
        new_tasks_here = 0
        continued: dict[str, str] = {}  # task id -> the queue id of this message's turn for it
        for rcpt, (alias, tag), key in zip(rcpts, splits, keys, strict=True):
            duplicate = known.duplicates.get(key)
            if duplicate is not None:
                plans.append(
                    _Plan(rcpt, SmtpReply(250, f"2.0.0 Ok: already queued as {duplicate}", why="duplicate"))
                )
                continue
            message = _new_message(facts, raw_id, now, mail_from, rcpt, alias, sender, key)
            if sender is None:
                message = replace(message, state=InboundState.IGNORED, reason=reason)
                reply = SmtpReply(250, f"2.0.0 Ok: queued as {message.id}", why="ignored", note=reason or "")
                plans.append(_Plan(rcpt, reply, message))
                continue
            try:
                plan = self._plan_task(known, rcpt, alias, tag, sender, facts, message, now, new_tasks_here)
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
        await self.store.admit(
            Admitted(
                raw_id=raw_id,
                sha256=digest,
                data=raw,
                messages=messages,
                tasks=[p.task for p in plans if p.task is not None],
                participants=sorted({pair for p in plans for pair in p.participants}),
                thread_ids=[
                    (m.message_id, m.task_id)
                    for m in messages
                    if m.message_id and m.task_id and m.state == InboundState.RECEIVED
                ],
            )
        )
        return [p.reply for p in plans]

    def _read_header(self, raw: bytes, mail_from: str) -> tuple[Headers, HeaderFacts, str | None]:
        """The header block, what later stages keep of it, and why it is automatic mail (or None)."""
        headers = Headers.parse(raw)
        reason = policy.automatic_reason(headers, mail_from, own_domain=self.settings.domain)
        return headers, read_facts(headers), reason

    async def _authenticate(self, raw: bytes, headers: Headers) -> authn.AuthVerdict:
        mode = self.settings.auth
        if mode == "none":
            return authn.trust_from_header(headers)
        if mode == "dkim":
            return await asyncio.to_thread(authn.verify_dkim, raw, headers, dnsfunc=self.dkim_dns)
        return authn.verify_dmarc_results(headers, authserv_id=self.settings.authserv_id or "")

    def _plan_task(
        self,
        known: AdmissionFacts,
        rcpt: str,
        alias: str,
        tag: str | None,
        sender: str,
        facts: HeaderFacts,
        message: NewMessage,
        now: float,
        new_tasks_here: int,
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
            budget = policy.requested_budget(found.budget_tag, worker.budget, settings.max_budget)
            task = NewTask(
                id=task_id,
                alias=alias,
                worker_id=worker.worker_id,
                owner=sender,
                budget=budget,
                subject=message.subject,
                created_at=now,
                budget_asked=policy.asked_budget(found.budget_tag),
            )
        message = replace(
            message,
            task_id=task_id,
            state=InboundState.RECEIVED,
            note=found.note,
            new_task=int(task is not None),
        )
        people = {sender} | {
            a.addr
            for a in (*facts.to, *facts.cc)
            if a.domain != settings.domain and policy.sender_allowed(a.addr, settings.allowed_senders)
        }
        return _Plan(
            rcpt,
            SmtpReply(250, f"2.0.0 Ok: queued as {message.id}", why="accepted"),
            message,
            task,
            [(task_id, p) for p in sorted(people)],
        )


def _is_return_path(rcpt: str, domain: str) -> bool:
    """Is `rcpt` shaped like the return path of one of our replies (`alias+bounce-...@domain`)?"""
    split = threads.split_recipient(rcpt, domain)
    return split is not None and (split[1] or "").startswith(bounces.BOUNCE_PREFIX)


def _dedupe_key(rcpt: str, message_id: str | None, digest: str) -> str:
    return hashlib.sha256(f"{rcpt.lower()}\n{message_id or 'sha256:' + digest}".encode()).hexdigest()


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
    )


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
