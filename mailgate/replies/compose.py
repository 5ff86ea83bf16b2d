"""Composing the mail that goes back: answers and notices as outbox rows, who they go to, how they
thread, and their fixed Message-ID.

A reply goes to the authenticated sender, with the other participants who were on the message in Cc,
and never to anyone who is not an allowed sender. Its threading comes from what admission stored on
the row (In-Reply-To, References, To/Cc): the raw message is never read again. Its Message-ID is chosen
here and stored with the outbox row in the same transaction that ends the message, so a resend after a
crash carries the same id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP

from ulid import ULID

from mailgate.admission import policy, threads
from mailgate.config import Settings
from mailgate.models import ReplyHeaders, SkippedFile, TurnAnswer
from mailgate.replies.output_files import OutputFiles
from mailgate.replies.render import Renderer
from mailgate.store import InboundRow, NewReply, Store

log = logging.getLogger("mailgate.replies")
DAY = 86400.0
CHAIN_MESSAGES = 6  # earlier messages read to rebuild a References chain (render keeps 11 ids anyway)


class Replies:
    """Builds the outbox rows for answers and notices."""

    def __init__(
        self, settings: Settings, store: Store, renderer: Renderer, output_files: OutputFiles, secret: bytes
    ) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.output_files = output_files
        self.secret = secret

    async def answer(self, row: InboundRow, answer: TurnAnswer) -> list[NewReply]:
        """The reply carrying a turn's answer, its sources, and the worker's files (attached or linked)."""
        headers, recipients = await self._headers(row)
        attached, linked = await self.output_files.collect(answer.files)
        msg = self.renderer.answer(
            headers,
            answer_markdown=answer.text,
            sources=answer.sources,
            task_url=answer.task_url,
            attached=attached,
            linked=linked,
            skipped=_skipped(row.skipped),
            note=row.note,
        )
        return [self._reply(row, msg, headers, recipients, "answer", None)]

    async def notice(
        self,
        row: InboundRow,
        kind: str,
        *,
        detail: str | None = None,
        task_url: str | None = None,
        skipped: Sequence[SkippedFile] = (),
        once_per_thread_per_day: bool = False,
    ) -> list[NewReply]:
        """The notice's outbox row, or none when the sender has had too many notices today."""
        if row.sender is None:
            return []
        since = time.time() - DAY
        if await self.store.count_notices(row.sender, since) >= self.settings.max_notices_per_day:
            log.warning(
                "notice_suppressed", extra={"inbound": row.id, "kind": kind, "why": "daily notice limit"}
            )
            return []
        if (
            once_per_thread_per_day
            and row.task_id
            and await self.store.count_notices_for_task(row.task_id, kind, since)
        ):
            log.info(
                "notice_suppressed", extra={"inbound": row.id, "kind": kind, "why": "already told today"}
            )
            return []
        headers, recipients = await self._headers(row)
        msg = self.renderer.notice(headers, kind, reason=detail, task_url=task_url, skipped=skipped)
        return [self._reply(row, msg, headers, recipients[:1], "notice", kind)]

    async def _headers(self, row: InboundRow) -> tuple[ReplyHeaders, list[str]]:
        """How the reply to `row` threads, and its recipients (the sender first)."""
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
        token = threads.make_token(self.secret, row.task_id, owner)
        headers = ReplyHeaders(
            from_addr=f"{alias}@{settings.domain}",
            from_name=f"{alias} (mailgate)",
            to=[row.sender],
            cc=cc,
            reply_to=f"{alias}+{token}@{settings.domain}",
            subject=row.subject,
            message_id=f"<{ULID()}.mailgate@{settings.domain}>",
            in_reply_to=row.message_id,
            references=references,
            loop_header_value=settings.domain,
        )
        return headers, [row.sender, *cc]

    def _reply(
        self,
        row: InboundRow,
        msg: EmailMessage,
        headers: ReplyHeaders,
        recipients: list[str],
        kind: str,
        notice: str | None,
    ) -> NewReply:
        return NewReply(
            id=str(ULID()),
            inbound_id=row.id,
            task_id=row.task_id,
            kind=kind,
            notice=notice,
            message_id=headers.message_id,
            mail_from=headers.from_addr,
            recipients=recipients,
            data=msg.as_bytes(policy=SMTP),
            created_at=time.time(),
        )


def _skipped(data: str | None) -> list[SkippedFile]:
    return [SkippedFile(s["filename"], s["reason"]) for s in json.loads(data or "[]")]
