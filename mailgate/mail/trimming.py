"""Find the new text of a reply: drop quoted history, attributions, forwarded headers and signatures.

`trim_reply` classifies lines and cuts at the first *marker*:

- an attribution: a line (or a few wrapped lines) with a date or time *and* a name or address, that ends
  with ":" (or the dash frame some clients put around it) or is followed by a quoted line: "On Mon, 2 Apr
  2012 at 18:26, Bob <b@x> wrote:", "Am ... schrieb ...:", "Le ... a écrit :", "El ... escribió:",
  "... napisał(a):", "... написал:", "... 写道：", date-first webmail forms ("26.08.2021, 19:40, "Bob"
  <b@x>:") before a quote, ... Two client forms count without one of those: "Name <address> wrote:" (no
  date) and Gmail's "2016-03-03 17:21 GMT+01:00 Name" (no colon). "On Thursday." above a quote is the
  sender's text. The first line holds the date or time or the address; a line ending a sentence, or a
  blank line followed by a line that starts an attribution of its own, ends the lines an attribution may
  be wrapped over;
- a forwarded/original-message banner ("-----Original Message-----", "-----Ursprüngliche Nachricht-----",
  "---------- Forwarded message ---------", "Begin forwarded message:", ...);
- an Outlook-style header block: three or more "From:/Sent:/To:/Subject:" lines (in several languages);
- a signature separator ("-- " or "--"), a long underscore rule, or a known mobile/app footer ("Sent from
  my iPhone", "Von meinem iPhone gesendet", "Get Outlook for iOS", "Sent from Mail for Windows", ...) on
  its own line at the end of the new text. "Sent from my desk, is much easier ..." is the sender's text.

Top-posting (new text, then a marker) keeps only the text above the marker. Bottom-posting (the marker comes
first) drops the marker and the quote block it introduces and keeps what follows. Inline replies (quote,
answer, quote, answer) keep the quoted lines each answer refers to, marked with ">" (lines quoted with
"|" or "Name>" get "> " per level), and drop the attribution and the quote after the last answer.
Quotes that only trail the new text are dropped. A message that is only a quote with no attribution is
kept as written (someone pasted it).

In doubt the text is kept: when trimming would leave nothing of a message that has an unquoted line,
`trim_reply` returns the whole text (line endings normalised) instead of "". `split_reply` says which
happened (`Reply.kept_whole`), for a caller that wants to tell "nothing was trimmed" from "nothing was
left, so nothing was trimmed". Only a blank message, or one made only of quoted lines with an attribution
among them, gives "".

Cost is bounded (bench/trimming_cost.py): only the first `MAX_TRIMMED_CHARS` characters are read (the
worker's input is cut at 100,000 anyway); markers are looked for in the first `_MAX_SCANNED_LINES`
lines; every line gets one anchored regex for its kind and one for whether it can be a marker at all,
and only those candidates reach the tests their first word names; a stretch of lines that cannot end an
attribution is looked at once; every pattern is linear (possessive quantifiers, no nested repeats).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["MAX_TRIMMED_CHARS", "Reply", "is_attribution", "is_banner", "split_reply", "trim_reply"]

MAX_TRIMMED_CHARS = 200_000  # characters of a body trimming reads; the rest is not part of the result

_I = re.IGNORECASE


def _words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of `text` (long word lists read better as one block)."""
    return tuple(text.split())


_QUOTE_PREFIX = re.compile(r"^\s*+(?:(?:>|\|(?=\s|$)|[A-Za-z]{1,12}>)\s?)++")
_IS_QUOTE = re.compile(r"^\s*(?:>|\|(?:\s|$)|[A-Za-z]{1,12}>)")
_JUNK = re.compile(r"^[\s\-_=*#~+.ᐧ—–•\u200b\ufeff]*$")  # empty, or a rule made of punctuation
# a line's kind in one match: group 1 set: quoted; matched without it: empty or a rule ("e"); no match: text
_KIND = re.compile(r"[\s\-_=*#~+.ᐧ—–•\u200b\ufeff]*+$|(\s*+(?:>|\|(?:\s|$)|[A-Za-z]{1,12}>))")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SIG_SEPARATOR = re.compile(r"^\s*--\s?$")  # indented too: HTML converted to text indents blocks
_UNDERSCORE_RULE = re.compile(r"^\s*_{5,}\s*$")
_BINARY = re.compile(r"[\x00-\x08\x0e-\x1f]")

