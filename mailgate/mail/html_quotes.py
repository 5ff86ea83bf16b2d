"""Find a reply's quoted history from the HTML its mail client wrote. Pure: no I/O, never raises.

Clients mark what they quote, and that markup says more than any text rule can:

- Gmail: `div.gmail_quote` (its attribution `div.gmail_attr`, the quote `blockquote.gmail_quote`);
- Apple Mail, iOS Mail, Thunderbird, Roundcube, Fastmail: `blockquote type="cite"`; Thunderbird's
  `div.moz-cite-prefix` and `div.moz-forward-container`; Apple's `div.AppleOriginalContents`;
- Outlook (web, desktop, Mac) and Hotmail: `#divRplyFwdMsg` (and the `<hr>` before it), `#appendonsend`,
  `#mail-editor-reference-message-container`, `#OLK_SRC_BODY_SECTION`, the header block's top-border
  `div` (`border-top:solid #E1E1E1 1.0pt`, or `#B5C4DF`), `hr#stopSpelling`;
- Yahoo: `div.yahoo_quoted` (also `ydp…yahoo_quoted`), `blockquote.iosymail`;
- Yandex: a plain `<blockquote>` after a `26.08.2021, 19:40, "Name" <addr>:` line;
- mail.ru / my.com: a `<blockquote>` holding `div.js-readmsg-msg` / `#style_…_BODY`, its attribution
  first inside it;
- ProtonMail, Tutanota, Zoho, Zimbra, GMX: `.protonmail_quote`, `.tutanota_quote`, `.zmail_extra*`,
  `hr#zwchr` / `data-marker="__DIVIDER__"` / `"__QUOTED_TEXT__"`, `[name="quote"]`.

A plain `<blockquote>` with no client mark is a quote only when an attribution (see
`trimming.is_attribution`) stands right before it or opens it: senders indent their own text with
blockquotes too.

`split_html_reply` finds the first quote in document order. When nothing the sender wrote follows it (the
usual top-posted reply), it returns the HTML before it, with the attribution line above it dropped too.
When the sender wrote below or between quotes (bottom-posting, inline answers), it returns the whole
body with each quote turned into "> " lines and everything from a to-the-end marker (Outlook's header
block, a forward) on removed, so the text rules keep the quoted lines each answer refers to. No quote
found: None, and the caller falls back to the text rules.

Work is bounded: the first `MAX_HTML_CHARS` characters are read, a cheap substring test skips parsing when
no marker can be present, and the tree is walked once, iteratively (no recursion on deep nesting).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import lxml.html
from lxml import etree

from mailgate.mail.trimming import is_attribution, is_banner

__all__ = ["MAX_HTML_CHARS", "split_html_reply"]

MAX_HTML_CHARS = 2_000_000

_QUOTE, _TO_END, _ATTR, _GMAIL, _PLAIN = "quote", "to-end", "attr", "gmail", "plain"
_MAYBE_QUOTED = re.compile(
    r"blockquote|gmail_quote|divrplyfwdmsg|appendonsend|reference-message-container|olk_src_body_section"
    r"|border-top:\s*solid\s*#(?:e1e1e1|b5c4df)|border-top-color:\s*rgb\(229|stopspelling|yahoo_quoted"
    r"|moz-cite-prefix|moz-forward-container|protonmail_quote|tutanota_quote|appleoriginalcontents|zwchr"
    r"|__divider__|__quoted_text__|zmail_extra|js-readmsg-msg|_body\b|name=.?quote|isreplycontent"
    r"|isforwardcontent|origbody|reply139content|orimsghtmlseperator",
)
_QUOTE_CLASSES = frozenset(
    ("protonmail_quote", "tutanota_quote", "appleoriginalcontents", "iosymail", "skiff_quote", "gmail_quote")
)
_TO_END_IDS = frozenset(
    (
        "divrplyfwdmsg",
        "appendonsend",
        "mail-editor-reference-message-container",
        "olk_src_body_section",
        "isforwardcontent",
        "isreplycontent",
        "origbody",
        "reply139content",
        "orimsghtmlseperator",
        "stopspelling",
        "zwchr",
        "replysplit",
    )
)
_OUTLOOK_RULE = re.compile(
    r"border-top:solid#(?:e1e1e1|b5c4df)1(?:\.0)?pt|border-top-color:rgb\(229,229,229\)", re.IGNORECASE
)
_MAILRU_BODY = re.compile(r"(?:^|_)\d{6,}_body$")
_BLOCKS = frozenset(
    (
        *("address", "article", "aside", "blockquote", "body", "center", "dd", "details", "div", "dl", "dt"),
        *("fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header"),
        *("hr", "html", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "td"),
        *("tfoot", "th", "thead", "tr", "ul"),
    )
)
_SKIPPED = frozenset(("head", "script", "style", "title", "template", "noscript"))
_MAX_PLAIN_CHECKS = 200  # plain blockquotes whose surroundings are read for an attribution
_MAX_ELEMENTS = 5_000  # elements walked, quotes' insides excluded; more: the text rules decide


@dataclass
class _Line:
    """One visual line of text: where it starts and ends in the walk, and the text nodes it is made of."""

    start: int
    end: int = 0
    parts: list[str] = field(default_factory=list)
    pieces: list[tuple[Any, str]] = field(default_factory=list)  # (element, "text" | "tail")
    inner: list[Any] = field(default_factory=list)  # inline elements that open and close on this line

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


@dataclass
class _Mark:
    """An element that marks quoted material, and the span of walk positions it covers."""

    kind: str
    element: Any
    start: int
    end: int = -1


class _TooBig(Exception):
    """The markup has more elements than `_MAX_ELEMENTS`: leave it to the text rules."""


class _Walk:
    """One pass over a tree: its visual lines and the quote marks, in document order.

    The walk skips what is inside a client-marked quote (only its extent matters), stops at a to-the-end
    mark (all that follows is quoted), and gives up (`_TooBig`) after `budget` elements.
    """

    def __init__(self, root: Any, *, budget: int, main: bool = True) -> None:
        self.lines: list[_Line] = []
        self.marks: list[_Mark] = []
        self.visited = 0
        self._line = _Line(0)
        self._open: dict[Any, _Mark] = {}
        self._inline: dict[Any, int] = {}  # open inline element -> index of the line it opened on
        pos = 0
        walker = etree.iterwalk(root, events=("start", "end", "comment", "pi"))
        for event, element in walker:
            pos += 1
            tag = element.tag if isinstance(element.tag, str) else ""
            if event in ("comment", "pi"):
                self._add(element, "tail", pos)
            elif event == "start":
                self.visited += 1
                if self.visited > budget:
                    raise _TooBig
                if tag in _SKIPPED:
                    walker.skip_subtree()
                    continue
                mark = self._start(element, tag, pos, record=main)
                if mark is not None and mark.kind == _QUOTE:
                    walker.skip_subtree()  # what a quote holds does not matter here, only where it ends
                elif mark is not None and mark.kind == _TO_END:
                    break
            else:
                self._end(element, tag, pos, tail=element is not root)
        self._break(pos + 1)
        self.size = pos + 1

    def _start(self, element: Any, tag: str, pos: int, *, record: bool) -> _Mark | None:
        kind = _kind(element, tag) if record else ""
        mark = None
        if kind:
            mark = _Mark(kind, element, pos)
            self.marks.append(mark)
            self._open[element] = mark
        elif record and (tag == "div" or tag == "span"):
            self._mailru(element)
        if tag in _BLOCKS or tag == "br":
            self._break(pos)
        else:
            self._inline[element] = len(self.lines)
        self._add(element, "text", pos)
        return mark

    def _end(self, element: Any, tag: str, pos: int, *, tail: bool = True) -> None:
        if tag in _BLOCKS:
            self._break(pos)
        elif self._inline.pop(element, -1) == len(self.lines):
            self._line.inner.append(element)
        mark = self._open.pop(element, None)
        if mark is not None:
            mark.end = pos
        if tail:
            self._add(element, "tail", pos)

    def _mailru(self, element: Any) -> None:
        """mail.ru's message body inside a quote: its enclosing blockquote is quoted material."""
        classes = (element.get("class") or "").lower().split()
        ident = (element.get("id") or "").lower()
        if "js-readmsg-msg" not in classes and not _MAILRU_BODY.search(ident):
            return
        parent, depth = element.getparent(), 0
        while parent is not None and depth < 30:
            mark = self._open.get(parent)
            if mark is not None and mark.kind == _PLAIN:
                mark.kind = _QUOTE
                return
            parent, depth = parent.getparent(), depth + 1

    def _add(self, element: Any, which: str, pos: int) -> None:
        value = element.text if which == "text" else element.tail
        if value:
            self._line.parts.append(value)
            self._line.pieces.append((element, which))
            self._line.end = pos

    def _break(self, pos: int) -> None:
        if self._line.parts:
            self.lines.append(self._line)
        self._line = _Line(pos)


