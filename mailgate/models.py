"""Plain data passed between mailgate's modules. No I/O, no behaviour beyond small helpers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

BUDGETS = ("low", "standard", "high", "unlimited")


class InboundState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    SUBMITTING = "submitting"
    RUNNING = "running"
    ANSWERED = "answered"
    IGNORED = "ignored"
    FAILED = "failed"


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    RETRY = "retry"
    SENT = "sent"
    DEAD = "dead"


@dataclass(frozen=True)
class Address:
    """One mailbox: `addr` is the lower-cased addr-spec, `name` the display name (may be empty)."""

    addr: str
    name: str = ""

    @property
    def domain(self) -> str:
        return self.addr.rpartition("@")[2]


@dataclass(frozen=True)
class Attachment:
    """A file a mail client would show. `filename` is already decoded and made safe."""

    filename: str
    content_type: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class SkippedFile:
    """A sender's attachment that was not passed on; `reason` is already human ("14 MB, over the ...")."""

    filename: str
    reason: str


@dataclass(frozen=True)
class InboundMail:
    """What mailgate needs from one parsed message (see `parsing.parse_message`)."""

    message_id: str | None  # "<id@host>", angle brackets kept; None when absent or unusable
    in_reply_to: tuple[str, ...]  # message ids, "<...>" form
    references: tuple[str, ...]  # oldest first, as in the header
    subject: str  # decoded, whitespace folded, no CR/LF
    from_: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    text: str  # the whole visible text body (HTML-only mail converted to text)
    reply_text: str  # `text` with quoted history, attributions and signatures trimmed
    attachments: tuple[Attachment, ...]
    # (filename, reason) of files a client would show that could not be decoded
    unreadable: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class UploadFile:
    """A file spooled to disk, ready to be streamed to the API as a multipart part."""

    filename: str
    content_type: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    url: str
    title: str | None = None


@dataclass(frozen=True)
class OutputFile:
    url: str
    filename: str | None
    media_type: str
    size: int | None = None


@dataclass(frozen=True)
class Turn:
    """One turn of a task as `GET /api/tasks/{id}` reports it (both API eras normalised)."""

    seq: int
    status: str
    input: str
    output_text: str
    files: tuple[OutputFile, ...] = ()


@dataclass(frozen=True)
class TaskSnapshot:
    """`GET /api/tasks/{id}`: the task and its turns, oldest first."""

    task_id: str
    worker_id: str | None
    status: str  # pending|running|completed|error|aborted
    url: str | None
    turns: tuple[Turn, ...]

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "error", "aborted")


@dataclass
class RunResult:
    """What one POST /api/tasks told us (the streamed events or the blocking worker-run object).

    Anything here is a hint; the final answer always comes from `TaskSnapshot`.
    """

    text: str = ""
    done: bool = False  # a done/finish marker, or a complete JSON body, was seen
    status: str | None = None
    url: str | None = None
    sources: list[Source] = field(default_factory=list)
    files: list[OutputFile] = field(default_factory=list)
    error: str | None = None