# --- attributions ------------------------------------------------------------------------------------------
_VERBS = (
    r"wrote|writes|said|schrieb|a [ée]crit|escribi[óo]|ha escrito|escreveu|schreef|het volgende geschreven|"
    r"ha scritto|napisa[łl](?:\(a\)|a)?|написал(?:\(а\)|а)?|написав|пише|skrev|skriver|napsal(?:\(a\))?|"
    r"kirjoitti|yazd[ıi]|írta|scrie|写道|寫道|のメッセージ|書きました|작성"
)
# the same verbs as literal endings: `str.endswith` with a tuple costs a fraction of a regex search
_VERB_ENDINGS = _words(
    """
    wrote writes said schrieb écrit ecrit escribió escribio escrito escreveu schreef geschreven scritto
    napisał napisal napisał(a) napisal(a) napisała napisala написал написал(а) написала написав пише skrev
    skriver napsal napsal(a) kirjoitti yazdı yazdi írta scrie 写道 寫道 のメッセージ 書きました 작성
    """
)
_MID_VERBS = ("schrieb", "schreef", "skrev", "skriver", "wrote", "crit", "escribi")
_LEAD_WORDS = r"(?:-+\s*)?(?:on|am|le|el|em|il|op|den|dnia|at|w dniu|в|у|pe|på|dne|la|de)\b"
# how an attribution's first line starts: a lead word, a date, "weekday, date", or "Name <addr@" (possessive
# quantifiers: a line that fails here fails in one pass, however long)
_LEAD = re.compile(
    rf"{_LEAD_WORDS}|\d|[^\W\d]++,\s*+\d|(?:[^\s@<>.!?:]++\s++){{0,6}}+<?\s*+(?:mailto:)?+[^\s@<>]++@", _I
)
_LEAD_WORD_SET = frozenset(_words("on am le el em il op den dnia at в у pe på dne la de"))
_LEAD_STRONG = re.compile(rf"{_LEAD_WORDS}|\d|[^\W\d]++,\s*+\d", _I)  # starts an attribution of its own
_VERB_MID = re.compile(r"\b(?:schrieb|schreef|skrev|skriver|wrote|a [ée]crit|escribi[óo])\b", _I)
_ISO_DATE = r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:\s+\d{1,2}:\d{2}(?::\d{2})?)?"
_ISO_START = re.compile(_ISO_DATE)
_GMAIL_GMT = re.compile(rf"{_ISO_DATE}\s*GMT[+-]\d{{1,2}}:?\d{{2}}\s+\S.{{0,120}}", _I)  # Gmail, 2016
# a date or a time: every branch starts at a digit, so the search skips to digits (5-25x faster than
# branches that start with a month name)
_DATETIME = re.compile(
    r"\d(?:\d{3}|\d?\s?[:.h]\s?\d{2}|\d?[/.-]\d{1,2}|\d?\.?\s[^\W\d_]{3}|\d?\s?[年月日]"
    r"|(?<=[^\W\d_]{3}\s\d)|(?<=[^\W\d_]{3}\.\s\d))"
)
_WORD = re.compile(r"[^\W\d_]{2,}")
# words of dates, times and attribution phrasing in the languages above: whatever else is left is a name
_NOT_NAMES = frozenset(
    _words(
        """
    on at the of in and wrote writes said am pm gmt utc via mailto yesterday today
    mon tue tues wed thu thur thurs fri sat sun monday tuesday wednesday thursday friday saturday sunday
    jan feb mar apr may jun jul aug sep sept oct nov dec january february march april june july august
    september october november december est edt cst cdt mst mdt pst pdt cet cest bst eet eest mez mesz
    um uhr schrieb nachm vorm mo di mi do fr sa so montag dienstag mittwoch donnerstag freitag samstag
    sonntag januar jänner februar märz mai juni juli oktober dezember okt dez
    le la les écrit ecrit lun mer jeu ven sam dim lundi mardi mercredi jeudi vendredi samedi dimanche
    janv févr fevr avr juin juil août aout déc janvier février fevrier mars avril juillet septembre
    octobre novembre décembre
    el de del las escribió escribio ha escrito lunes martes miércoles miercoles jueves viernes sábado
    sabado domingo ene enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre
    diciembre dic abr ago
    em às escreveu segunda terça quarta quinta sexta feira janeiro fevereiro março maio junho julho
    setembro outubro dezembro fev set out
    il alle scritto gen mag giu lug ott lunedì martedì mercoledì giovedì venerdì sabato domenica gennaio
    febbraio aprile maggio giugno luglio settembre ottobre dicembre
    op om heeft het volgende geschreven schreef maandag dinsdag woensdag donderdag vrijdag zaterdag
    zondag januari februari maart mei augustus
    den på kl skrev skriver mån tis ons tor lör sön måndag tisdag onsdag torsdag fredag lördag söndag
    mandag tirsdag lørdag søndag maj
    dnia dniu godz napisał napisała napisal pon wt śr czw pt sob niedz sty lut kwi cze lip sie wrz paź
    lis gru stycznia lutego marca kwietnia maja czerwca lipca sierpnia września października listopada
    grudnia poniedziałek wtorek środa czwartek piątek sobota niedziela
    пользователь написал написала написав пише от пн вт ср чт пт сб вс янв фев мар апр мая июн июл авг
    сен сент окт ноя дек января февраля марта апреля июня июля августа сентября октября ноября декабря
    понедельник вторник среда четверг пятница суббота воскресенье серп вер жовт лист груд січ лют бер
    квіт трав черв лип
    dne napsal kirjoitti yazdı írta scrie
    """
    )
)
_WINDOW = 6  # physical lines an attribution may be wrapped over
_MAX_ATTRIBUTION = 400
_MAX_SCANNED_LINES = 2000  # markers are looked for this far; beyond it lines are kept or dropped as-is
_CANDIDATE_SPAN = 2 * _MAX_ATTRIBUTION  # characters of a line that can tell whether it is a marker