def _kind(element: Any, tag: str) -> str:
    """What quote mark `element` is, if any ("" for none)."""
    classes = (element.get("class") or "").lower().split()
    ident = (element.get("id") or "").lower()
    if tag == "blockquote":
        if (element.get("type") or "").lower() == "cite" or _QUOTE_CLASSES.intersection(classes):
            return _QUOTE
        return _PLAIN
    if "gmail_quote" in classes:
        return _GMAIL
    if "gmail_attr" in classes or "moz-cite-prefix" in classes:
        return _ATTR
    if any(c.endswith("yahoo_quoted") for c in classes) or "yahoo_quoted" in ident:
        return _QUOTE
    if _QUOTE_CLASSES.intersection(classes) or (element.get("name") or "").lower() == "quote":
        return _QUOTE
    if ident in _TO_END_IDS or "moz-forward-container" in classes:
        return _TO_END
    if any(c.startswith("zmail_extra") for c in classes):
        return _TO_END
    if (element.get("data-marker") or "") in ("__DIVIDER__", "__QUOTED_TEXT__"):
        return _TO_END
    if tag == "div" and _OUTLOOK_RULE.search("".join((element.get("style") or "").split())):
        return _TO_END
    return ""


def _settle(walk: _Walk) -> list[_Mark]:
    """The outermost marks in order: plain blockquotes decided, Gmail forwards made to-the-end, nothing after
    a to-the-end mark."""
    lines = walk.lines
    marks: list[_Mark] = []
    covered = -1
    checked = 0
    li = 0  # index of the first line starting at or after the current mark
    for mark in walk.marks:
        if mark.start < covered:
            continue
        if mark.end < 0:
            mark.end = walk.size
        while li < len(lines) and lines[li].start < mark.start:
            li += 1
        if mark.kind == _PLAIN:
            checked += 1
            if checked > _MAX_PLAIN_CHECKS or not _introduced(lines, li, mark):
                continue
            mark.kind = _QUOTE
        if mark.kind == _ATTR and li < len(lines) and is_banner(lines[li].text):
            mark.kind = _TO_END  # Gmail's "---------- Forwarded message ---------"
        if mark.kind == _GMAIL:
            first = _first_text(lines, li, mark)
            if first and is_banner(first):
                mark.kind = _TO_END
        marks.append(mark)
        if mark.kind == _TO_END:
            break
        if mark.kind in (_QUOTE, _ATTR):
            covered = mark.end
    return marks


