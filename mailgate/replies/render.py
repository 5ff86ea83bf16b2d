"""Turn a worker's answer, or a notice, into a reply email. Pure: no network, no disk writes.

`Renderer.answer` and `Renderer.notice` return an `EmailMessage` (text/plain + text/html alternatives, in
multipart/mixed when files are attached) that serialises with `SMTP` (`email.policy.SMTP`, see below)
whatever the input.
Templates in `templates_dir` take precedence over the packaged ones, file by file.

- Header text (subject, names, filenames, reasons) has control characters (CR, LF, NUL, C1, U+2028/9)
  replaced by spaces, so no sender or worker text can add a header; non-ASCII is RFC 2047/2231 encoded.
- The subject gets one "Re: " after leading reply prefixes (Re, Aw, Sv, Antw, Réf, "Re[2]", ...) are
  removed. Forward prefixes stay, as in mail clients: a reply to "Fwd: x" is "Re: Fwd: x".
- Message ids are folded between ids and never encoded (an encoded id breaks threading); malformed ids
  are dropped. References ends with In-Reply-To and keeps the first id plus the last ten (< ~900 chars).
- Markdown goes through markdown-it-py (CommonMark, tables, strikethrough, bare http(s) URLs linked) and
  nh3: formatting tags only, no style/class/event attributes, links to http/https/mailto only with
  rel="noopener noreferrer". Images become links ("[Image: alt]"): opening a reply fetches nothing.
- A long answer is shown up to a limit (`inline_answer`): cut at a paragraph or line end, and the body
  says so; the whole answer then goes as an attachment (`wire.EncodedPart`, laid out here with a
  marker for `wire.flatten`) or is on the task page. Only the part shown is rendered as Markdown, so
  the cost of a reply does not grow with the answer.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy as email_policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
import nh3
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markupsafe import Markup

from mailgate.errors import ConfigError
from mailgate.models import (
    BUDGETS,
    HELD_DAYS,
    AttachedFile,
    LinkedFile,
    ReplyHeaders,
    SentFile,
    SkippedFile,
    Source,
    TurnAnswer,
    human_size,
)
from mailgate.replies import wire
from mailgate.replies.wire import EncodedPart, utf8_size

NOTICE_KINDS = (
    "empty_reply", "api_rejected", "wrong_worker", "task_not_found",
    "out_of_credits", "task_failed", "gave_up", "too_many_requests", "address_not_ready", "working",
    "held", "status", "archived", "help",
)  # fmt: skip
_TEMPLATES = [
    f"{name}.{ext}" for name in ("answer", *(f"notice_{k}" for k in NOTICE_KINDS)) for ext in ("txt", "html")
]


class _FoldOnce(BaseHeader):
    """A header field that folds once per kind of policy: a field of a reply is folded again for each
    layout tried and for the links-only version, and one made by `_Headers` for another reply too."""

    def fold(self, *, policy: Policy) -> str:
        key = (policy.max_line_length, policy.linesep, getattr(policy, "utf8", False))
        folds: dict[tuple[object, ...], str] = self.__dict__.setdefault("_folds", {})
        folded = folds.get(key)
        if folded is None:
            folded = folds[key] = super().fold(policy=policy)
        return folded


class _Headers(HeaderRegistry):
    """The email package's header registry, with the work it repeats for every reply done once (same
    classes, same fields, same bytes; about half the CPU time of an answer's reply, bench/
    turn_overhead.py):

    - each header's class is made once: the stock registry makes a new class (`type(...)`) for every
      field set or folded;
    - the MIME fields every reply has (`Content-Type: text/plain; charset="utf-8"`, `Content-Transfer-
      Encoding: 7bit`, `MIME-Version: 1.0`, ...) are parsed once and shared, and folded once (`_FoldOnce`);
      header objects are never changed after they are made (a new value is a new object). Fields with a
      boundary (random per message) and long values are made afresh, and both caches are bounded.
    """

    MAX_SHARED = 256

    def __init__(self) -> None:
        super().__init__(base_class=_FoldOnce)
        self._made: dict[str, type[BaseHeader]] = {}
        self._shared: dict[tuple[str, str], BaseHeader] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = super().__getitem__(name)
            if len(self._made) < self.MAX_SHARED:
                self._made[key] = made
        return made

    def __call__(self, name: str, value: Any) -> BaseHeader:
        key = (name, value)  # the name as given: the field is written with its spelling
        shared = self._shared.get(key) if isinstance(value, str) else None
        if shared is not None:
            return shared
        header = super().__call__(name, value)
        if (
            isinstance(value, str)
            and name.lower().startswith(("content-", "mime-"))
            and len(value) < 100
            and "boundary" not in value.lower()
            and len(self._shared) < self.MAX_SHARED
        ):
            self._shared[key] = header
        return header


_REGISTRY = _Headers()
POLICY = email_policy.default.clone(header_factory=_REGISTRY)  # what replies are built with
SMTP = email_policy.SMTP.clone(header_factory=_REGISTRY)  # what they are serialised with

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069]")  # "invoice\u202efdp.exe" shows as "invoiceexe.pdf"
_SPACES = re.compile(r"\s+")
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>")
_REPLY_PREFIX = re.compile(
    r"^(?:\s*(?:re|aw|sv|vs|antw|odp|ynt|ref|réf|rif|res|回复|回覆|答复)\s*(?:\[\d+\]|\(\d+\))?\s*[:：])+",
    re.IGNORECASE,
)
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
_MAX_SUBJECT = 250
_CHECKOUT = Path(__file__).resolve().parents[2] / "templates"  # running from a source checkout
_MAX_FILENAME = 180
_MAX_REFERENCES = 11  # the first id plus the last ten
_MAX_REFERENCES_CHARS = 900
WHOLE_ANSWER = "answer.md"  # the attachment that holds a long answer whole


def _unsurrogate(text: str) -> str:
    """Lone surrogates (from surrogateescape decoding) cannot be encoded: make them U+FFFD."""
    return text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text


def _header_text(text: str, limit: int = 500) -> str:
    """One line of header-safe text: controls become spaces, runs of whitespace fold, capped at `limit`."""
    text = _SPACES.sub(" ", _CONTROL.sub(" ", _unsurrogate(text))).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _filename(name: str) -> str:
    name = _header_text(_BIDI.sub("", name), 4000).replace("/", "_").replace("\\", "_") or "attachment"
    if len(name) > _MAX_FILENAME:
        _, dot, ext = name.rpartition(".")
        keep = f".{ext}" if dot and len(ext) <= 10 else ""
        name = name[: _MAX_FILENAME - len(keep) - 1] + "…" + keep
    return name


def reply_subject(subject: str) -> str:
    """The subject of a reply: one "Re: " before the original, whatever reply prefixes it had."""
    base = _header_text(_REPLY_PREFIX.sub("", _header_text(subject)), _MAX_SUBJECT)
    return f"Re: {base or '(no subject)'}"


def _address(addr_spec: str, name: str = "") -> Address:
    local, _, domain = _header_text(addr_spec).rpartition("@")
    if not domain.isascii():
        with contextlib.suppress(UnicodeError):  # an unencodable domain goes out as it is
            domain = domain.encode("idna").decode("ascii")
    return Address(display_name=_header_text(name), username=local, domain=domain)


class _IdHeader(str):
    """Message ids for a header, folded between ids and never encoded (an encoded id breaks threading)."""

    name: str

    @classmethod
    def make(cls, name: str, ids: Sequence[str]) -> _IdHeader:
        header = cls(" ".join(ids))
        header.name = name
        return header

    def fold(self, *, policy: Policy) -> str:
        limit = policy.max_line_length or 998
        lines = [f"{self.name}:"]
        for item in self.split():
            if len(lines[-1]) + 1 + len(item) > limit and lines[-1] != f"{self.name}:":
                lines.append("")
            lines[-1] += " " + item
        return policy.linesep.join(lines) + policy.linesep


def _msg_id(value: str | None) -> str | None:
    value = (value or "").strip()
    return value if _MSG_ID.fullmatch(value) else None


def _copy_headers(head: EmailMessage) -> EmailMessage:
    """A new message with the header fields of `head` (made by `_headers`), not parsed again: each
    layout `Renderer.answer_plan` tries, and the fallback, has the same fields (Date included)."""
    msg = EmailMessage(policy=POLICY)
    for name, value in head.raw_items():
        msg.set_raw(name, value)
    return msg


def _references(chain: Sequence[str], in_reply_to: str | None, own_id: str) -> list[str]:
    ids = list(dict.fromkeys(i for i in map(_msg_id, chain) if i and i != own_id))
    if in_reply_to:
        ids = [i for i in ids if i != in_reply_to] + [in_reply_to]
    if len(ids) > _MAX_REFERENCES:
        ids = ids[:1] + ids[1 - _MAX_REFERENCES :]
    while len(ids) > 2 and len(" ".join(ids)) > _MAX_REFERENCES_CHARS:
        del ids[1]
    return ids


def _headers(h: ReplyHeaders) -> EmailMessage:
    if (message_id := _msg_id(h.message_id)) is None:
        raise ValueError(f"not a usable Message-ID: {h.message_id!r}")
    msg = EmailMessage(policy=POLICY)
    msg["From"] = _address(h.from_addr, h.from_name)
    for name, addrs in (("To", h.to), ("Cc", h.cc)):
        if addrs:
            msg[name] = [_address(a) for a in addrs]
    msg["Reply-To"] = _address(h.reply_to)
    msg["Subject"] = reply_subject(h.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = _IdHeader.make("Message-ID", [message_id])
    if in_reply_to := _msg_id(h.in_reply_to):
        msg["In-Reply-To"] = _IdHeader.make("In-Reply-To", [in_reply_to])
    if references := _references(h.references, in_reply_to, message_id):
        msg["References"] = _IdHeader.make("References", references)
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg["X-Mailgate-Loop"] = _header_text(h.loop_header_value)
    return msg


_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)
_MONO = "font-family:Menlo,Consolas,'Courier New',monospace;font-size:13px"
_CELL_ATTRS = {"align", "colspan", "rowspan"}
_CELL = "border:1px solid #d0d7de;padding:4px 8px"
_TAGS = (
    "a abbr b blockquote br caption code dd del details div dl dt em h1 h2 h3 h4 h5 h6 hr i ins kbd li mark"
    " ol p pre s samp small span strike strong sub summary sup table tbody td tfoot th thead tr u ul"
)
_DROP = "script style iframe object embed form textarea select button noscript template svg math"
_CLEANER = nh3.Cleaner(
    tags=set(_TAGS.split()),
    clean_content_tags=set(_DROP.split()),
    attributes={"a": {"href", "title"}, "ol": {"start"}, "th": _CELL_ATTRS, "td": _CELL_ATTRS},
    url_schemes={"http", "https", "mailto"},
    url_relative="deny",
    link_rel="noopener noreferrer",
    strip_comments=True,
    set_tag_attribute_values={
        "table": {"style": "border-collapse:collapse;margin:8px 0"},
        "th": {"style": _CELL + ";background:#f6f8fa"},
        "td": {"style": _CELL},
        "pre": {"style": _MONO + ";background:#f6f8fa;padding:8px 12px;white-space:pre-wrap"},
        "code": {"style": _MONO},
        "blockquote": {"style": "margin:0 0 0 4px;padding-left:12px;border-left:3px solid #d0d7de"},
        **{f"h{n}": {"style": f"font-size:{22 - 2 * n}px;margin:16px 0 8px"} for n in (1, 2, 3)},
    },
)


def _trim_url(url: str) -> str:
    while (url and url[-1] in ".,;:!?'\"*_") or (url.endswith(")") and url.count("(") < url.count(")")):
        url = url[:-1]
    return url


def _link_tokens(href: str, text: str) -> list[Token]:
    return [
        Token("link_open", "a", 1, attrs={"href": href}),
        Token("text", "", 0, content=text),
        Token("link_close", "a", -1),
    ]


def _linkify(token: Token, state: StateCore) -> list[Token]:
    out: list[Token] = []
    text, pos = token.content, 0
    for match in _URL.finditer(text):
        url = _trim_url(match.group())
        href = state.md.normalizeLink(url)
        if urlsplit(url).netloc and state.md.validateLink(href):
            out.append(Token("text", "", 0, content=text[pos : match.start()]))
            out += _link_tokens(href, state.md.normalizeLinkText(url))
            pos = match.start() + len(url)
    return [*out, Token("text", "", 0, content=text[pos:])]


def _email_tokens(state: StateCore) -> None:
    """Link bare URLs (markdown-it's linkify needs another package), make images links, cell styles align."""
    for block in state.tokens:
        style = str(block.attrGet("style") or "")
        if block.type in ("th_open", "td_open") and style.startswith("text-align:"):
            block.attrs = {"align": style.removeprefix("text-align:")}
        children: list[Token] = []
        depth = 0
        for token in block.children or ():
            depth += {"link_open": 1, "link_close": -1}.get(token.type, 0)
            if token.type == "image":
                children += _link_tokens(
                    str(token.attrGet("src")), f"[Image: {token.content}]" if token.content else "[Image]"
                )
            elif token.type == "text" and depth == 0 and "://" in token.content:
                children += _linkify(token, state)
            else:
                children.append(token)
        if block.type == "inline":
            block.children = children


_MD = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_MD.core.ruler.push("mailgate_email", _email_tokens)


def markdown_to_html(markdown: str) -> str:
    """Render Markdown to a sanitised HTML fragment, safe to put in an email as it is."""
    return str(_CLEANER.clean(_MD.render(_tidy(markdown)))).strip()


def _tidy(text: str) -> str:
    """Normalise newlines, drop control characters and trailing spaces, collapse blank runs."""
    text = _TEXT_CONTROL.sub("", _unsurrogate(text).replace("\r\n", "\n").replace("\r", "\n"))
    lines = (line if line == "-- " else line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


@dataclass(frozen=True)
class InlineAnswer:
    """What a reply's body shows of an answer: `text` (tidied Markdown) and its sanitised `html`.
    `total`: bytes (UTF-8) of the whole answer; `cut`: the body shows only its beginning."""

    text: str
    html: str
    total: int
    cut: bool = False

    @property
    def shown(self) -> int:
        return utf8_size(self.text)


def inline_answer(markdown: str, limit: int | None = None) -> InlineAnswer:
    """The answer as the body shows it: whole, or its first `limit` bytes cut at the last paragraph
    end (or line end, or space) in their final quarter. Only what is shown is tidied and rendered."""
    total = utf8_size(markdown)
    if limit is None or total <= limit:
        text = _tidy(markdown)
        return InlineAnswer(text, markdown_to_html(text), total)
    head = markdown[:limit].encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
    for end in ("\n\n", "\n", " "):
        at = head.rfind(end)
        if at >= len(head) * 3 // 4:
            head = head[:at]
            break
    text = _tidy(head)
    return InlineAnswer(text, markdown_to_html(text), total, cut=True)


@dataclass
class AnswerPlan:
    """An answer's reply laid out under the size limit, for `wire.build`: `skeleton` (the message, each
    big part's payload its marker), the `parts` to splice in (with a file's bytes, still to encode, or
    None when the part is encoded already), and the links-only `fallback` when anything is attached."""

    skeleton: bytes
    parts: list[tuple[EncodedPart, bytes | None]]
    fallback: bytes | None


def _safe_url(url: str | None) -> str | None:
    """`url` if it is an absolute http(s) URL, else None (the templates then show it without a link)."""
    url = _header_text(url or "", 2000)
    parts = urlsplit(url)
    return url if parts.scheme.lower() in ("http", "https") and parts.netloc else None


class Renderer:
    """Renders replies from jinja2 templates; `templates_dir` files take precedence over packaged ones."""

    def __init__(self, templates_dir: Path | None = None) -> None:
        packaged = importlib.resources.files("mailgate").joinpath("templates").is_dir()  # from a wheel
        loaders: list[jinja2.BaseLoader] = [
            jinja2.PackageLoader("mailgate", "templates") if packaged else jinja2.FileSystemLoader(_CHECKOUT)
        ]
        if templates_dir is not None:
            loaders.insert(0, jinja2.FileSystemLoader(templates_dir))
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders), autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
            trim_blocks=True, lstrip_blocks=True,  # so {% if %} lines leave no blank lines in text parts
            # templates are read once per process: no stat() of every template file at every reply
            # (a few % of the runner's samples in bench/sustained_accept.py); a restart picks up edits
            auto_reload=False,
        )  # fmt: skip
        for name in _TEMPLATES:
            try:  # fail at start-up (exit 78), not after a task has run
                self._env.get_template(name)
            except jinja2.TemplateError as exc:
                raise ConfigError([f"MAILGATE_TEMPLATES_DIR: template {name}: {exc}"]) from exc

    def answer(
        self,
        headers: ReplyHeaders,
        *,
        answer_markdown: str | InlineAnswer,
        sources: Sequence[Source],
        task_url: str | None,
        attached: Sequence[AttachedFile | EncodedPart] = (),
        linked: Sequence[LinkedFile] = (),
        skipped: Sequence[SkippedFile] = (),
        note: str | None = None,
        whole_answer: str | None = None,
        budget: str | None = None,
        budget_asked: str | None = None,
        head: EmailMessage | None = None,
    ) -> EmailMessage:
        """The reply carrying a turn's answer, its sources, and files attached, linked or skipped.

        `answer_markdown`: the answer (shown whole) or an `inline_answer`; when that was cut,
        `whole_answer` names the attachment (among `attached`) that holds all of it, or is None when
        the whole answer is only on the task page. An `EncodedPart` is laid out with its marker as
        payload, for `wire.flatten`. `budget` (named in the footer) is the task's; `budget_asked` the
        one its address asked for when the task got less (the reply says so, and why). `head`: the
        header fields of `headers` made already (`_headers`), when several layouts of one reply are tried.
        """
        inline = (
            answer_markdown if isinstance(answer_markdown, InlineAnswer) else inline_answer(answer_markdown)
        )
        text = inline.text or "(The worker finished without writing an answer.)"
        cut = None
        if inline.cut:
            cut = {
                "total": human_size(inline.total),
                "shown": human_size(inline.shown),
                "attached": _filename(whole_answer) if whole_answer else None,
            }
        context = _context(headers, task_url, skipped, None, budget=budget, budget_asked=budget_asked) | {
            "answer_text": text,
            "answer_html": Markup(inline.html if inline.text else markdown_to_html(text)),  # noqa: S704 - sanitised by nh3
            "cut": cut,
            "sources": [_link(s.title or s.url, s.url) for s in sources if s.url.strip()],
            "linked": [
                _link(_filename(f.filename), f.url) | {"reason": _header_text(f.reason)} for f in linked
            ],
            "note": _header_text(note or "", 1000) or None,
        }
        msg = self._message(headers, "answer", context, head)
        for f in attached:
            maintype, _, subtype = _content_type(f.content_type).partition("/")
            if isinstance(f, AttachedFile):
                msg.add_attachment(f.data, maintype=maintype, subtype=subtype, filename=_filename(f.filename))
                continue
            msg.add_attachment(b"", maintype=maintype, subtype=subtype, filename=_filename(f.filename))
            *_, part = msg.iter_parts()
            if f.charset:
                part.set_param("charset", f.charset)
            part.replace_header("Content-Transfer-Encoding", f.cte)
            part.set_payload(f.marker)
        return msg

    def answer_plan(
        self,
        headers: ReplyHeaders,
        answer: TurnAnswer,
        *,
        attached: Sequence[AttachedFile],
        linked: Sequence[LinkedFile],
        skipped: Sequence[SkippedFile],
        note: str | None,
        eight_bit: bool,
        max_inline: int | None,
        limit: int,
        budget: str | None = None,
        budget_asked: str | None = None,
    ) -> AnswerPlan:
        """The answer's reply laid out to stay within `limit` bytes on the wire (`wire.build` makes its
        bytes), and its links-only version when anything is attached (`replies.compose` says why).

        The body shows at most `max_inline` bytes of the answer; when cut, the whole answer goes as
        `answer.md` (in the most compact encoding `eight_bit` allows) if it fits with the body alone,
        else the body points to the task page. Then the worker's files are attached smallest first
        while they fit (so the largest are the first to become links), measured on the laid-out
        message each time; the plan is the last layout that fitted. Files stay placeholders here: only
        those kept are encoded, by `wire.build`.
        """
        inline = inline_answer(answer.text, max_inline)
        head = _headers(headers)  # made once: every layout tried below, and the fallback, copy it
        whole = None
        if inline.cut:
            cte, chunks = wire.encode_text(answer.text, eight_bit=eight_bit)
            whole = EncodedPart(WHOLE_ANSWER, "text/markdown", cte, chunks, charset="utf-8")

        def layout(whole: EncodedPart | None, kept: Sequence[AttachedFile]) -> tuple[int, AnswerPlan]:
            """The message with `whole` and `kept` attached and the other files linked: (its size on
            the wire, its plan)."""
            placeholders = {id(f): EncodedPart(f.filename, f.content_type, "base64", []) for f in kept}
            files = [f for f in attached if id(f) in placeholders]  # in the worker's order
            left_out = [
                LinkedFile(
                    f.filename,
                    f.url,
                    f"{human_size(len(f.data))}, left out to keep this email under {human_size(limit)}",
                )
                for f in attached
                if id(f) not in placeholders
            ]
            parts: list[tuple[EncodedPart, bytes | None]] = [(whole, None)] if whole else []
            parts += [(placeholders[id(f)], f.data) for f in files]
            msg = self.answer(
                headers,
                answer_markdown=inline,
                sources=answer.sources,
                task_url=answer.task_url,
                attached=[part for part, _ in parts],
                linked=[*linked, *left_out],
                skipped=skipped,
                note=note,
                whole_answer=WHOLE_ANSWER if whole else None,
                budget=budget,
                budget_asked=budget_asked,
                head=head,
            )
            skeleton = msg.as_bytes(policy=SMTP)
            size = wire.wire_size(skeleton, [whole] if whole else []) + sum(
                wire.base64_size(len(f.data)) - len(placeholders[id(f)].marker) for f in files
            )
            return size, AnswerPlan(skeleton, parts, None)

        best: AnswerPlan | None = None  # the layout with no file attached, made when it is needed
        if whole is not None:
            size, best = layout(whole, [])
            if size > limit:  # the body points to the task page instead
                whole = None
                best = None
        kept: list[AttachedFile] = []
        for f in sorted(attached, key=lambda f: len(f.data)):
            size, trial = layout(whole, [*kept, f])
            if size <= limit:
                kept.append(f)
                best = trial
        if best is None:  # no file fitted (or there is none): the body alone
            _, best = layout(whole, [])
        if whole or kept:
            why = "not attached: the mail server refused an email this large"
            msg = self.answer(
                headers,
                answer_markdown=inline,
                sources=answer.sources,
                task_url=answer.task_url,
                linked=[*linked, *(LinkedFile(f.filename, f.url, why) for f in attached)],
                skipped=skipped,
                note=note,
                budget=budget,
                budget_asked=budget_asked,
                head=head,
            )
            best.fallback = msg.as_bytes(policy=SMTP)
        return best

    def notice(
        self,
        headers: ReplyHeaders,
        kind: str,
        *,
        reason: str | None = None,
        task_url: str | None = None,
        skipped: Sequence[SkippedFile] = (),
        sent: Sequence[SentFile] = (),
        budget: str | None = None,
        budget_asked: str | None = None,
        details: Sequence[tuple[str, str]] = (),
    ) -> EmailMessage:
        """A short message in the thread instead of an answer (or, for `working`, before it). For
        `task_failed`, `reason` is the status; `sent` are the files the worker received; `details`
        (label, value) the lines of `status`."""
        if kind not in NOTICE_KINDS:
            raise ValueError(f"unknown notice kind {kind!r}; expected one of {', '.join(NOTICE_KINDS)}")
        context = _context(headers, task_url, skipped, reason, budget=budget, budget_asked=budget_asked)
        context["sent"] = [{"filename": _filename(f.filename), "size": human_size(f.size)} for f in sent]
        context["details"] = [
            {"label": _header_text(label, 100), "value": _header_text(value, 500)} for label, value in details
        ]
        context["held_days"] = HELD_DAYS
        return self._message(headers, f"notice_{kind}", context)

    def _message(
        self, headers: ReplyHeaders, name: str, context: dict[str, Any], head: EmailMessage | None = None
    ) -> EmailMessage:
        text = self._env.get_template(f"{name}.txt").render(context)
        html = self._env.get_template(f"{name}.html").render(context)
        msg = _headers(headers) if head is None else _copy_headers(head)
        msg.set_content(_tidy(text) + "\n")
        msg.add_alternative(_unsurrogate(html), subtype="html")
        return msg


