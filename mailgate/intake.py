"""What happens between RCPT and the 250: every decision that can refuse mail, then the durable commit.

Order at the end of DATA: header size; mail that must never be answered (accepted and recorded as
ignored, so bounces are not bounced); sender authentication (550); the allow-list (550); the thread
and the rate limits (450, so the sender's MTA retries later); duplicates (250, nothing new); then the
raw message and its rows are committed with an fsync and only then answered 250.

`Intake` speaks to the store and the policy modules; it knows nothing of SMTP sessions (see ingress).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from ulid import ULID

from mailgate import authn, parsing, policy, threads
from mailgate.config import Settings
from mailgate.errors import MessageRejected
from mailgate.models import InboundState
from mailgate.store import IntakeFacts, Statement, Store, insert

HOUR = 3600.0
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")  # the end of the header block, CRLF or bare LF
_PLAIN_MAX = 4096  # longer address headers go to parsing.address_list (which cuts them at 64 KiB)
_LINESEP = re.compile(r"\n|\r")  # what policy.default removes from a header value before parsing it


@dataclass(frozen=True)
class Reply:
    """One SMTP/LMTP reply line for one recipient."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return self.code < 300


@dataclass
class _Plan:
    rcpt: str
    reply: Reply
    statements: list[Statement] = field(default_factory=list)


