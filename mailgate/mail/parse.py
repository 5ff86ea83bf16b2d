"""Raw RFC 5322 bytes -> the text and files a mail client would show. Pure: no I/O, never raises.

Mail as it really arrives is broken in every way the corpus shows (missing boundaries, CR-only line
endings, an mbox "From " first line, unknown charsets, raw 8-bit headers, bad base64). Every step here
degrades: undecodable text is replaced, unparsable parts are read leniently or skipped, and a file that
cannot be decoded is listed in `MailBody.unreadable` instead of failing the message.

`parse_body` reads the MIME tree only (the header fields were read once at DATA, see `mail.headers`);
`parse_message` adds the header facts, for tools and tests that start from raw bytes.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from dataclasses import replace
from email import errors as email_errors
from email import policy
from email.feedparser import BytesFeedParser
from email.header import decode_header, make_header
from email.message import Message
from email.utils import collapse_rfc2231_value

from inscriptis import get_text
from inscriptis.model.config import ParserConfig

from mailgate.mail.bodies import LargeBodies
from mailgate.mail.headers import BIDI, CONTROL, Headers, fix_surrogates, guess_decode, read_facts
from mailgate.mail.html_quotes import split_html_reply
from mailgate.mail.signatures import SignatureRefs, content_id, signature_references
from mailgate.mail.trimming import trim_reply
from mailgate.models import Attachment, FileContent, InboundMail, MailBody

__all__ = ["html_to_text", "parse_body", "parse_message"]

_HTML_CONFIG = ParserConfig(display_links=True)
_MAX_FILENAME_BYTES = 150
_SURROGATES = re.compile("[\ud800-\udfff]")
_FEED_CHUNK = 1 << 20

_EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/json": ".json",
    "application/msword": ".doc",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ".pptx",
    "application/ms-tnef": ".dat",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
    "message/rfc822": ".eml",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/csv": ".csv",
    "text/calendar": ".ics",
    "audio/mpeg": ".mp3",
    "video/mp4": ".mp4",
}
_SKIPPED_TYPES = {"application/pgp-signature", "application/pkcs7-signature", "application/x-pkcs7-signature"}
_PARAM_HEADERS = ("content-type", "content-disposition")
# an inline image at most this big, shown only in the sender's signature, is the signature's logo
SIGNATURE_IMAGE_MAX = 64 * 1024
_BROKEN_PAYLOAD = (email_errors.InvalidBase64LengthDefect,)


def html_to_text(html: str) -> str:
    """Readable text for an HTML body; links are kept as "[text](url)"."""
    try:
        text = get_text(html, _HTML_CONFIG)
    except Exception:  # inscriptis/lxml on hostile markup: fall back to stripping tags
        text = re.sub(r"<[^>]*>", " ", html)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def parse_body(raw: bytes) -> MailBody:
    """The visible text (and its new part, quotes trimmed) and the files of one message."""
    bodies = LargeBodies(raw)  # big base64 bodies stay in `raw`: the parser reads a small skeleton
    walker = _Walker(bodies)
    # the MIME tree with compat32: several times faster than policy.default on deep or wide trees, and
    # its lazy header handling never raises on garbage
    walker.walk(_parse_tree(bodies.skeleton))
    text = "\n\n".join(t for t in walker.texts if t.strip())
    return MailBody(
        text=text,
        reply_text=_reply_text(walker, text),
        attachments=tuple(_mark_signature_images(walker)),
        unreadable=tuple(walker.unreadable),
    )


def _mark_signature_images(walker: _Walker) -> list[Attachment]:
    """The files, with the small inline images the HTML shows only in a signature marked as such."""
    files = walker.files
    for index, cid in walker.cids.items():
        att = files[index]
        if (
            walker.refs.only_in_signature(cid)
            and att.content_type.startswith("image/")
            and att.size <= SIGNATURE_IMAGE_MAX
        ):
            files[index] = replace(att, inline_signature=True)
    return files


def parse_message(raw: bytes) -> InboundMail:
    """The header facts and the body of one message; never raises on malformed mail."""
    return InboundMail(**vars(read_facts(Headers.parse(raw))), **vars(parse_body(raw)))


def _reply_text(walker: _Walker, text: str) -> str:
    """The sender's own text: from the HTML body's quote markup when it has some, else by the text rules."""
    if walker.html_split is not None:
        index, new = walker.html_split
        head = "\n\n".join(t for t in [*walker.texts[:index], new] if t.strip())
        if head.strip():
            return trim_reply(head)  # the text rules still drop signatures and footers
    return trim_reply(text)


def _parse_tree(raw: bytes) -> Message:
    """The MIME tree, fed in slices so the whole message never exists a second time as one str."""
    parser = BytesFeedParser(policy=policy.compat32)
    view = memoryview(raw)
    for start in range(0, len(raw), _FEED_CHUNK):
        parser.feed(bytes(view[start : start + _FEED_CHUNK]))
    return parser.close()


def _decode_text(data: bytes, charset: str | None) -> str:
    name = (charset or "").strip().strip("\"'").lower()
    try:
        codec = codecs.lookup(name).name if name else "ascii"
    except LookupError:
        codec = ""
    if codec in ("", "ascii"):  # absent, unknown or "us-ascii" with 8-bit content: guess
        return guess_decode(data)
    try:
        return data.decode(codec, "replace")
    except Exception:  # some codecs raise on error handlers they do not support
        return data.decode("utf-8", "replace")


def _safe_filename(name: str, content_type: str, index: int) -> str:
    """A file name safe to store and to show. `name` comes decoded (`_filename` turns raw 8-bit bytes
    into text, TNEF and `Headers.text` decode theirs); a lone surrogate left in it anyway becomes U+FFFD."""
    name = unicodedata.normalize("NFC", _SURROGATES.sub("\ufffd", name))
    name = BIDI.sub("", CONTROL.sub("", name)).replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r'[<>:"|?*]', "_", name).strip().lstrip(".").rstrip(". ").strip()
    if not name:
        return f"attachment-{index}{_EXTENSIONS.get(content_type, '.bin')}"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = _MAX_FILENAME_BYTES - len(suffix.encode())
    stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip()
    return f"{stem}{suffix}"


def _filename(part: Message) -> str:
    """The decoded file name of a part (RFC 2231, RFC 2047, or raw 8-bit bytes), or ""."""
    source: Message = part
    raw = {k.lower(): str(v) for k, v in part.raw_items() if k.lower() in _PARAM_HEADERS}
    if any("\udc80" <= ch <= "\udcff" for value in raw.values() for ch in value):
        source = Message()  # compat32 turns raw 8-bit bytes into U+FFFD: re-read them decoded
        for key, value in raw.items():
            source[key] = fix_surrogates(value)
    try:
        name = source.get_filename()
        if not name:
            param = source.get_param("name")
            name = None if param is None else str(collapse_rfc2231_value(param))
        if name and "=?" in name:  # RFC 2047 words where RFC 2231 belongs (Outlook, Gmail)
            name = str(make_header(decode_header(name)))
    except Exception:
        name = None
    return name or ""


class _Walker:
    """Collects body text and files from a message tree, in message order."""

    def __init__(self, bodies: LargeBodies) -> None:
        self.bodies = bodies
        self.texts: list[str] = []
        self.files: list[Attachment] = []
        self.unreadable: list[tuple[str, str]] = []
        # the first HTML body whose client markup shows a quote: (its index in `texts`, its own text)
        self.html_split: tuple[int, str] | None = None
        self.cids: dict[int, str] = {}  # index in `files` -> the Content-ID of an inline image
        self.refs = SignatureRefs()  # where the HTML bodies show their `cid:` images
        self._seen: set[str] = set()

    def walk(self, part: Message, *, want_text: bool = True, depth: int = 0) -> None:
        if depth > 50:  # absurd nesting: stop rather than recurse forever
            return
        ctype = part.get_content_type()
        if part.is_multipart() and ctype != "message/rfc822":
            self._multipart(part, ctype, want_text=want_text, depth=depth)
            return
        disposition = (part.get_content_disposition() or "").lower()
        filename = _filename(part)
        body_part = disposition != "attachment" and (not filename or disposition == "inline")
        if ctype in ("text/plain", "text/html") and body_part:
            if want_text:
                self._text(part, ctype)
            elif ctype == "text/html":  # the alternative not shown still says where its images stand
                self._html_refs(part)
            return
        if ctype == "message/rfc822":
            self._message(part, filename)
        elif ctype in _SKIPPED_TYPES:
            return
        elif disposition == "attachment" or filename or ctype in ("text/calendar", "application/ms-tnef"):
            self._file(part, ctype, filename)
        elif want_text and part.get_content_maintype() not in ("text", "multipart", "message"):
            # a file shown in the message flow (not a resource of an HTML body): name it after its location
            location = str(part.get("content-location") or "").rsplit("/", 1)[-1]
            self._file(part, ctype, location)

    def _multipart(self, part: Message, ctype: str, *, want_text: bool, depth: int) -> None:
        payload = part.get_payload()
        children = [c for c in payload if isinstance(c, Message)] if isinstance(payload, list) else []
        if ctype == "multipart/alternative" and want_text:
            best = _best_alternative(children)
            for child in children:
                self.walk(child, want_text=child is best, depth=depth + 1)
            return
        for index, child in enumerate(children):
            # multipart/related: only the root carries the text; the rest are resources (inline images)
            text_here = want_text and (ctype != "multipart/related" or index == 0)
            self.walk(child, want_text=text_here, depth=depth + 1)

    def _decoded(self, part: Message) -> bytes | None:
        """The part's decoded body; None when it cannot be decoded."""
        index = self._run(part)
        if index is not None:
            return self.bodies.decode(index)
        return self._payload(part)

    def _content(self, part: Message) -> bytes | FileContent | None:
        """The decoded body of a file part: a big base64 body stays in the raw message, decoded a chunk
        at a time whenever it is read; None when it cannot be decoded."""
        index = self._run(part)
        if index is not None:
            return self.bodies.content(index)
        return self._payload(part)

    def _run(self, part: Message) -> int | None:
        """The big base64 run (`mail.bodies`) that is the whole body of `part`, if it is one."""
        index = self.bodies.index(part)
        if index is not None and str(part.get("content-transfer-encoding", "")).strip().lower() == "base64":
            return index
        return None

    def _payload(self, part: Message) -> bytes | None:
        self.bodies.restore(part)
        try:
            data = part.get_payload(decode=True)
        except Exception:
            return None
        return data if isinstance(data, bytes) else None

    def _text(self, part: Message, ctype: str) -> None:
        data = self._decoded(part)
        if data is None:
            return
        text = _decode_text(data, part.get_content_charset())
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if ctype == "text/html":
            self.refs.update(signature_references(text))
        if ctype == "text/html" and self.html_split is None:
            own = split_html_reply(text)
            if own is not None:
                self.html_split = (len(self.texts), html_to_text(own))
        self.texts.append(html_to_text(text) if ctype == "text/html" else text.strip("\n"))

    def _html_refs(self, part: Message) -> None:
        data = self._decoded(part)
        if data is not None and b"cid:" in data.lower():
            self.refs.update(signature_references(_decode_text(data, part.get_content_charset())))

    def _message(self, part: Message, filename: str) -> None:
        inner = part.get_payload()
        inner_msg = inner[0] if isinstance(inner, list) and inner else inner
        if not isinstance(inner_msg, Message):
            self._file(part, "message/rfc822", filename)
            return
        subject = Headers.from_message(inner_msg).text("subject")
        name = filename or f"{subject or 'message'}.eml"
        self.bodies.restore(inner_msg)
        try:
            data = inner_msg.as_bytes()
        except Exception:
            index = len(self.files) + 1
            self.unreadable.append((_safe_filename(name, "message/rfc822", index), "cannot be re-encoded"))
            return
        if data.strip():
            self._add(name, "message/rfc822", data)

    def _file(self, part: Message, ctype: str, filename: str) -> None:
        index = len(self.files) + 1
        data = self._content(part)
        if data is None or any(isinstance(d, _BROKEN_PAYLOAD) for d in part.defects):
            self.unreadable.append((_safe_filename(filename, ctype, index), "the encoded content is broken"))
            return
        is_tnef = ctype == "application/ms-tnef" or filename.lower() == "winmail.dat"
        if is_tnef:
            data = data if isinstance(data, bytes) else b"".join(data.chunks())
            if self._tnef(data):
                return
        added = self._add(filename, ctype, data)
        cid = content_id(str(part.get("content-id") or ""))
        if added is not None and cid and disposition_of(part) != "attachment":
            self.cids[added] = cid

    def _tnef(self, data: bytes) -> bool:
        """Unpack an Outlook winmail.dat; False (keep the file itself) when it cannot be decoded."""
        try:
            from tnefparse import TNEF

            tnef = TNEF(data, do_checksum=False)
            files = [(str(a.long_filename() or a.name), bytes(a.data)) for a in tnef.attachments]
            body = tnef.body
        except Exception:
            return False
        if not files and not body:
            return False
        if body and not any(t.strip() for t in self.texts):
            self.texts.append(_decode_text(body, None) if isinstance(body, bytes) else str(body))
        for name, content in files:
            self._add(name, "application/octet-stream", content)
        return True

    def _add(self, filename: str, ctype: str, data: bytes | FileContent) -> int | None:
        """Add a file (not an empty one, nor one seen already); its index in `files`, or None."""
        index = len(self.files) + 1
        att = Attachment(_safe_filename(filename, ctype, index), ctype.lower(), data)
        if not att.size or att.sha256 in self._seen:
            return None
        self._seen.add(att.sha256)
        self.files.append(att)
        return index - 1


def disposition_of(part: Message) -> str:
    """The part's Content-Disposition (lower case), or ""."""
    try:
        return (part.get_content_disposition() or "").lower()
    except Exception:  # a garbled header
        return ""


def _best_alternative(children: list[Message]) -> Message | None:
    """The part a text client shows: text/plain first, then anything holding HTML."""
    for wanted in ("text/plain", "multipart/related", "text/html", "multipart/mixed"):
        for child in children:
            if child.get_content_type() == wanted and (child.get_content_disposition() != "attachment"):
                return child
    return children[0] if children else None