def _content_type(value: str) -> str:
    """A media type the email package can attach as base64 bytes; anything odd is octet-stream."""
    value = value.strip().lower().partition(";")[0].strip()
    usable = _CONTENT_TYPE.fullmatch(value) and not value.startswith(("multipart/", "message/"))
    return value if usable else "application/octet-stream"


def _link(label: str, url: str) -> dict[str, Any]:
    """`label` to show, `url` to write out in text, `href` only when the URL is a safe link."""
    label, url = _header_text(label, 300), _header_text(url, 2000)
    return {"label": label or url, "url": url, "href": _safe_url(url), "show_url": label not in ("", url)}


def _context(
    headers: ReplyHeaders,
    task_url: str | None,
    skipped: Sequence[SkippedFile],
    reason: str | None,
    *,
    budget: str | None = None,
    budget_asked: str | None = None,
) -> dict[str, Any]:
    """What every template gets (`budget`, `budget_asked`: only budget names, else None)."""
    return {
        "subject": _header_text(headers.subject, _MAX_SUBJECT) or "(no subject)",
        "task_url": _safe_url(task_url),
        "skipped": [{"filename": _filename(f.filename), "reason": _header_text(f.reason)} for f in skipped],
        "reason": _header_text(reason or "", 1000) or None,
        "budget": budget if budget in BUDGETS else None,
        "budget_asked": budget_asked if budget_asked in BUDGETS and budget in BUDGETS else None,
        "sent": [],
    }