def _first_text(lines: list[_Line], li: int, mark: _Mark) -> str:
    return lines[li].text if li < len(lines) and lines[li].start < mark.end else ""


def _introduced(lines: list[_Line], li: int, mark: _Mark) -> bool:
    """Is a plain blockquote introduced by an attribution, right before it or as its first line?"""
    before = lines[li - 1].text if li > 0 else ""
    two = f"{lines[li - 2].text} {before}" if li > 1 else before
    return is_attribution(before) or is_attribution(two) or is_attribution(_first_text(lines, li, mark))


def _own_text_after(walk: _Walk, marks: list[_Mark]) -> bool:
    """Did the sender write anything after the first mark, outside the quotes and attributions?"""
    ranges = [(m.start, m.end) for m in marks if m.kind in (_QUOTE, _ATTR)]
    stop = next((m.start for m in marks if m.kind == _TO_END), walk.size)
    r = 0
    for line in walk.lines:
        if line.start < marks[0].start:
            continue
        if line.start >= stop:
            break
        while r < len(ranges) and ranges[r][1] <= line.start:
            r += 1
        if r < len(ranges) and ranges[r][0] <= line.start < ranges[r][1]:
            continue
        text = line.text
        if text and not is_attribution(text) and not is_banner(text):
            return True
    return False


