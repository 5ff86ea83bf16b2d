"""Plain data passed between mailgate's modules. No I/O, no behaviour beyond small helpers."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import idna

BUDGETS = ("low", "standard", "high", "unlimited")
HELD_DAYS = 7  # a `held` message neither approved nor denied this long is dropped


class InboundState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    SUBMITTING = "submitting"
    RUNNING = "running"
    ANSWERED = "answered"
    IGNORED = "ignored"
    FAILED = "failed"
    HELD = "held"  # from a sender not allowed (MAILGATE_UNKNOWN_SENDERS=hold): waits for `mailgate approve`


class OutboxState(enum.StrEnum):
    PENDING = "pending"
    RETRY = "retry"
    SENT = "sent"
    DEAD = "dead"
    BOUNCED = "bounced"  # sent, then a bounce came back to its VERP address


@dataclass(frozen=True)
class SmtpReply:
    """One SMTP/LMTP reply line for one recipient: `250 2.0.0 Ok: queued as ...`.

    `why` is the decision as a short fixed word (`accepted`, `unknown_worker`, `rate_limited`, ...: the
    `reason` label of `mailgate_smtp_replies` and of the log line); `note` says more for the log only
    (why a message was ignored). Neither is sent to the peer, nor compared.
    """

    code: int
    text: str
    why: str = field(default="", compare=False)
    note: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return self.code < 300


def ascii_domain(domain: str) -> str:
    """`domain` lower-cased, without a trailing dot, non-ASCII labels as IDNA A-labels
    (`mächine.example` -> `xn--mchine-bua.example`), so both spellings compare equal; as it is when
    it is no valid IDN. (Here, beside `Address`, because every stage compares domains.)"""
    domain = domain.strip().lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return str(idna.encode(domain, uts46=True).decode("ascii"))
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain


@dataclass(frozen=True)
class Address:
    """One mailbox: `addr` is the lower-cased addr-spec, `name` the display name (may be empty)."""

    addr: str
    name: str = ""

    @property
    def domain(self) -> str:
        return self.addr.rpartition("@")[2]


@dataclass(frozen=True)
class TaskRef:
    """What thread resolution needs to know of a task mailgate holds."""

    task_id: str
    alias: str
    owner: str
    archived: bool = False  # archived at the API: a reply in its thread starts a new task


class FileContent(Protocol):
    """A file's bytes kept where they are (a big base64 body of the raw message, `mail.bodies`) and
    decoded a chunk at a time when read, so the whole file never has to be in memory."""

    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    def chunks(self) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class Attachment:
    """A file a mail client would show. `filename` is already decoded and made safe. Its bytes are
    `content`: bytes, or a `FileContent` read a chunk at a time (`chunks`); `data` joins them."""

    filename: str
    content_type: str
    content: bytes | FileContent = field(repr=False, compare=False)
    inline_signature: bool = False  # a small inline image shown only in the sender's signature (a logo)
    # the same bytes compare equal however they are held
    size: int = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        content = self.content
        if isinstance(content, bytes):
            size, digest = len(content), hashlib.sha256(content).hexdigest()
        else:
            size, digest = content.size, content.sha256
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "sha256", digest)

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, a chunk at a time."""
        if isinstance(self.content, bytes):
            yield self.content
        else:
            yield from self.content.chunks()

    @property
    def data(self) -> bytes:
        """The whole file in memory (for small files and tests: the spool streams `chunks`)."""
        content = self.content
        return content if isinstance(content, bytes) else b"".join(content.chunks())


@dataclass(frozen=True)
class SkippedFile:
    """A sender's attachment that was not passed on; `reason` is already human ("14 MB, over the ...")."""

    filename: str
    reason: str


@dataclass(frozen=True)
class SentFile:
    """A sender's attachment that went to the worker with the turn."""

    filename: str
    size: int


@dataclass(frozen=True, kw_only=True)
class HeaderFacts:
    """What the stages after DATA need from a message's header: read once (`mail.headers.read_facts`)
    and kept on the message's row, so no later stage parses the header block again."""

    message_id: str | None  # "<id@host>", angle brackets kept; None when absent or unusable
    in_reply_to: tuple[str, ...]  # message ids, "<...>" form
    references: tuple[str, ...]  # oldest first, as in the header
    subject: str  # decoded, whitespace folded, no CR/LF, capped
    from_: Address | None  # the first From mailbox (its display name goes into the turn input)
    to: tuple[Address, ...]
    cc: tuple[Address, ...]


@dataclass(frozen=True)
class HeaderSignals:
    """What admission's decisions read of a message's header block, as plain values: read once
    (`mail.headers.read_signals`), so `admission.policy` and `admission.authn` never read the header
    themselves."""

    fields: Mapping[str, list[str]]  # lower-cased name -> raw values, top to bottom (`Headers.index`)
    from_text: str  # the From values joined by spaces, at most `mail.headers.MAX_TEXT` characters
    subject: str  # the Subject decoded (`Headers.text`)
    from_addresses: tuple[str, ...] | None  # the From addr-specs, lower-cased; None: one is unusable
    trace: tuple[tuple[str, str], ...]  # (lower-cased name, raw value) of each Received and
    # Authentication-Results field, top to bottom


@dataclass(frozen=True, kw_only=True)
class MailBody:
    """What a mail client would show of one message (see `mail.parse.parse_body`)."""

    text: str  # the whole visible text body (HTML-only mail converted to text)
    reply_text: str  # `text` with quoted history, attributions and signatures trimmed
    attachments: tuple[Attachment, ...]
    # (filename, reason) of files a client would show that could not be decoded
    unreadable: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class InboundMail(HeaderFacts, MailBody):
    """One whole parsed message, its header facts and its body side by side (`mail.parse.parse_message`)."""


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
    credits: float | None = None  # the task's totals, when the API says
    duration_ms: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "error", "aborted")


@dataclass(frozen=True)
class AttachedFile:
    """An output file of the worker's, downloaded, to attach to the reply (`url`: where it came from,
    for a link when it does not fit)."""

    filename: str
    content_type: str
    data: bytes
    url: str = ""


@dataclass(frozen=True)
class LinkedFile:
    """An output file that is linked instead of attached, with why ("12 MB, over the 10 MB limit")."""

    filename: str
    url: str
    reason: str


@dataclass(frozen=True)
class ReplyHeaders:
    """Who a reply goes to and how it threads. `subject` is the original; `reply_subject` makes "Re: ".
    `outbox_id` and `return_path` (the envelope sender, which names that row) are the outbox row's."""

    from_addr: str
    from_name: str
    to: Sequence[str]
    cc: Sequence[str]
    reply_to: str
    subject: str
    message_id: str
    in_reply_to: str | None
    references: Sequence[str]
    loop_header_value: str
    outbox_id: str = ""
    return_path: str = ""


@dataclass(frozen=True)
class TurnAnswer:
    """How a turn ended well: the worker's final answer and what came with it, for the reply."""

    text: str
    sources: tuple[Source, ...] = ()
    files: tuple[OutputFile, ...] = ()
    task_url: str | None = None


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


def human_size(size: int) -> str:
    """`14 MB`, `512 KB`, `37 bytes`: sizes as a person reads them (binary units, as the limits are)."""
    if size >= 1024 * 1024:
        value = size / (1024 * 1024)
        return f"{value:.0f} MB" if value >= 10 else f"{value:.1f} MB"
    if size >= 1024:
        return f"{size // 1024} KB"
    return f"{size} bytes"