# --- banners, header blocks, footers ------------------------------------------------------------------------
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
# what a footer names: a device, a carrier or a mail app (prefixes: "iPhone'a", "iPhonu", "Android-...")
_THING = (
    r"(?:iphon|ipad|ipod|apple|blackberry|android|samsung|galaxy|huawei|honor|xiaomi|redmi|oneplus|oppo|"
    r"vivo|motorola|moto|nokia|lumia|sony|xperia|htc|lg|google|pixel|fairphone|windows|surface|mobil|"
    r"móvil|movil|cellulare|celular|cell|phone|smartphone|smartfon|tablet|device|appareil|dispositivo|"
    r"handy|telefon|teléfono|téléphone|telefoon|portable|мобильн|смартфон|телефон|айфон|outlook|mail|"
    r"e-mail|email|yahoo|gmail|aol|airmail|spark|superhuman|proton|tutanota|tuta|mailspring|newton|edison|"
    r"bluemail|blue mail|k-9|fairemail|zoho|gmx|web\.de|почты|почта|яндекс|mymail|fastmail|polymail|"
    r"verizon|sprint|t-mobile|at&t|vodafone|orange|telekom|o2)\S*"
)
_FOOTER = re.compile(
    r"(?:sent|envoyé|enviado|inviato|verzonden|verstuurd|gesendet|sendt|skickat|wysłane|wysłano|odesláno|"
    r"отправлено|lähetetty)\s+"
    r"(?:from|with|via|by|using|on|depuis|de|avec|desde|do|da|dal|dall'|vanaf|met|von|mit|fra|från|med|z|"
    r"ze|с|со|из|a partir do|a partir de)\s+"
    r"(?:(?:my|mon|ma|mi|meu|minha|mio|mia|mijn|meinem|meiner|min|mitt|mojego|mého|моего|моей|the all new|"
    rf"the|der|la|el|il|het)\s+)?{_THING}(?P<tail>(?:\s+\S+){{0,10}})"
    rf"|(?:von|vom)\s+(?:meinem|meiner|mein)\s+{_THING}(?:\s+\S+){{0,5}}\s+gesendet\.?"
    rf"|diese nachricht wurde von meinem\s+{_THING}(?:\s+\S+){{0,6}}\s+gesendet\.?"
    r"|(?:get|obtenir|obtener|holen sie sich|scarica|ottieni|baixe|download)\s+outlook\s+"
    r"(?:for|pour|para|für|per)\s+(?:ios|android)\.?"
    r"|lähetetty\s+\S+(?:sta|stä)\.?"
    r"|(?:从我的|發自我的|发自我的)\S{1,30}|從我的\S{1,30}傳送|\S{1,30}から送信",
    _I,
)
# a footer's tail is a device name, not a sentence ("Sent from my phone, so I can't check the file.")
_SENTENCE_WORDS = re.compile(r"\b(?:i|we|you|it|is|are|was|will|can|can't|should|would|this|that|so)\b", _I)
_LINK = re.compile(r"\((?:https?://|mailto:)[^)\s]*\)|<(?:https?://|mailto:)[^>\s]*>|[\[\]]")
_MAX_FOOTER = 120
_FOOTER_STARTS = frozenset(
    _words(
        """
        sent envoyé enviado inviato verzonden verstuurd gesendet sendt skickat wysłane wysłano odesláno
        отправлено lähetetty von vom diese get obtenir obtener holen scarica ottieni baixe download
        """
    )
)
_CJK_FOOTER = re.compile("从我的|發自我的|发自我的|從我的|から送信")
_BANNER_STARTS = _words(
    """
    original forwarded ursprüngliche weitergeleitete mensaje message messaggio oorspronkelijk doorgestuurd
    originalmeddelande vidarebefordrat opprinnelig videresendt oprindelig wiadomość oryginalna mensagem
    původní исходное пересылаемое пересланное begin début anfang
    """
)
# can a line be a marker at all, and which? It starts (after any quote marks) with a rule or a fence, a
# date or "weekday, 1", or a word that starts an attribution, a banner or a footer; or it holds an "@" or a
# colon; or it is a CJK footer. Only candidates reach the marker tests, and only the tests their group names.
_CANDIDATE = re.compile(
    r"[\s>|*]*+(?:(?P<rule>[\-_=~`])|(?P<date>\d|[^\W\d]{1,24}+,\s*+\d)|(?P<word>[^\W\d_]{1,24}+))"
)
_BANNER_TEST, _ATTRIBUTION_TEST, _FOOTER_TEST, _RULE_TEST = 1, 2, 4, 8
_RULE_TESTS = _BANNER_TEST | _ATTRIBUTION_TEST | _RULE_TEST
_COLON_TESTS = _BANNER_TEST | _ATTRIBUTION_TEST | _FOOTER_TEST
_WORD_TESTS = {
    **dict.fromkeys([*_LEAD_WORD_SET, "w"], _ATTRIBUTION_TEST),
    **dict.fromkeys(_BANNER_STARTS, _BANNER_TEST),
    **dict.fromkeys(_FOOTER_STARTS, _FOOTER_TEST),
}