def _remove_from(element: Any) -> None:
    """Remove `element` and everything after it in document order."""
    parent = element.getparent()
    if parent is None:
        return
    for sibling in list(element.itersiblings()):
        parent.remove(sibling)
    parent.remove(element)
    node = parent
    while node.getparent() is not None:
        up = node.getparent()
        for sibling in list(node.itersiblings()):
            up.remove(sibling)
        node.tail = None
        node = up


def _cut_point(mark: _Mark) -> Any:
    """Where the quote starts: the mark, or the `<hr>` Outlook puts right before its header block."""
    element = mark.element
    previous = element.getprevious()
    if (
        mark.kind == _TO_END
        and previous is not None
        and previous.tag == "hr"
        and not (previous.tail or "").strip()
    ):
        return previous
    return element


def _drop_attribution(walk: _Walk, start: int) -> None:
    """Blank the attribution line (or two) right before walk position `start`, when there is one."""
    before = [line for line in walk.lines if line.end < start and line.text]
    for count in (1, 2):
        chosen = before[-count:]
        if len(chosen) == count and is_attribution(" ".join(line.text for line in chosen)):
            for line in chosen:
                for element, which in line.pieces:
                    if which == "text":
                        element.text = None
                    else:
                        element.tail = None
                for element in line.inner:
                    if element.getparent() is not None:
                        element.drop_tree()
            return


def _quote_as_text(mark: _Mark, budget: int) -> int:
    """Replace a quote element with its lines marked "> " (for the text rules); returns the budget left."""
    inside = _Walk(mark.element, budget=budget, main=False)
    lines = [line.text for line in inside.lines if line.text]
    element = mark.element
    parent = element.getparent()
    if parent is None:
        return budget - inside.visited
    block = etree.Element("div")
    block.tail = element.tail
    previous: Any = None
    for text in lines:
        if previous is None:
            block.text = f"> {text}"
        else:
            previous.tail = f"> {text}"
        previous = etree.SubElement(block, "br")
    parent.replace(element, block)
    return budget - inside.visited


def split_html_reply(html: str) -> str | None:
    """The HTML of the sender's own part of a reply, found by the client's quote markup; None when there is
    no quote markup (see the module docstring)."""
    html = html[:MAX_HTML_CHARS]
    if not _MAYBE_QUOTED.search(html.lower()):
        return None
    try:
        parser = lxml.html.HTMLParser(encoding="utf-8")
        root = lxml.html.document_fromstring(html.encode("utf-8", "replace"), parser=parser)
        walk = _Walk(root, budget=_MAX_ELEMENTS)
        marks = _settle(walk)
        if not marks:
            return None
        first = marks[0]
        if _own_text_after(walk, marks):
            budget = _MAX_ELEMENTS
            for mark in marks:
                if mark.kind == _QUOTE:
                    budget = _quote_as_text(mark, budget)
                elif mark.kind == _TO_END:
                    _remove_from(_cut_point(mark))
        else:
            _drop_attribution(walk, first.start)
            _remove_from(_cut_point(first))
        result: str = lxml.html.tostring(root, encoding="unicode")
    except (_TooBig, etree.LxmlError, ValueError, RecursionError):
        return None
    return result
