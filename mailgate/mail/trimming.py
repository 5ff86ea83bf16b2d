"""Find the new text of a reply: drop quoted history, attributions, forwarded headers and signatures.

`trim_reply` classifies lines and cuts at the first *marker*:

- an attribution ("On Mon, 2 Apr 2012 at 18:26, Bob <b@x> wrote:", "Am ... schrieb ...:", "Le ... a écrit :",
  "El ... escribió:", "Op ... schreef ...:", "Il ... ha scritto:", "... napisał(a):", "... написал:",
  "... 写道：", ...), possibly wrapped over several lines or itself quoted with ">";
- a forwarded/original-message banner ("-----Original Message-----", "-----Ursprüngliche Nachricht-----",
  "---------- Forwarded message ---------", "Begin forwarded message:", ...);
- an Outlook-style header block: three or more "From:/Sent:/To:/Subject:" lines (in several languages);
- a signature separator ("-- " or "--"), a long underscore rule, or a mobile footer ("Sent from my iPhone").

Top-posting (new text, then a marker) keeps only the text above the marker. Bottom-posting (the marker comes
first) drops the marker and the quote block it introduces and keeps what follows. Interleaved replies (quote,
answer, quote, answer) keep their quotes. Quotes that only trail the new text are dropped. A reply with
nothing new gives "". A message that is only a quote with no attribution is kept as written (someone
pasted it).
"""

from __future__ import annotations

import re

__all__ = ["trim_reply"]

_I = re.IGNORECASE
_QUOTE_PREFIX = re.compile(r"^\s*(?:(?:>|\|(?=\s|$)|[A-Za-z]{1,12}>)\s?)+")
_IS_QUOTE = re.compile(r"^\s*(?:>|\|(?:\s|$)|[A-Za-z]{1,12}>)")
_JUNK = re.compile(r"^[\s\-_=*#~+.ᐧ—–•\u200b\ufeff]*$")  # empty, or a rule made of punctuation
_FENCE = re.compile(r"^\s*(```|~~~)")
_SIG_SEPARATOR = re.compile(r"^--\s?$")
_UNDERSCORE_RULE = re.compile(r"^\s*_{5,}\s*$")