def _tests(line: str) -> int:
    """Which marker tests `line` needs (0: none, it cannot be a marker)."""
    match = _CANDIDATE.match(line, 0, _CANDIDATE_SPAN)
    if match is not None:
        if match.lastgroup == "rule":
            return _RULE_TESTS
        if match.lastgroup == "date":
            return _ATTRIBUTION_TEST
        tests = _WORD_TESTS.get(match.group("word").lower(), 0)
        if tests:
            return tests
    head = line[:_CANDIDATE_SPAN]
    if "@" in head or ":" in head or "：" in head:
        return _COLON_TESTS
    if not head.isascii() and _CJK_FOOTER.search(head):
        return _FOOTER_TEST
    return 0


def _unquote(line: str) -> str:
    return _QUOTE_PREFIX.sub("", line).strip()


class _Lines:
    """The lines of a body with what the markers need per line: kinds, unquoted text, marker candidates.

    One regex per line tells its kind, up front; the rest is computed on first use and kept: a line's text
    without quote marks, whether it could be a marker at all (`_tests`), and the flags the attribution
    tests read. Only candidates reach the marker tests.
    """

    def __init__(self, lines: list[str]) -> None:
        self.raw = lines
        self.n = len(lines)
        self._flags: dict[int, int] = {}
        kinds: list[str] = []
        for line in lines:
            kind = _KIND.match(line)
            kinds.append("t" if kind is None else "e" if kind.group(1) is None else "q")
        self.kinds = kinds
        # computed on first use: a top-posted reply never looks at the lines of the quote below it
        self._text: list[str | None] = [None] * self.n
        self._tests: list[int] = [-1] * self.n
        self._clear = (0, 0)  # no line in [lo, hi) can close an attribution

    def text(self, k: int) -> str:
        """Line `k` without its quote marks and surrounding blanks."""
        text = self._text[k]
        if text is None:
            line = self.raw[k]
            text = self._text[k] = _unquote(line) if self.kinds[k] == "q" else line.strip()
        return text

    def tests(self, k: int) -> int:
        """The marker tests line `k` needs (see `_tests`)."""
        tests = self._tests[k]
        if tests < 0:
            tests = self._tests[k] = _tests(self.raw[k])
        return tests

    def closing_within(self, i: int, stop: int) -> bool:
        """Could a line in [i, stop) close an attribution (it ends like one, a quoted line comes next, or it
        starts with an ISO date)? Lines already known not to are not looked at again."""
        lo, hi = self._clear
        j = hi if lo <= i <= hi else i
        while j < stop:
            if self.flags(j) & (_ENDING | _QUOTE_NEXT):
                return True
            line = self.text(j)
            if line[:1].isdigit() and _ISO_START.match(line):
                return True
            j += 1
        self._clear = (lo if lo <= i <= hi else i, max(stop, hi if lo <= i <= hi else stop))
        return False

    def quote_after(self, k: int) -> bool:
        """Is the next line with text after `k` a quoted line?"""
        for j in range(k + 1, self.n):
            text = self.text(j)
            if text and (self.kinds[j] == "t" or not _JUNK.match(text)):
                return self.kinds[j] == "q"
        return False

    def flags(self, k: int) -> int:
        """What line `k` says about an attribution (ENDING | QUOTE_NEXT | SENTENCE); computed once."""
        cached = self._flags.get(k)
        if cached is None:
            tail = self.text(k).rstrip(" \t-")
            cached = (_ENDING if _ends_like_attribution(tail) else 0) | (
                _QUOTE_NEXT if self.quote_after(k) else 0
            )
            if _ends_sentence(tail):
                cached |= _SENTENCE
            self._flags[k] = cached
        return cached


