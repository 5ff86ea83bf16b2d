"""What the worker receives for one message: the turn's input text and its files. Pure.

The input says who asked (the authenticated sender) and keeps their own words apart from quoted or
forwarded material, so the worker can tell a request from the context that came with it. A follow-up
carries only the new text. Files are taken in message order while they fit the API's limits (5 files,
10 MB each, 30 MB in all); the rest are skipped with a reason the reply shows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from mailgate.models import Attachment, MailBody, SkippedFile, human_size

MAX_FILES = 5
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_TOTAL_BYTES = 30 * 1024 * 1024
MAX_INPUT_CHARS = 100_000


@dataclass(frozen=True)
class TurnInput:
    input: str  # empty: nothing to send (a reply with no new text and no files)
    files: tuple[Attachment, ...]
    skipped: tuple[SkippedFile, ...]


def pick_files(
    attachments: Sequence[Attachment], *, already_sent: Collection[str] = ()
) -> tuple[list[Attachment], list[SkippedFile]]:
    """Files that fit the API limits, in order; `already_sent` are sha256s the task already has."""
    chosen: list[Attachment] = []
    skipped: list[SkippedFile] = []
    total = 0
    for att in attachments:
        if hashlib.sha256(att.data).hexdigest() in already_sent:
            continue  # already in the task's workspace from an earlier turn
        if att.size > MAX_FILE_BYTES:
            skipped.append(
                SkippedFile(att.filename, f"{human_size(att.size)}, over the 10 MB limit per file")
            )
        elif len(chosen) >= MAX_FILES:
            skipped.append(SkippedFile(att.filename, "over the limit of 5 files per message"))
        elif total + att.size > MAX_TOTAL_BYTES:
            skipped.append(
                SkippedFile(att.filename, f"{human_size(att.size)}, over the 30 MB limit per message")
            )
        else:
            chosen.append(att)
            total += att.size
    return chosen, skipped


def build_turn_input(
    body: MailBody,
    *,
    subject: str,
    sender: str,
    sender_name: str | None,
    new_task: bool,
    already_sent: Collection[str] = (),
) -> TurnInput:
    """The turn for a message from the authenticated `sender` (`sender_name`: its From display name)."""
    files, skipped = pick_files(body.attachments, already_sent=already_sent)
    skipped += [SkippedFile(name, reason) for name, reason in body.unreadable]
    own = body.reply_text.strip()
    context = ""
    if new_task:
        whole = body.text.strip()
        if own and whole.startswith(own):
            context = whole[len(own) :].strip()
        elif not own or own != whole:
            context = whole
    if not own and not context and not files and not (new_task and subject):
        return TurnInput("", (), tuple(skipped))
    who = f"{sender_name} <{sender}>" if sender_name else sender
    parts = [f"Email from {who}", f"Subject: {subject or '(no subject)'}", ""]
    parts.append(own if own else "(no new text in this message)")
    if context:
        parts += [
            "",
            "----- Quoted or forwarded material that came with the message"
            " (context, not the sender's request) -----",
            context,
        ]
    if files:
        parts += ["", "Attached files: " + ", ".join(f.filename for f in files)]
    text = "\n".join(parts)
    if len(text) > MAX_INPUT_CHARS:
        text = (
            text[:MAX_INPUT_CHARS] + "\n[... the rest of the message was cut: it is over 100,000 characters]"
        )
    return TurnInput(text, tuple(files), tuple(skipped))