_VERBS = (
    r"wrote|writes|said|schrieb|a [ée]crit|escribi[óo]|ha escrito|escreveu|schreef|het volgende geschreven|"
    r"ha scritto|napisa[łl](?:\(a\)|a)?|написал(?:\(а\)|а)?|написав|пише|skrev|skriver|napsal(?:\(a\))?|"
    r"kirjoitti|yazd[ıi]|írta|scrie|写道|寫道|のメッセージ|書きました|작성"
)
_LEAD = (
    r"(?:-+\s*)?(?:on|am|le|el|em|il|op|den|dnia|at|w dniu|в|у|pe|på|dne|la|de)\b"
    r"|\d|[^\W\d]+,\s*\d"  # a date, or a weekday followed by a date
    r"|[^\s.!?<>:]+(?:\s+[^\s.!?<>:]+){0,5}\s*<?\s*(?:mailto:)?[^\s@<>]+@"  # Name <addr@...
)
_ISO_DATE = r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:\s+\d{1,2}:\d{2}(?::\d{2})?)?"
_ATTRIBUTION = [
    re.compile(rf"(?:{_LEAD}).{{0,250}}?(?:{_VERBS})\s*[:：]?\s*-*", _I),
    re.compile(
        rf"(?:{_LEAD}).{{0,250}}\b(?:schrieb|schreef|skrev|skriver|wrote|a [ée]crit|escribi[óo])\b"
        r".{0,120}:",
        _I,
    ),
    # Gmail: "2016-03-03 17:21 GMT+01:00 Some One"
    re.compile(rf"{_ISO_DATE}\s*GMT[+-]\d{{1,2}}:?\d{{2}}\s+.{{1,120}}", _I),
    re.compile(rf"{_ISO_DATE}\s+[^:]{{1,80}}@[^:]{{1,80}}:?", _I),  # "2013/7/20 sam <info@example.org>"
]
_ATTRIBUTION_START = re.compile(rf"^(?:{_LEAD})", _I)
# cheap tests before the full patterns: how an attribution ends, or an ISO date that starts one
_ATTRIBUTION_TAIL = re.compile(rf"(?:{_VERBS}|:|：)\s*-*$|^{_ISO_DATE}", _I)
_BINARY = re.compile(r"[\x00-\x08\x0e-\x1f]")
_BANNER = re.compile(
    r"[\s*_\-]*(?:original message|forwarded message|ursprüngliche nachricht|weitergeleitete nachricht|"
    r"mensaje original|mensaje reenviado|message d'origine|message transféré|messaggio originale|"
    r"messaggio inoltrato|oorspronkelijk bericht|doorgestuurd bericht|originalmeddelande|"
    r"vidarebefordrat meddelande|opprinnelig melding|videresendt melding|oprindelig meddelelse|"
    r"wiadomość oryginalna|oryginalna wiadomość|mensagem original|mensagem encaminhada|"
    r"původní zpráva|исходное сообщение|пересылаемое сообщение|пересланное сообщение)[\s*_\-]*:?"
    r"|\s*begin forwarded message\s*:|\s*début du message réexpédié\s*:"
    r"|\s*anfang der weitergeleiteten .{0,20}:",
    _I,
)
_HEADER = re.compile(
    r"^\*?(?:from|sent|to|cc|bcc|subject|date|reply-to|von|gesendet|an|betreff|datum|de|enviado|para|asunto|"
    r"fecha|envoyé|à|objet|da|inviato|a|oggetto|data|risposta|van|verzonden|aan|onderwerp|från|skickat|till|"
    r"ämne|kopia|od|wysłano|wysłane|do|temat|от|отправлено|кому|тема|дата|копия|emne|sendt|til|fra)\*?\s*:",
    _I,
)
_MOBILE = re.compile(
    r"\(?(?:sent|envoyé|enviado|inviato|verzonden|verstuurd|gesendet|sendt|skickat|wysłane|odesláno|"
    r"отправлено|lähetetty)\s+(?:from|with|via|by|using|depuis|avec|desde|do|da|dal|dall'|vanaf|met|von|mit|"
    r"fra|från|med|z|с|из|de)\b.{0,80}"
    r"|(?:von meinem|diese nachricht wurde von meinem) .{1,80} gesendet\.?"
    r"|get outlook for .{1,80}|get \[outlook for .{1,80}"
    r"|<<\s*sent .{1,40}>>|.{0,20}\bfrom (?:my )?mobile|from my iphone.{0,20}"
    r"|從我的.{1,30}傳送|发自我的.{1,30}|.{1,30}から送信",
    _I,
)
_WINDOW = 6  # physical lines an attribution may be wrapped over
_MAX_ATTRIBUTION = 400
_MAX_SCANNED_LINES = 2000  # markers are looked for this far; beyond it lines are kept or dropped as-is


def _unquote(line: str) -> str:
    return _QUOTE_PREFIX.sub("", line).strip()


def _attribution_end(lines: list[str], i: int) -> int:
    """If an attribution starts at line `i`, return the index after its last line, else -1."""
    first = _unquote(lines[i])
    if not first or len(first) > _MAX_ATTRIBUTION or _BINARY.search(first):
        return -1
    if not _ATTRIBUTION_START.match(first):
        return -1
    parts: list[str] = []
    for j in range(i, min(i + _WINDOW, len(lines))):
        part = _unquote(lines[j])
        if not part:
            continue
        parts.append(part)
        joined = " ".join(parts)
        if len(joined) > _MAX_ATTRIBUTION:
            return -1
        if _ATTRIBUTION_TAIL.search(joined) and any(p.fullmatch(joined) for p in _ATTRIBUTION):
            return j + 1
    return -1