class Intake:
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

    async def check_recipient(self, address: str) -> Reply:
        """RCPT TO: a worker address (with a budget word or a valid reply token), or a refusal."""
        split = threads.split_recipient(address, self.settings.domain)
        if split is None:
            return Reply(550, "5.7.1 Relaying denied: this server only accepts mail for its own workers")
        alias, tag = split
        if self.settings.worker_for(alias) is None:
            return Reply(550, "5.1.1 No such worker here")
        if tag is not None and threads.looks_like_token(tag):
            task_id = threads.task_id_of_token(tag)
            ref = await self.store.task(task_id) if task_id else None
            if (
                ref is None
                or ref.alias != alias
                or not threads.verify_token(self.secret, tag, ref.task_id, ref.owner)
            ):
                return Reply(
                    550, "5.1.1 This reply address is not valid (altered or unknown); write to the worker"
                )
        return Reply(250, "2.1.5 Ok")

    async def accept(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[Reply]:
        """Decide on `raw` for each recipient; commit what is accepted. One reply per recipient.

        Raises `StoreBusy` when the commit fails (the caller answers 451 4.3.0 and keeps nothing).
        """
        try:
            return await self._accept(mail_from, rcpts, raw)
        except MessageRejected as exc:
            return [Reply(exc.code, f"{exc.status} {exc.reason}")] * len(rcpts)

    async def _accept(self, mail_from: str, rcpts: Sequence[str], raw: bytes) -> list[Reply]:
        settings = self.settings
        blank = _BLANK_LINE.search(raw, 0, settings.max_header_size + 4)
        if (blank.start() if blank else len(raw)) > settings.max_header_size:
            raise MessageRejected(552, "5.3.4", "Message header too large")
        headers = parsing.read_headers(raw)
        now = self.clock()
        raw_id = str(ULID())
        digest = hashlib.sha256(raw).hexdigest()
        message_id = _first(parsing.msgid_list(_header(headers, "message-id")))
        subject = _clean(_header(headers, "subject"))[:500]
        in_reply_to = parsing.msgid_list(_header(headers, "in-reply-to"))
        references = parsing.msgid_list(_header(headers, "references"))

        reason = policy.automatic_reason(headers, mail_from, own_domain=settings.domain)
        verdict: authn.AuthVerdict | None = None
        if reason is None:
            verdict = await self._authenticate(raw, headers)
            if verdict.sender is None and verdict.temporary:
                raise MessageRejected(
                    451, "4.7.0", f"Sender authentication could not complete: {verdict.reason}"
                )
            if verdict.sender is None:
                raise MessageRejected(550, "5.7.1", f"Sender not authenticated: {verdict.reason}")
            if not policy.sender_allowed(verdict.sender, settings.allowed_senders):
                raise MessageRejected(550, "5.7.1", f"{verdict.sender} may not send to this gateway")
        sender = verdict.sender if verdict else None

        # Every read the decisions below make, in one hop to the reader's thread (threads.resolve asks
        # `facts` the same questions; anything not read here goes to the store).
        splits = [threads.split_recipient(rcpt, settings.domain) or ("", None) for rcpt in rcpts]
        keys = [
            hashlib.sha256(f"{rcpt.lower()}\n{message_id or 'sha256:' + digest}".encode()).hexdigest()
            for rcpt in rcpts
        ]
        facts = await self.store.intake_facts(
            keys,
            token_task_ids=[
                task_id
                for _, tag in splits
                if tag is not None and threads.looks_like_token(tag)
                if (task_id := threads.task_id_of_token(tag))
            ],
            chain=list(dict.fromkeys([*in_reply_to, *reversed(references)])),
            aliases=sorted({alias for alias, _ in splits}),
            sender=sender if reason is None else None,
            since=now - HOUR,
            max_turns=settings.max_turns_per_thread_per_hour,
            max_new_tasks=settings.max_new_tasks_per_hour,
        )
        index = _Prefetched(self.store, facts)

        plans: list[_Plan] = []
        new_tasks_here = 0
        continued: dict[str, str] = {}  # task id -> the queue id of this message's turn for it
        for rcpt, (alias, tag), key in zip(rcpts, splits, keys, strict=True):
            duplicate = (
                facts.duplicates[key] if key in facts.duplicates else await self.store.duplicate_of(key)
            )
            if duplicate is not None:
                plans.append(_Plan(rcpt, Reply(250, f"2.0.0 Ok: already queued as {duplicate}")))
                continue
            queue_id = str(ULID())
            row: dict[str, Any] = {
                "id": queue_id,
                "raw_id": raw_id,
                "received_at": now,
                "updated_at": now,
                "mail_from": mail_from,
                "rcpt": rcpt.lower(),
                "alias": alias,
                "sender": sender,
                "message_id": message_id,
                "subject": subject,
                "dedupe_key": key,
            }
            if reason is not None or sender is None:
                row |= {"state": InboundState.IGNORED, "reason": reason}
                plans.append(
                    _Plan(rcpt, Reply(250, f"2.0.0 Ok: queued as {queue_id}"), [insert("inbound", row)])
                )
                continue
            try:
                plan = await self._plan_task(
                    index,
                    rcpt,
                    alias,
                    tag,
                    sender,
                    headers,
                    (in_reply_to, references),
                    row,
                    now,
                    new_tasks_here,
                )
            except MessageRejected as exc:
                plan = _Plan(rcpt, Reply(exc.code, f"{exc.status} {exc.reason}"))
            else:
                first = continued.setdefault(row["task_id"], row["id"])
                if first != row["id"]:  # one task reached through two addresses (token and plain): one turn
                    row |= {"state": InboundState.IGNORED, "reason": f"same task as {first}", "task_id": None}
                    plan = _Plan(
                        rcpt, Reply(250, f"2.0.0 Ok: already queued as {first}"), [insert("inbound", row)]
                    )
            new_tasks_here += bool(row.get("new_task"))
            plans.append(plan)

        if not any(p.statements for p in plans):
            return [p.reply for p in plans]
        statements: list[Statement] = [
            insert("raw_message", {"id": raw_id, "sha256": digest, "size": len(raw), "data": raw})
        ]
        for plan in plans:
            statements += plan.statements
        await self.store.write(statements)
        return [p.reply for p in plans]

    async def _authenticate(self, raw: bytes, headers: EmailMessage) -> authn.AuthVerdict:
        mode = self.settings.auth
        if mode == "none":
            return authn.trust_from_header(headers)
        if mode == "dkim":
            return await asyncio.to_thread(authn.verify_dkim, raw, headers, dnsfunc=self.dkim_dns)
        return authn.verify_dmarc_results(headers, authserv_id=self.settings.authserv_id or "")

    async def _plan_task(
        self,
        index: _Prefetched,
        rcpt: str,
        alias: str,
        tag: str | None,
        sender: str,
        headers: EmailMessage,
        chain: tuple[Sequence[str], Sequence[str]],
        row: dict[str, Any],
        now: float,
        new_tasks_here: int,
    ) -> _Plan:
        settings = self.settings
        try:
            found = await threads.resolve(
                index,
                self.secret,
                alias=alias,
                tag=tag,
                sender=sender,
                in_reply_to=chain[0],
                references=chain[1],
            )
        except threads.BadToken:
            raise MessageRejected(
                550, "5.1.1", "This reply address is not valid (altered or unknown)"
            ) from None
        statements: list[Statement] = []
        if found.task is not None:
            task_id = found.task.task_id
            turns = await index.count_turns(task_id, now - HOUR, settings.max_turns_per_thread_per_hour)
            if turns >= settings.max_turns_per_thread_per_hour:
                raise MessageRejected(
                    450, "4.7.1", "Too many messages in this conversation in the last hour; try later"
                )
        else:
            worker = settings.worker_for(alias)
            assert worker is not None  # checked at RCPT
            recent = (
                await index.count_new_tasks(sender, now - HOUR, settings.max_new_tasks_per_hour)
                + new_tasks_here
            )
            if recent >= settings.max_new_tasks_per_hour:
                raise MessageRejected(450, "4.7.1", "Too many new tasks from you in the last hour; try later")
            task_id = threads.new_task_id()
            budget = policy.requested_budget(found.budget_tag, worker.budget, settings.max_budget)
            statements.append(
                insert(
                    "task",
                    {
                        "id": task_id,
                        "alias": alias,
                        "worker_id": worker.worker_id,
                        "owner": sender,
                        "budget": budget,
                        "subject": row["subject"],
                        "created_at": now,
                    },
                )
            )
            row["new_task"] = 1
        row |= {"task_id": task_id, "state": InboundState.RECEIVED, "note": found.note}
        statements.append(insert("inbound", row))
        people = {sender} | {
            addr
            for name in ("to", "cc")
            for addr in _addresses(headers, name)
            if addr.rpartition("@")[2] != settings.domain
            and policy.sender_allowed(addr, settings.allowed_senders)
        }
        statements += [
            insert("participant", {"task_id": task_id, "addr": p}, or_ignore=True) for p in sorted(people)
        ]
        if row["message_id"]:
            statements.append(
                insert(
                    "thread_message",
                    {"message_id": row["message_id"], "task_id": task_id, "direction": "in"},
                    or_ignore=True,
                )
            )
        return _Plan(rcpt, Reply(250, f"2.0.0 Ok: queued as {row['id']}"), statements)


def combine(replies: Sequence[Reply]) -> Reply:
    """One SMTP reply for several recipients: a temporary failure wins, then a permanent one."""
    for reply in replies:
        if 400 <= reply.code < 500:
            return reply
    for reply in replies:
        if reply.code >= 500:
            return reply
    return replies[0]


class _Prefetched:
    """The store's reads for one message, answered from `IntakeFacts` where it holds the answer."""

    def __init__(self, store: Store, facts: IntakeFacts) -> None:
        self.store = store
        self.facts = facts

    async def task(self, task_id: str) -> threads.TaskRef | None:
        if task_id in self.facts.tasks:
            return self.facts.tasks[task_id]
        return await self.store.task(task_id)

    async def task_for_message_ids(self, message_ids: Sequence[str], alias: str) -> threads.TaskRef | None:
        if list(message_ids) == self.facts.chain and alias in self.facts.by_chain:
            return self.facts.by_chain[alias]
        return await self.store.task_for_message_ids(message_ids, alias)

    async def is_participant(self, task_id: str, addr: str) -> bool:
        if addr == self.facts.sender and task_id in self.facts.participant:
            return self.facts.participant[task_id]
        return await self.store.is_participant(task_id, addr)

    async def count_turns(self, task_id: str, since: float, limit: int) -> int:
        if task_id in self.facts.turns:
            return self.facts.turns[task_id]
        return await self.store.count_turns(task_id, since, limit)

    async def count_new_tasks(self, owner: str, since: float, limit: int) -> int:
        if owner == self.facts.sender and self.facts.new_tasks is not None:
            return self.facts.new_tasks
        return await self.store.count_new_tasks(owner, since, limit)


def _header(msg: EmailMessage, name: str) -> str:
    """`str(msg.get(name))` for a policy.default message ("" when absent or unreadable), cheaper."""
    try:
        for key, value in msg.raw_items():
            if key.lower() == name:
                return authn.header_text(key, "".join(_LINESEP.split(value)))
    except Exception:
        return ""
    return ""


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    """The addrs of `parsing.address_list(msg, name)`; plain values are read without the email package."""
    found: list[str] = []
    try:
        for key, value in msg.raw_items():
            if key.lower() != name:
                continue
            plain = (
                authn.plain_mailboxes("".join(_LINESEP.split(value))) if len(value) <= _PLAIN_MAX else None
            )
            if plain is None:
                return [a.addr for a in parsing.address_list(msg, name)]
            found += [f"{local}@{domain}".lower() for _, local, domain in plain]
    except Exception:
        return [a.addr for a in parsing.address_list(msg, name)]
    return list(dict.fromkeys(found))


def _clean(value: str) -> str:
    return " ".join(value.replace("\x00", " ").split())


def _first(items: Sequence[str]) -> str | None:
    return items[0] if items else None