_ENDING, _QUOTE_NEXT, _SENTENCE = 1, 2, 4


def _ends_like_attribution(tail: str) -> bool:
    """Does a line end like an attribution: a colon, or a verb of attribution ("wrote", "schrieb", ...)?"""
    if tail.endswith((":", "：")):
        return True
    return tail[-40:].lower().endswith(_VERB_ENDINGS)


def _has_name(text: str) -> bool:
    return any(word.lower() not in _NOT_NAMES for word in _WORD.findall(text))


def _is_attribution(joined: str, *, quote_next: bool, compact: bool = True) -> bool:
    """Does `joined` (one attribution candidate, already known to start like one) have what one has?

    `compact`: it spans at most two physical lines and no blank line, as a verbless form must.
    """
    if _GMAIL_GMT.fullmatch(joined):
        return True  # Gmail's fixed "2016-03-03 17:21 GMT+01:00 Name", with or without a colon
    tail = joined.rstrip(" \t-")
    colon = tail.endswith((":", "："))
    framed = joined.startswith("--") and joined.endswith("--")  # "---- On ... wrote ----"
    if not (colon or framed or quote_next):
        return False
    address = "@" in joined
    dated = _DATETIME.search(joined) is not None
    mid = _VERB_MID.search(joined) if colon and any(v in joined for v in _MID_VERBS) else None
    if _ends_like_attribution(tail.rstrip(":： ")) or (mid and len(joined) - mid.end() <= 130):
        if dated and (address or _has_name(joined)):
            return True
        return address and colon  # "Name <address> wrote:"
    # no verb: a date-first webmail line ("26.08.2021, 19:40, "Bob" <b@x>:") or "2013/7/20 Bob <b@x>"
    return compact and dated and address and quote_next and (colon or _ISO_START.match(joined) is not None)


def _ends_sentence(tail: str) -> bool:
    if tail.endswith(("!", "?")):
        return True
    if not tail.endswith("."):
        return False
    word = tail[:-1].rsplit(None, 1)[-1] if tail[:-1].strip() else ""
    return len(word) >= 6 and word.isalpha()  # "Thursday." ends a sentence; "28.", "Apr.", "nachm." do not


