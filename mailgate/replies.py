"""Replies and notices as outbox rows: who they go to, how they thread, and their fixed Message-ID.

A reply goes to the authenticated sender, with the other participants who were on the message in Cc,
and never to anyone who is not an allowed sender. Its Message-ID is chosen here and stored with the
outbox row in the same transaction that records the turn, so a resend after a crash carries the same id.
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

from mailgate import parsing, policy, threads
from mailgate.config import Settings
from mailgate.models import OutboxState, Source
from mailgate.render import AttachedFile, LinkedFile, Renderer, ReplyHeaders, SkippedFile
from mailgate.store import InboundRow, Statement, Store, insert

log = logging.getLogger("mailgate.replies")
DAY = 86400.0
_CHAIN_MESSAGES = 6  # earlier inbound messages read to rebuild a References chain
Prepared = tuple[ReplyHeaders, list[str]]  # a reply's headers and its recipients (sender first)


class Replies:
    """Builds the outbox rows for answers and notices."""

    def __init__(self, settings: Settings, store: Store, renderer: Renderer, secret: bytes) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.secret = secret

    async def prepare(self, row: InboundRow) -> Prepared:
        """Who the reply to `row` goes to and how it threads: reads only, so it can be done while the turn's
        outcome is still being fetched, and passed to `answer`."""
        return await self._headers(row)

    async def _headers(self, row: InboundRow) -> Prepared:
        assert row.sender is not None and row.task_id is not None
        settings = self.settings
        # the header block only (a big message's attachments are never read back); the three reads at once
        raw, task, listed = await asyncio.gather(
            self.store.raw_head(row.raw_id),
            self.store.task_row(row.task_id),
            self.store.participants(row.task_id),
        )
        head = parsing.read_headers(raw)
        owner = task.owner if task else row.sender
        participants = set(listed)
        on_message = [a.addr for name in ("to", "cc") for a in parsing.address_list(head, name)]
        cc = [
            addr
            for addr in dict.fromkeys(on_message)
            if addr != row.sender
            and addr in participants
            and not addr.endswith("@" + settings.domain)
            and policy.sender_allowed(addr, settings.allowed_senders)
        ]
        references = list(parsing.msgid_list(_get(head, "references")))
        if not references:  # Outlook sends In-Reply-To alone; a token-only message sends neither
            references = [*await self._task_chain(row), *parsing.msgid_list(_get(head, "in-reply-to"))]
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

    async def _task_chain(self, row: InboundRow) -> list[str]:
        """The Message-IDs of the task's earlier messages, both directions, oldest first.

        Only the root and the newest few are read: `render` keeps the first id and the last ten anyway.
        """
        if row.new_task or row.task_id is None:
            return []
        earlier = [m for m in await self.store.messages_of_task(row.task_id) if m.id < row.id]
        if len(earlier) > _CHAIN_MESSAGES:
            earlier = [earlier[0], *earlier[1 - _CHAIN_MESSAGES :]]
        chain: list[str] = []
        for message in earlier:
            if message.message_id:
                chain.append(message.message_id)
            chain += [out.message_id for out in await self.store.outbox_for(message.id)]
        return chain

    def _statements(
        self,
        row: InboundRow,
        msg: EmailMessage,
        headers: ReplyHeaders,
        recipients: list[str],
        kind: str,
        notice: str | None,
    ) -> list[Statement]:
        now = time.time()
        data = msg.as_bytes(policy=SMTP)
        outbox = {
            "id": str(ULID()),
            "inbound_id": row.id,
            "task_id": row.task_id,
            "kind": kind,
            "notice": notice,
            "message_id": headers.message_id,
            "mail_from": headers.from_addr,
            "recipients": json.dumps(recipients),
            "data": data,
            "state": OutboxState.PENDING,
            "created_at": now,
            "updated_at": now,
        }
        statements = [insert("outbox", outbox)]
        if row.task_id:
            statements.append(
                insert(
                    "thread_message",
                    {"message_id": headers.message_id, "task_id": row.task_id, "direction": "out"},
                    or_ignore=True,
                )
            )
        return statements

    async def answer(
        self,
        row: InboundRow,
        *,
        text: str,
        sources: Sequence[Source],
        task_url: str | None,
        attached: Sequence[AttachedFile] = (),
        linked: Sequence[LinkedFile] = (),
        skipped: Sequence[SkippedFile] = (),
        prepared: Prepared | None = None,
    ) -> list[Statement]:
        headers, recipients = prepared or await self._headers(row)
        msg = self.renderer.answer(
            headers,
            answer_markdown=text,
            sources=sources,
            task_url=task_url,
            attached=attached,
            linked=linked,
            skipped=skipped,
            note=row.note,
        )
        return self._statements(row, msg, headers, recipients, "answer", None)

    async def notice(
        self,
        row: InboundRow,
        kind: str,
        *,
        reason: str | None = None,
        task_url: str | None = None,
        skipped: Sequence[SkippedFile] = (),
        once_per_thread_per_day: bool = False,
    ) -> list[Statement]:
        """The notice's outbox rows, or none when the sender has had too many notices today."""
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
        msg = self.renderer.notice(headers, kind, reason=reason, task_url=task_url, skipped=skipped)
        return self._statements(row, msg, headers, recipients[:1], "notice", kind)


def _get(msg: EmailMessage, name: str) -> str:
    try:
        value = msg.get(name)
    except Exception:
        return ""
    return "" if value is None else str(value)