def _header_block_end(lines: list[str], i: int) -> int:
    """If three or more "From:/Sent:/To:" header lines start at `i`, return the index after them, else -1."""
    if not _HEADER.match(_unquote(lines[i]).strip("* ")):
        return -1
    headers, j, end, loose = 0, i, i, 0
    while j < len(lines):
        text = _unquote(lines[j])
        if not text:
            break
        if _HEADER.match(text.lstrip("* ")):
            headers, end, loose = headers + 1, j + 1, 0
        elif loose:
            break
        else:
            loose = 1  # one wrapped continuation line
        j += 1
    return end if headers >= 3 else -1


def _marker(lines: list[str], i: int) -> tuple[str, int]:
    """Classify line `i` as a marker: ("intro"|"cut", end index) or ("", -1)."""
    stripped = lines[i].strip()
    if not stripped:
        return "", -1
    unquoted = _unquote(lines[i])
    if _BANNER.fullmatch(unquoted):
        end = _header_block_end(lines, i + 1) if i + 1 < len(lines) else -1
        return "intro", max(end, i + 1)
    end = _attribution_end(lines, i)
    if end >= 0:
        return "intro", end
    end = _header_block_end(lines, i)
    if end >= 0:
        return "intro", end
    if _IS_QUOTE.match(lines[i]):
        return "", -1
    if _SIG_SEPARATOR.match(lines[i].rstrip("\r")) or _UNDERSCORE_RULE.match(lines[i]):
        return "cut", i + 1
    if len(stripped) <= 100 and _MOBILE.fullmatch(stripped.strip("*_ ")):
        return "cut", i + 1
    return "", -1


def _kind(line: str) -> str:
    if _JUNK.match(line):
        return "e"
    return "q" if _IS_QUOTE.match(line) else "t"


def _interleaved_suffixes(kinds: list[str]) -> list[bool]:
    """For each index: does the rest hold a quote, then text, then a quote again (an inline answer)?"""
    flags = [False] * (len(kinds) + 1)
    quote_after = text_quote_after = False
    for i in range(len(kinds) - 1, -1, -1):
        if kinds[i] == "q":
            flags[i] = flags[i + 1] or text_quote_after
            quote_after = True
        else:
            flags[i] = flags[i + 1]
            if kinds[i] == "t" and quote_after:
                text_quote_after = True
    return flags


def _skip_quote_block(lines: list[str], kinds: list[str], i: int) -> int:
    while i < len(lines) and kinds[i] in "qe":
        i += 1
    return i


def trim_reply(text: str) -> str:
    """The new text of a reply (see the module docstring); "" when the reply adds nothing."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kinds = [_kind(line) for line in lines]
    interleaved = _interleaved_suffixes(kinds)
    kept: list[int] = []
    has_text = bottom_posting = False
    in_fence = False
    i = 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            in_fence = not in_fence
        if in_fence or _FENCE.match(lines[i]):
            kept.append(i)
            has_text = has_text or kinds[i] == "t"
            i += 1
            continue
        what, end = _marker(lines, i) if i < _MAX_SCANNED_LINES else ("", -1)
        if not what:
            kept.append(i)
            has_text = has_text or kinds[i] == "t"
            i += 1
            continue
        if what == "cut":
            if has_text:
                break
            i = end  # a footer with nothing above it: drop just that line
            continue
        if has_text and not bottom_posting:
            if interleaved[end]:
                bottom_posting = True
                i = end
                continue
            break
        bottom_posting = True
        # bottom-posting: the quote block right after the attribution is what is being answered
        i = end if has_text or interleaved[end] else _skip_quote_block(lines, kinds, end)
    result = [lines[k] for k in kept]
    result_kinds = [kinds[k] for k in kept]
    if "t" in result_kinds:
        while result_kinds and result_kinds[-1] in "qe":
            result_kinds.pop()
            result.pop()
    elif "q" not in result_kinds:
        return ""
    return "\n".join(result).strip("\n").rstrip()