def _may_lead(first: str) -> bool:
    """A cheap test that `first` might start an attribution (before the `_LEAD` regex)."""
    if first[0].isdigit() or first[0] == "-" or "@" in first or "," in first[:24]:
        return True
    return first.split(None, 1)[0].lower() in _LEAD_WORD_SET or first[:7].lower() == "w dniu "


def _attribution_end(lines: _Lines, i: int) -> int:
    """If an attribution starts at line `i`, return the index after its last line, else -1."""
    first = lines.text(i)
    if not first or len(first) > _MAX_ATTRIBUTION or not _may_lead(first) or not _LEAD.match(first):
        return -1
    if "@" not in first and _DATETIME.search(first) is None:
        return -1  # an attribution's first line holds its date or the address (the corpus has no other)
    if not lines.closing_within(i, min(i + _WINDOW, lines.n)) or _BINARY.search(first):
        return -1  # no line within reach can end an attribution
    parts: list[str] = []
    size = 0
    after_blank = crossed = False
    for j in range(i, min(i + _WINDOW, lines.n)):
        part = lines.text(j)
        if not part:
            if after_blank:
                return -1  # two blank lines: not one wrapped attribution
            after_blank = True
            continue
        if after_blank and _LEAD_STRONG.match(part):
            return -1  # the line after the blank starts an attribution of its own
        crossed = crossed or after_blank
        after_blank = False
        parts.append(part)
        size += len(part) + 1
        if size > _MAX_ATTRIBUTION:
            return -1
        flags = lines.flags(j)
        if flags & (_ENDING | _QUOTE_NEXT) or (j == i and part[:1].isdigit() and _ISO_START.match(part)):
            compact = len(parts) <= 2 and not crossed
            if _is_attribution(" ".join(parts), quote_next=bool(flags & _QUOTE_NEXT), compact=compact):
                return j + 1
            if flags & _ENDING:
                return -1
        if flags & _SENTENCE:
            return -1
    return -1


def is_attribution(text: str) -> bool:
    """Is `text` (one line, or a few joined with spaces) an attribution that stands right above a quote?"""
    text = " ".join(text.split())
    if not text or len(text) > _MAX_ATTRIBUTION or not _LEAD.match(text) or _BINARY.search(text):
        return False
    return _is_attribution(text, quote_next=True)


def is_banner(text: str) -> bool:
    """Is `text` a forwarded/original-message banner ("---------- Forwarded message ---------", ...)?"""
    text = text.strip()
    return len(text) <= 80 and _BANNER.fullmatch(text) is not None


def _header_block_end(lines: _Lines, i: int) -> int:
    """If three or more "From:/Sent:/To:" header lines start at `i`, return the index after them, else -1."""
    first = lines.text(i)
    if (":" not in first[:40] and "：" not in first[:40]) or not _HEADER.match(first.strip("* ")):
        return -1
    headers, j, end, loose = 0, i, i, 0
    while j < lines.n:
        text = lines.text(j)
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


def _is_footer(line: str) -> bool:
    if len(line) > 2 * _MAX_FOOTER:
        return False
    stripped = line.strip().strip("*_ ")
    if not stripped or len(stripped) > _MAX_FOOTER:
        return False
    words = stripped.split(None, 1)
    if words[0].lower() not in _FOOTER_STARTS and (stripped.isascii() or not _CJK_FOOTER.search(stripped)):
        return False
    match = _FOOTER.fullmatch(" ".join(_LINK.sub(" ", stripped).split()))
    if match is None:
        return False
    tail = match.group("tail")
    return not (tail and _SENTENCE_WORDS.search(tail))


def _intro(lines: _Lines, i: int) -> int:
    """If line `i` starts a quote's introduction (banner, attribution, header block): its end, else -1."""
    tests = lines.tests(i)
    text = lines.text(i)
    if tests & _BANNER_TEST and len(text) <= 80 and _BANNER.fullmatch(text):
        end = _header_block_end(lines, i + 1) if i + 1 < lines.n else -1
        return max(end, i + 1)
    end = _attribution_end(lines, i) if tests & _ATTRIBUTION_TEST else -1
    return end if end >= 0 else _header_block_end(lines, i)


