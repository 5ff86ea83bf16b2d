"""Pure decisions about senders: never answer automatic mail, who may write, which budget, rate limits.

Nothing here does I/O, and nothing here reads a header: the input is plain values admission read once at
DATA (`models.HeaderSignals`, from `mail.headers.read_signals`, whose reads never raise) and values the
caller read elsewhere (envelope sender, allow-list, counts).

`automatic_reason` answers "must this message never be answered?" with a short reason string
("bounce: ...", "auto-reply: ...", "read receipt: ...", "complaint: ...", "bulk: ...", "loop: ...")
or None for mail a person wrote. Signals, in the order checked: our loop header or Message-ID; a
multipart/report (DSN, MDN, ARF); MAILER-DAEMON senders; bounce and out-of-office subjects;
auto-reply headers (RFC 3834 Auto-Submitted, X-Autoreply and friends); a null envelope sender;
postmaster senders; Precedence, mailing-list headers and X-Loop. Subject patterns are anchored at the start
and need a separator after the phrase, so "Fwd: Undelivered Mail..." or "Out of office next week,
please draft..." stay human. Weak words ("Auto", "Read", "Absence") count only when followed by a
reply prefix ("Read: Re: ..."): the automatic mail that reaches us answers our own "Re:" replies.
`X-Auto-Response-Suppress` is not a signal: Outlook puts it on ordinary mail.

Sender authentication lives in `admission.authn`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mailgate.models import BUDGETS, HeaderSignals, ascii_domain

__all__ = [
    "LOOP_HEADER",
    "OWN_MESSAGE_ID_SUFFIX",
    "asked_budget",
    "automatic_reason",
    "is_own_message_id",
    "long_chain",
    "requested_budget",
    "sender_allowed",
]

#: Set on every message mailgate sends; seeing it inbound means our own mail came back.
LOOP_HEADER = "X-Mailgate-Loop"
#: The local part of every Message-ID mailgate mints ends with this: `<ULID.mailgate@MAILGATE_DOMAIN>`.
OWN_MESSAGE_ID_SUFFIX = ".mailgate"

_REPORTS = {
    "delivery-status": "bounce: multipart/report delivery-status",
    "disposition-notification": "read receipt: disposition-notification",
    "feedback-report": "complaint: ARF feedback-report",
}
_REPORT_PARTS = {
    "message/delivery-status": "bounce: message/delivery-status",
    "message/global-delivery-status": "bounce: message/global-delivery-status",
    "message/disposition-notification": "read receipt: message/disposition-notification",
    "message/feedback-report": "complaint: message/feedback-report",
}
# Header names whose mere presence marks an automatic reply (compared lower-case).
_AUTOREPLY_HEADERS = (
    "x-autoreply",
    "x-autorespond",
    "x-auto-response",
    "x-autoresponder",
    "x-autoreply-from",
    "x-mail-autoreply",
    "x-vacation",
)
_BULK_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply", "auto-reply"})
# RFC 2369/2919 list headers, ezmlm's Mailing-List, and fml's X-ML-Name / X-MLServer.
_LIST_HEADERS = (
    "List-Id",
    "List-Unsubscribe",
    "List-Post",
    "Mailing-List",
    "X-Mailing-List",
    "X-ML-Name",
    "X-MLServer",
)

_MAILER_DAEMON = re.compile(
    r"(?<![a-z0-9])mailer[-_.]?daemon(?![a-z0-9])|mail\.?delivery\.?(?:sub)?system@", re.I
)
_POSTMASTER = re.compile(r"(?<![a-z0-9])post[-_]?master(?![a-z0-9])", re.I)
_LIST_ENVELOPE = re.compile(r"^(?:owner-.+|.+-(?:owner|bounces?|request))(?:\+[^@]*)?@", re.I)
_VACATION_MAILER = re.compile(r"vacation|auto[- ]?respon|auto[- ]?reply", re.I)

# Separator after a subject phrase: a colon (any width), a bracket, a dash, a reply prefix, or the end.
_END = r"\s*(?:[:：\]】)\-–—]|$|re\b|aw\b|sv\b)"
# A reply prefix, for weak words that count only in front of one ("Auto: Re: ...", "Read: RE: ...").
_REPLY = r"(?:\s*[:：]\s*|\s+)(?:re|aw|sv|antw|wg|tr|rif|r|vs|odp|ynt|回复|答复|返信)\s*[:：]"
_OPEN = r"^[\[【(]?\s*"

_BOUNCE_SUBJECT = re.compile(
    _OPEN + r"(?:undeliverable\s*(?::|mail\b|message\b|$)|undelivered (?:mail|message)|"
    r"delivery status notification|delivery (?:status )?notification\s*:|delivery status\s*$|"
    r"delivery report\s*$|delivery failure\s*(?::|$)|delivery has failed|"
    r"mail delivery (?:failed|failure|status report)|message delivery has failed|"
    r"failure notice\s*(?::|$)|failed delivery\s*$|returned mail\s*(?::|$)|mail system error\b|"
    r"delayed mail\b|warning: (?:could not send message|message .* delayed)|"
    r"notice: mail delivery status|postmaster notify|email delivery failure|"
    r"(?:sorry, )?(?:your )?(?:mail|message) could not be delivered|"
    r"there was an error sending your mail|(?:email )?bounce notification|"
    r"non-?delivery (?:report|notification)|nondeliverable|message you sent blocked|"
    r"non remis|échec de (?:la )?(?:remise|distribution)|unzustellbar|nicht zustellbar|"
    r"übermittlungsstatus|no se puede entregar|mensaje no entregado|non recapitabile|"
    r"onbestelbaar|não (?:é possível )?entreg|mensagem não entregue|kan inte levereras|"
    r"недоставленное сообщение|ваше сообщение не доставлено|"
    r"メッセージを配信できません|メールエラー通知|配信不能|配信エラー|退信|系统退信|邮件投递失败|無法投遞)"
)
_OOO_STRONG = (
    r"out of (?:the )?office(?: auto ?reply)?|out-of-office|automatic reply|auto[- ]?reply|"
    r"auto[- ]?respon(?:se|der|s)?|automatic response|away from (?:the )?office|"
    r"abwesenheitsnotiz|automatische antwort|nicht im büro|réponse automatique|reponse automatique|"
    r"absente? du bureau|respuesta automática|respuesta automatica|fuera de (?:la )?oficina|"
    r"automatisch antwoord|risposta automatica|fuori (?:sede|ufficio)|resposta automática|"
    r"resposta automatica|fora do escritório|automatiskt svar|automatisk svar|automaattinen vastaus|"
    r"odpowiedź automatyczna|autoodpowiedź|automatická odpověď|автоматический ответ|автоответ|"
    r"otomatik yanıt|automatikus válasz"
)
_OOO_CJK = r"自動応答|自動返信|自动回复|自動回覆|자동 회신|자동 응답"
_OOO_WEAK = r"auto|absence|abwesend|afwezig|ausente|assente|ausência|frånvaro|ooo|on vacation|vacation|不在"
_OOO_SUBJECT = re.compile(_OPEN + rf"(?:(?:{_OOO_STRONG}){_END}|(?:{_OOO_CJK})|(?:{_OOO_WEAK}){_REPLY})")
_RECEIPT_STRONG = (
    r"read receipt|return receipt|read report|read notification|lesebestätigung|accusé de lecture|"
    r"confirmación de lectura|conferma di lettura|leesbevestiging|confirmação de leitura|läskvitto"
)
_RECEIPT_WEAK = (
    r"read|not read|gelesen|nicht gelesen|lu|non lu|leído|leido|letto|gelezen|lido|läst|læst|lest|"
    r"luettu|przeczytano|přečteno|прочитано|okundu|olvasott|已读|已讀|開封済み|開封確認"
)
_RECEIPT_SUBJECT = re.compile(_OPEN + rf"(?:(?:{_RECEIPT_STRONG}){_END}|(?:{_RECEIPT_WEAK}){_REPLY})")
_SUBJECT_NOISE = re.compile(r"^(?:[*!\s]+|\[postmaster\]\s*)+", re.I)


def automatic_reason(signals: HeaderSignals, envelope_from: str, *, own_domain: str) -> str | None:
    """Why this message must never be answered, or None for mail a person wrote.

    `envelope_from` is the SMTP MAIL FROM (with or without angle brackets; "" or "<>" is the null
    sender of bounces and RFC 3834 auto-replies). `own_domain` is `MAILGATE_DOMAIN`: our
    `LOOP_HEADER`, or a Message-ID we minted (`is_own_message_id`), means our own mail came back.
    """
    envelope = envelope_from.strip().strip("<>").strip()
    headers = _Headers(signals.fields)
    from_value = signals.from_text
    subject = _SUBJECT_NOISE.sub("", signals.subject.casefold())  # leading "**"/"[Postmaster]" dropped
    return (
        _own_mail(headers, own_domain)
        or _report(headers)
        or _mailer_daemon(envelope, from_value)
        or ("bounce: delivery-failure subject" if _BOUNCE_SUBJECT.search(subject) else None)
        or _bounce_headers(headers)
        or _autoreply_headers(headers)
        or ("auto-reply: out-of-office subject" if _OOO_SUBJECT.search(subject) else None)
        or ("read receipt: subject" if _RECEIPT_SUBJECT.search(subject) else None)
        or _auto_submitted(headers)
        or ("bounce: null envelope sender" if not envelope else None)
        or _postmaster(envelope, from_value)
        or _bulk(headers, envelope)
    )


class _Headers:
    """`Headers.values(name)` for one message, from its index."""

    def __init__(self, index: Mapping[str, list[str]]) -> None:
        self.index = index

    def __call__(self, name: str) -> list[str]:
        return self.index.get(name.lower(), [])


def is_own_message_id(message_id: str, own_domain: str) -> bool:
    """Is `message_id` one mailgate minted: `<anything.mailgate@own_domain>` (or a subdomain)?

    Only that shape counts, not every id on the domain: when `MAILGATE_DOMAIN` is the users' own
    domain, their clients (Apple Mail, Thunderbird) mint ids on it too, and those are not loops.
    """
    local, _, domain = message_id.strip().strip("<>").rpartition("@")
    domain = domain.strip().lower().rstrip(".")
    own = own_domain.strip().lower().strip(".")
    on_domain = bool(own) and (domain == own or domain.endswith("." + own))
    return on_domain and local.lower().endswith(OWN_MESSAGE_ID_SUFFIX)


def _own_mail(headers: _Headers, own_domain: str) -> str | None:
    if headers(LOOP_HEADER):
        return f"loop: our own mail ({LOOP_HEADER})"
    if any(is_own_message_id(value, own_domain) for value in headers("Message-ID")):
        return "loop: our own mail (Message-ID)"
    return None


def _report(headers: _Headers) -> str | None:
    for value in headers("Content-Type"):
        lowered = value.lower()
        media = lowered.split(";", 1)[0].strip()
        if media in _REPORT_PARTS:
            return _REPORT_PARTS[media]
        if media == "multipart/report":
            found = re.search(r"report-type\s*=\s*\"?\s*([a-z0-9._-]+)", lowered)
            report_type = found.group(1) if found else ""
            return _REPORTS.get(
                report_type, f"report: multipart/report {report_type or 'without report-type'}"
            )
    return None


def _mailer_daemon(envelope: str, from_value: str) -> str | None:
    if _MAILER_DAEMON.search(envelope):
        return "bounce: envelope sender MAILER-DAEMON"
    if _MAILER_DAEMON.search(from_value):
        return "bounce: From MAILER-DAEMON"
    return None


def _bounce_headers(headers: _Headers) -> str | None:
    if headers("X-Failed-Recipients"):
        return "bounce: X-Failed-Recipients"
    if any(v.strip().lower() == "true" for v in headers("X-MS-Exchange-Message-Is-Ndr")):
        return "bounce: X-MS-Exchange-Message-Is-Ndr"
    return None


def _autoreply_headers(headers: _Headers) -> str | None:
    for name in _AUTOREPLY_HEADERS:
        values = headers(name)
        if values and any(v.strip().lower() not in ("no", "false", "0") for v in values):
            return f"auto-reply: {_display(name)}"
    if any(v.strip().lower() == "reply" for v in headers("X-Autogenerated")):
        return "auto-reply: X-Autogenerated: Reply"
    if any(v.strip().lower() in _BULK_PRECEDENCE for v in headers("X-Precedence")):
        return "auto-reply: X-Precedence"
    if any(_VACATION_MAILER.search(v) for v in headers("X-Mailer")):
        return "auto-reply: vacation X-Mailer"
    return None


def _auto_submitted(headers: _Headers) -> str | None:
    for value in headers("Auto-Submitted"):
        keyword = re.split(r"[\s;(]", value.strip().lower(), maxsplit=1)[0]
        if keyword and keyword != "no":
            kind = "auto-reply" if keyword == "auto-replied" else "automatic"
            return f"{kind}: Auto-Submitted {keyword}"
    return None


def _postmaster(envelope: str, from_value: str) -> str | None:
    if _POSTMASTER.search(envelope.partition("@")[0]) or _POSTMASTER.search(from_value):
        return "bounce: postmaster sender"
    return None


def _bulk(headers: _Headers, envelope: str) -> str | None:
    for value in headers("Precedence"):
        keyword = value.strip().lower().split(";")[0].strip()
        if keyword in _BULK_PRECEDENCE:
            return f"bulk: Precedence: {keyword}"
    for name in _LIST_HEADERS:
        if headers(name):
            return f"bulk: mailing list ({name})"
    if headers("X-Loop"):
        return "loop: X-Loop"
    if _LIST_ENVELOPE.match(envelope):
        return "bulk: mailing-list envelope sender"
    return None


def _display(name: str) -> str:
    return "-".join("X" if part == "x" else part.capitalize() for part in name.split("-"))


#: More Message-IDs than this in `References` is a loop between automated systems, not a conversation.
MAX_REFERENCES = 100


def long_chain(references: Sequence[str]) -> str | None:
    """ "loop: ..." when a References chain is longer than any conversation between people gets (two
    systems answering each other), else None. `references` may be capped above MAX_REFERENCES."""
    if len(references) > MAX_REFERENCES:
        return f"loop: References holds more than {MAX_REFERENCES} Message-IDs ({len(references)} read)"
    return None


# --- allow-list and budget -----------------------------------------------------------------------


def sender_allowed(addr: str, allowed: Sequence[str]) -> bool:
    """Is `addr` on the allow-list `allowed` (`MAILGATE_ALLOWED_SENDERS`)?

    Entries: `user@example.com` (that address, case-insensitive), `@example.com` (any address at
    exactly that domain; subdomains are NOT included) and `*` (anyone). An empty or domain-less
    `addr` is never allowed, not even by `*`. Domains compare in their IDNA form (`mächine.example`
    is `xn--mchine-bua.example`).
    """
    local, at, domain = addr.strip().lower().rpartition("@")
    if not at or not local or not domain:
        return False
    domain = ascii_domain(domain)
    for entry in allowed:
        entry_local, entry_at, entry_domain = entry.strip().lower().rpartition("@")
        if entry.strip() == "*" or (
            entry_at and ascii_domain(entry_domain) == domain and entry_local in ("", local)
        ):
            return True
    return False


def requested_budget(local_part_tag: str | None, default: str, max_budget: str) -> str:
    """The budget for a new task: the `+tag` of `alias+tag@domain` if it names one, else `default`.

    Either way capped at `max_budget` (low < standard < high < unlimited), so `unlimited` is only
    granted when `max_budget` is `unlimited`. Tags are case-insensitive; any other tag (a reply
    token, a typo) means `default`. Raises ValueError if `default` or `max_budget` is not a budget.
    """
    for name, value in (("default", default), ("max_budget", max_budget)):
        if value not in BUDGETS:
            raise ValueError(f"{name} must be one of {', '.join(BUDGETS)}, got {value!r}")
    tag = (local_part_tag or "").strip().lower()
    wanted = tag if tag in BUDGETS else default
    return BUDGETS[min(BUDGETS.index(wanted), BUDGETS.index(max_budget))]


def asked_budget(local_part_tag: str | None) -> str | None:
    """The budget the `+tag` of `alias+tag@domain` names, or None when it names none. Kept with a new
    task so its replies can say so when `requested_budget` gave it less (and why)."""
    tag = (local_part_tag or "").strip().lower()
    return tag if tag in BUDGETS else None
