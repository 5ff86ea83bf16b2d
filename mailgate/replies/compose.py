"""Composing the mail that goes back: answers and notices as outbox rows, who they go to, how they
thread, and their fixed Message-ID.

A reply goes to the authenticated sender, with the other participants who were on the message in Cc,
and never to anyone who is not an allowed sender. Its threading comes from what admission stored on
the row (In-Reply-To, References, To/Cc): the raw message is never read again. Its Message-ID is chosen
here and stored with the outbox row in the same transaction that ends the message, so a resend after a
crash carries the same id. So is its return path (`alias+bounce-<token>@domain`, `tokens.return_path`),
which names the outbox row when a bounce comes back; and, with MAILGATE_DKIM_SELECTOR and
MAILGATE_DKIM_KEY, its DKIM signature (`replies.signing`): the stored bytes (and the links-only
version) are signed once, off the loop, and SIGNATURE_RESERVE of the size limit is kept for it.

Notices (a failure, a hold, the acknowledgement of a long turn, the answer to a command) obey the
limits of `replies.limits`: the suppression list, the gateway-wide reply storm, the replies per address
per hour, the notices per sender per day, once per thread per day for some kinds. Answers are always
composed; one to an address that had its hour's replies waits in the outbox until it fits.

An answer's reply is built in a worker thread (`asyncio.to_thread`: Markdown, sanitising, MIME and its
bytes), so however big the answer, the event loop keeps serving SMTP meanwhile. Its size is bounded:

- the body shows at most MAILGATE_MAX_ANSWER_INLINE bytes of the answer and says when it was cut; the
  whole answer is then attached as `answer.md`, in the most compact encoding the relay path allows
  (`wire.encode_text`; 8-bit only when the delivery says the relay takes it);
- the whole reply, as bytes on the wire, stays under MAILGATE_MAX_REPLY_SIZE: the worker's files become
  links first, the largest first, then `answer.md` is left out (the body points to the task page);
- a reply with anything attached also gets a links-only version (no attachments, the body as capped),
  stored with the outbox row in the same transaction: the outbox sends it, under the same Message-ID,
  when the relay refuses the first for its size (552). Stored rather than re-rendered later, because
  re-rendering would need the answer again (from the API, which may have moved on) and the renderer of
  a later version; it costs the links-only bytes (the capped body, ~100-250 KB) per such reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ulid import ULID

from mailgate import tokens
from mailgate.admission import policy
from mailgate.config import Settings
from mailgate.models import (
    AttachedFile,
    LinkedFile,
    ReplyHeaders,
    SentFile,
    SkippedFile,
    TurnAnswer,
)
from mailgate.replies import wire
from mailgate.replies.limits import ReplyLimits
from mailgate.replies.output_files import OutputFiles, Prefetch
from mailgate.replies.render import SMTP, Renderer
from mailgate.replies.signing import DkimSigner
from mailgate.store import InboundRow, NewReply, Store, TaskRow

log = logging.getLogger("mailgate.replies")
CHAIN_MESSAGES = 6  # earlier messages read to rebuild a References chain (render keeps 11 ids anyway)
WORKING = "working"  # the notice that a long turn is being worked on
SIGNATURE_RESERVE = 1024  # bytes a DKIM-Signature field adds (about 700 with a 2048-bit key)


class Replies:
    """Builds the outbox rows for answers and notices."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        renderer: Renderer,
        output_files: OutputFiles,
        secret: bytes,
        *,
        eight_bit: Callable[[], bool] = lambda: True,
        signer: DkimSigner | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.output_files = output_files
        self.secret = secret
        self.eight_bit = eight_bit  # whether the relay path takes 8-bit data (asked at each reply)
        self.signer = signer
        self.limits = ReplyLimits(settings, store)

    async def answer(
        self, row: InboundRow, answer: TurnAnswer, prefetched: Prefetch | None = None
    ) -> list[NewReply]:
        """The reply carrying a turn's answer, its sources, and the worker's files (attached or linked;
        `prefetched`: those already on their way, see `output_files`). Its footer names the task's
        budget; the first answer of a task also says when the budget the address asked for was capped."""
        headers, recipients, task = await self._headers(row)
        # its place under the hourly limit is taken (a commit) while the files come and it is rendered
        placing = asyncio.create_task(self.limits.answer_at(row, recipients, outbox_id=headers.outbox_id))
        try:
            data, fallback = await self._answer_data(row, answer, headers, task, prefetched)
        except BaseException:
            placing.cancel()
            await asyncio.gather(placing, return_exceptions=True)
            raise
        at = await placing
        return [await self._reply(row, data, headers, recipients, "answer", None, fallback, at=at)]

    async def _answer_data(
        self,
        row: InboundRow,
        answer: TurnAnswer,
        headers: ReplyHeaders,
        task: TaskRow | None,
        prefetched: Prefetch | None,
    ) -> tuple[bytes, bytes | None]:
        """The answer's reply as bytes, and its links-only version (see `_answer_bytes`)."""
        attached, linked = await self.output_files.collect(answer.files, prefetched)
        draft = _Draft(
            headers,
            answer,
            attached,
            linked,
            _skipped(row.skipped),
            row.note,
            self.eight_bit(),
            budget=task.budget if task else None,
            budget_asked=_capped(task) if row.new_task else None,
        )
        started = time.perf_counter()
        data, fallback = await asyncio.to_thread(self._answer_bytes, draft)
        log.info(
            "reply_composed",
            extra={
                "inbound": row.id,
                "bytes": len(data),
                "fallback_bytes": len(fallback) if fallback else 0,
                "render_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return data, fallback

    def _answer_bytes(self, draft: _Draft) -> tuple[bytes, bytes | None]:
        """In a worker thread: the reply's bytes under the size limit, and its links-only version
        when anything is attached (see the module docstring): `render` lays it out, `wire` builds it."""
        plan = self.renderer.answer_plan(
            draft.headers,
            draft.answer,
            attached=draft.attached,
            linked=draft.linked,
            skipped=draft.skipped,
            note=draft.note,
            eight_bit=draft.eight_bit,
            max_inline=self.settings.max_answer_inline,
            limit=self._size_limit,
            budget=draft.budget,
            budget_asked=draft.budget_asked,
        )
        return wire.build(plan.skeleton, plan.parts), plan.fallback

    @property
    def _size_limit(self) -> int:
        """MAILGATE_MAX_REPLY_SIZE, less the room a DKIM signature takes when replies are signed."""
        return self.settings.max_reply_size - (SIGNATURE_RESERVE if self.signer is not None else 0)

    async def notice(
        self,
        row: InboundRow,
        kind: str,
        *,
        detail: str | None = None,
        task_url: str | None = None,
        skipped: Sequence[SkippedFile] = (),
        once_per_thread_per_day: bool = False,
        details: Sequence[tuple[str, str]] = (),
    ) -> list[NewReply]:
        """The notice's outbox row, or none when the notice limits say so (see the module docstring).
        `details`: (label, value) lines (the answer to `/status`)."""
        if row.sender is None:
            return []
        headers, recipients, _ = await self._headers(row)
        once = once_per_thread_per_day
        if not await self.limits.may_notify(
            row, kind, outbox_id=headers.outbox_id, once_per_thread_per_day=once
        ):
            return []
        msg = self.renderer.notice(
            headers, kind, reason=detail, task_url=task_url, skipped=skipped, details=details
        )
        return [await self._reply(row, msg.as_bytes(policy=SMTP), headers, recipients[:1], "notice", kind)]

    async def acknowledgement(self, row: InboundRow, task_url: str | None) -> list[NewReply]:
        """The notice that a long turn is being worked on: the task's link, what the worker received
        (files sent, files skipped and why) and the budget; none when the notice limits say so."""
        if row.sender is None:
            return []
        headers, recipients, task = await self._headers(row)
        if not await self.limits.may_notify(row, WORKING, outbox_id=headers.outbox_id):
            return []
        msg = self.renderer.notice(
            headers,
            WORKING,
            task_url=task_url,
            skipped=_skipped(row.skipped),
            sent=_sent(row.files),
            budget=task.budget if task else None,
            budget_asked=_capped(task) if row.new_task else None,
        )
        return [await self._reply(row, msg.as_bytes(policy=SMTP), headers, recipients[:1], "notice", WORKING)]

    async def _headers(self, row: InboundRow) -> tuple[ReplyHeaders, list[str], TaskRow | None]:
        """How the reply to `row` threads, its recipients (the sender first), and its task."""
        assert row.sender is not None and row.task_id is not None
        settings = self.settings
        task, listed = await asyncio.gather(
            self.store.task_row(row.task_id), self.store.participants(row.task_id)
        )
        owner = task.owner if task else row.sender
        participants = set(listed)
        cc = [
            addr
            for addr in dict.fromkeys(row.to_cc_addrs)
            if addr != row.sender
            and addr in participants
            and not addr.endswith("@" + settings.domain)
            and policy.sender_allowed(addr, settings.allowed_senders)
        ]
        references = row.reference_ids
        if not references:  # Outlook sends In-Reply-To alone; a token-only message sends neither
            earlier = (
                []
                if row.new_task
                else await self.store.thread_chain(row.task_id, before=row.id, limit=CHAIN_MESSAGES)
            )
            references = [*earlier, *row.in_reply_to_ids]
        if row.message_id:
            references.append(row.message_id)
        alias = row.alias
        outbox_id = str(ULID())  # chosen with the Message-ID: the return path names it
        headers = ReplyHeaders(
            from_addr=f"{alias}@{settings.domain}",
            from_name=f"{alias} (mailgate)",
            to=[row.sender],
            cc=cc,
            reply_to=tokens.reply_to(self.secret, alias, settings.domain, row.task_id, owner),
            subject=row.subject,
            message_id=f"<{ULID()}.mailgate@{settings.domain}>",
            in_reply_to=row.message_id,
            references=references,
            loop_header_value=settings.domain,
            outbox_id=outbox_id,
            return_path=tokens.return_path(self.secret, alias, settings.domain, outbox_id),
        )
        return headers, [row.sender, *cc], task

    async def _reply(
        self,
        row: InboundRow,
        data: bytes,
        headers: ReplyHeaders,
        recipients: list[str],
        kind: str,
        notice: str | None,
        fallback: bytes | None = None,
        *,
        at: float = 0.0,
    ) -> NewReply:
        outbox_id = headers.outbox_id
        if self.signer is not None:  # reads the whole body: off the loop
            data = await asyncio.to_thread(self.signer.sign, data)
            if fallback is not None:
                fallback = await asyncio.to_thread(self.signer.sign, fallback)
        return NewReply(
            id=outbox_id,
            inbound_id=row.id,
            task_id=row.task_id,
            kind=kind,
            notice=notice,
            message_id=headers.message_id,
            mail_from=headers.return_path,
            recipients=recipients,
            data=data,
            created_at=time.time(),
            fallback=fallback,
            next_attempt_at=at,
        )


@dataclass(frozen=True)
class _Draft:
    """What an answer's reply is made of, handed to the worker thread."""

    headers: ReplyHeaders
    answer: TurnAnswer
    attached: Sequence[AttachedFile]
    linked: Sequence[LinkedFile]
    skipped: Sequence[SkippedFile]
    note: str | None
    eight_bit: bool
    budget: str | None = None
    budget_asked: str | None = None


def _skipped(data: str | None) -> list[SkippedFile]:
    return [SkippedFile(s["filename"], s["reason"]) for s in json.loads(data or "[]")]


def _sent(data: str | None) -> list[SentFile]:
    return [SentFile(f["filename"], int(f["size"])) for f in json.loads(data or "[]")]


def _capped(task: TaskRow | None) -> str | None:
    """The budget the task's address asked for, when the task got another (a lower one: the cap)."""
    if task is None or task.budget_asked is None or task.budget_asked == task.budget:
        return None
    return task.budget_asked