def _at_end(lines: _Lines, i: int) -> bool:
    """Is what follows line `i` no more of the sender's text (nothing, a quote, a footer, an introduction)?"""
    k = i + 1
    while k < lines.n and lines.kinds[k] == "e":
        k += 1
    if k >= lines.n or lines.kinds[k] == "q":
        return True
    tests = lines.tests(k)
    if tests & _FOOTER_TEST and _is_footer(lines.raw[k]):
        return True
    if _SIG_SEPARATOR.match(lines.raw[k].rstrip("\r")) or _UNDERSCORE_RULE.match(lines.raw[k]):
        return True
    return k < _MAX_SCANNED_LINES and tests != 0 and _intro(lines, k) >= 0


def _marker(lines: _Lines, i: int) -> tuple[str, int]:
    """Classify line `i` as a marker: ("intro"|"cut", end index) or ("", -1)."""
    if lines.kinds[i] == "e" and not lines.raw[i].strip():
        return "", -1
    end = _intro(lines, i)
    if end >= 0:
        return "intro", end
    line = lines.raw[i]
    if lines.kinds[i] == "q":
        return "", -1
    tests = lines.tests(i)
    if tests & _RULE_TEST and (_SIG_SEPARATOR.match(line.rstrip("\r")) or _UNDERSCORE_RULE.match(line)):
        return "cut", i + 1
    if tests & _FOOTER_TEST and _is_footer(line) and _at_end(lines, i):
        return "cut", i + 1
    return "", -1


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


def _skip_quote_block(kinds: list[str], i: int) -> int:
    while i < len(kinds) and kinds[i] in "qe":
        i += 1
    return i


def _requote(line: str) -> str:
    """A kept quoted line, marked with ">": "|" and "Name>" prefixes become "> " per level, the rest stays."""
    if line.lstrip().startswith(">"):
        return line
    prefix = _QUOTE_PREFIX.match(line)
    if prefix is None:
        return line
    depth = max(1, prefix.group().count(">") + prefix.group().count("|"))
    return ("> " * depth + line[prefix.end() :]).rstrip()


class Reply(NamedTuple):
    """The outcome of trimming a reply."""

    text: str  # the new text; the whole text (line endings normalised) when `kept_whole`
    kept_whole: bool  # trimming would have left nothing of a message with an unquoted line


def trim_reply(text: str) -> str:
    """The new text of a reply (see the module docstring); the whole text when trimming would leave nothing.

    "" only for a blank message or one made only of quoted lines (with an attribution among them).
    """
    return split_reply(text).text


def split_reply(text: str) -> Reply:
    """`trim_reply`, saying whether the text was kept whole because trimming would have left nothing."""
    normalized = text[:MAX_TRIMMED_CHARS].replace("\r\n", "\n").replace("\r", "\n")
    lines = _Lines(normalized.split("\n"))
    kinds = lines.kinds
    interleaved = _interleaved_suffixes(kinds)
    kept: list[int] = []
    fenced: set[int] = set()
    has_text = bottom_posting = in_fence = False
    i = 0
    while i < lines.n:
        if not in_fence and (i >= _MAX_SCANNED_LINES or not lines.tests(i)):  # the common case: no marker
            kept.append(i)
            has_text = has_text or kinds[i] == "t"
            i += 1
            continue
        if _FENCE.match(lines.raw[i]):
            in_fence = not in_fence
            fenced.add(i)
        if in_fence or i in fenced:
            fenced.add(i)
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
        i = end if has_text or interleaved[end] else _skip_quote_block(kinds, end)
    result_kinds = [kinds[k] for k in kept]
    if "t" in result_kinds:
        while result_kinds and result_kinds[-1] in "qe":
            result_kinds.pop()
            kept.pop()
    elif "q" not in result_kinds:
        kept = []
    result = [_requote(lines.raw[k]) if kinds[k] == "q" and k not in fenced else lines.raw[k] for k in kept]
    trimmed = "\n".join(result).strip("\n").rstrip()
    if not trimmed and "t" in kinds:
        return Reply(
            normalized.strip("\n").rstrip(), kept_whole=True
        )  # in doubt, keep: a lost message is worse
    return Reply(trimmed, kept_whole=False)
