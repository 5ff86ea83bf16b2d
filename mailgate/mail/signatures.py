"""Which inline images an HTML body shows only in the sender's signature. Pure: no I/O, never raises.

Mail clients put the logo of a signature in the message as an inline image (a `multipart/related` part
with a Content-ID, shown by `<img src="cid:...">`), and send it again with every reply. It is not
something the sender means to hand the worker, and counted as a file it would crowd real attachments out
of the API's 5-file limit. `signature_references` reads an HTML body once and tells, for every `cid:`
image, whether it stands in a signature or elsewhere:

- inside an element marked as a signature by its client: a class or id holding "signature" (Gmail's
  `gmail_signature`, Thunderbird's `moz-signature`, Outlook's `#Signature`, Apple's
  `#AppleMailSignature`, Yahoo's `signature`, ...) or Gmail's `data-smartmail="gmail_signature"`;
- after a signature separator line ("-- ", RFC 3676), up to the next quote (a `<blockquote>`, or an
  element whose class or id holds "quote", or Outlook's reply header `#divRplyFwdMsg`/`#appendonsend`).

An image referenced both in and outside a signature counts as elsewhere (the sender also showed it in
their text). Work is bounded: nothing is parsed unless the body names a `cid:`, the first
`MAX_HTML_CHARS` characters are read, and the walk stops after `MAX_ELEMENTS` elements.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

import lxml.html
from lxml import etree

__all__ = ["SignatureRefs", "content_id", "signature_references"]

MAX_HTML_CHARS = 2_000_000
MAX_ELEMENTS = 20_000
_SIGNATURE = re.compile(r"signature", re.IGNORECASE)
_QUOTE = re.compile(r"quote|divrplyfwdmsg|appendonsend", re.IGNORECASE)
_SEPARATOR = re.compile(r"(?m)^[ \t\u00a0]*--[ \t\u00a0]*$")


@dataclass
class SignatureRefs:
    """The Content-IDs (see `content_id`) an HTML body shows in a signature, and those it shows elsewhere."""

    in_signature: set[str] = field(default_factory=set)
    elsewhere: set[str] = field(default_factory=set)

    def only_in_signature(self, cid: str) -> bool:
        return cid in self.in_signature and cid not in self.elsewhere

    def update(self, other: SignatureRefs) -> None:
        self.in_signature |= other.in_signature
        self.elsewhere |= other.elsewhere


def content_id(value: str) -> str:
    """A Content-ID header value or a `cid:` URL, in the one form both compare in: no `cid:`, no angle
    brackets, percent-decoding undone (RFC 2392), lower case."""
    value = value.strip()
    if value[:4].lower() == "cid:":
        value = unquote(value[4:])
    return value.strip().strip("<>").strip().lower()


def signature_references(html: str) -> SignatureRefs:
    """Where each `cid:` image of `html` is shown: in a signature, or elsewhere (see the module docstring)."""
    refs = SignatureRefs()
    html = html[:MAX_HTML_CHARS]
    if "cid:" not in html.lower():
        return refs
    try:
        parser = lxml.html.HTMLParser(encoding="utf-8")
        root = lxml.html.document_fromstring(html.encode("utf-8", "replace"), parser=parser)
        _walk(root, refs)
    except (etree.LxmlError, ValueError, RecursionError):
        return SignatureRefs()
    return refs


def _walk(root: etree._Element, refs: SignatureRefs) -> None:
    marked = 0  # open elements that mark a signature
    quoted = 0  # open elements that mark a quote
    after_separator = False  # a "-- " line was seen, and no quote began since
    seen = 0
    for event, element in etree.iterwalk(root, events=("start", "end")):
        if not isinstance(element.tag, str):
            continue
        if event == "start":
            seen += 1
            if seen > MAX_ELEMENTS:
                return
            signature, quote = _marks(element)
            marked += signature
            quoted += quote
            if quote:
                after_separator = False
            if element.tag == "img":
                cid = str(element.get("src") or "")
                if cid[:4].lower() == "cid:":
                    in_signature = (marked > 0 or after_separator) and quoted == 0
                    (refs.in_signature if in_signature else refs.elsewhere).add(content_id(cid))
            if element.text and quoted == 0 and _SEPARATOR.search(element.text):
                after_separator = True
        else:
            signature, quote = _marks(element)
            marked -= signature
            quoted -= quote
            if element.tail and quoted == 0 and _SEPARATOR.search(element.tail):
                after_separator = True


def _marks(element: etree._Element) -> tuple[int, int]:
    """(1 if `element` marks a signature, 1 if it marks a quote)."""
    names = f"{element.get('class') or ''} {element.get('id') or ''}"
    signature = bool(_SIGNATURE.search(names)) or (element.get("data-smartmail") or "") == "gmail_signature"
    quote = element.tag == "blockquote" or bool(_QUOTE.search(names))
    return int(signature), int(quote and not signature)
