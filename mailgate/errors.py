"""The exceptions mailgate raises, and what each one means to a peer.

```
MailgateError
├── ConfigError              -> exit 78 at start-up, every bad key named
├── StartupError             -> exit 3 (port in use, store unusable)
├── TransientError           -> SMTP 451 4.x.x / retry with backoff (`retry_after`: the peer's hint)
│   ├── ApiUnavailable       (transport errors, timeouts, 5xx, 429, 409, redirects)
│   │   │                     `maybe_sent`: the request may have reached the API (reconcile first);
│   │   │                     `answered`: the API sent a response, so it is done with the request
│   │   └── ApiUnauthorized  (401: hold every queue, never tell senders)
│   ├── StoreBusy            (the store: locked, disk full, I/O error, database unreachable)
│   ├── LeaseLost            (PostgreSQL: another gateway has taken over a row this one claimed)
│   └── DeliveryDeferred     (relay 4xx, connection errors)
└── PermanentError           -> SMTP 5xx / a notice to the sender
    ├── MessageRejected      (policy: who, what, how big) carries the SMTP reply
    ├── BadToken             (a recipient's reply token does not verify)
    ├── ApiRejected          (400/402/403/404/422) carries the status and the API's reason
    ├── TooLarge             (a download past its limit)
    ├── DownloadRefused      (an output file mailgate may not fetch) carries the reason for the reader
    ├── RawMissing           (a message's raw bytes are gone: pruned, or the store was edited)
    ├── TargetNotEmpty       (`mailgate copy`: the PostgreSQL database already holds a gateway's state)
    ├── SourceInUse          (`mailgate copy`: a gateway still runs on the SQLite file)
    └── DeliveryFailed       (relay 5xx) `too_large`: the relay refused the message's size
```

Foreign exceptions (httpx, sqlite3, psycopg, aiosmtplib) are translated into these at one boundary each
(`api`, `store`, `delivery.transports`). A peer never sees exception text: SMTP replies are chosen by
class.
"""

from __future__ import annotations

from collections.abc import Iterable


class MailgateError(Exception):
    """Base of every error mailgate raises on purpose."""


class ConfigError(MailgateError):
    """The configuration is unusable. `problems` names every bad key with the reason."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StartupError(MailgateError):
    """The gateway cannot start (port in use, store unusable): exit 3."""


class TransientError(MailgateError):
    """Worth trying again later. `retry_after` (seconds) is a hint from the peer, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApiUnavailable(TransientError):
    """The API could not be reached or asked us to come back later.

    `maybe_sent=False`: nothing was created (connect error, pool timeout, 429, 409, a redirect): send it
    again. `maybe_sent=True`: the request may have reached the server: reconcile before any re-POST.
    `answered`: the server sent a response, so it is done with the request (nothing is still in flight).
    """

    def __init__(
        self,
        message: str,
        *,
        maybe_sent: bool = True,
        answered: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.maybe_sent = maybe_sent
        self.answered = answered


class ApiUnauthorized(ApiUnavailable):
    """The API key is missing, wrong or revoked: an operator problem, not a sender's."""

    def __init__(self, message: str) -> None:
        super().__init__(message, maybe_sent=False, answered=True)


class StoreBusy(TransientError):
    """The store could not read or commit (locked, disk full, I/O error, database unreachable)."""


class LeaseLost(TransientError):
    """A change to a claimed row was refused: this gateway's lease on it ran out and another gateway
    claimed it (PostgreSQL only). Nothing was written; the other gateway carries on from the last
    committed state, so the work in hand is dropped, not retried."""


class DeliveryDeferred(TransientError):
    """The relay answered 4xx or the connection failed."""


class PermanentError(MailgateError):
    """Trying again will not help."""


class MessageRejected(PermanentError):
    """Policy refuses a message. `code` and `status` form the SMTP reply, `reason` is safe to show;
    `why` names the decision in one fixed word (for metrics and logs, see `models.SmtpReply`)."""

    def __init__(self, code: int, status: str, reason: str, *, why: str = "") -> None:
        super().__init__(f"{code} {status} {reason}")
        self.code = code
        self.status = status
        self.reason = reason
        self.why = why


class BadToken(PermanentError):
    """A recipient carries something shaped like a reply token that does not verify."""


class ApiRejected(PermanentError):
    """The API refused the request: `status` is the HTTP status, `reason` the API's own words."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class TooLarge(PermanentError):
    """A download exceeded its limit. `size` is the declared size, or the bytes seen when it was cut."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"download of at least {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class DownloadRefused(PermanentError):
    """An output file's URL is not one mailgate fetches (another host, a private address, a redirect to
    another site, not http(s)). `reason` is for the reply's reader: "not fetched: ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RawMissing(PermanentError):
    """A message's raw bytes are not in the store (pruned after the retention time, or edited away)."""


class TargetNotEmpty(PermanentError):
    """`mailgate copy`: the PostgreSQL database already holds a gateway's state."""


class SourceInUse(PermanentError):
    """`mailgate copy`: a gateway still runs on the SQLite file (it holds the store's lock)."""


class DeliveryFailed(PermanentError):
    """The relay refused the message permanently (5xx). `too_large`: for its size (552, or the enhanced
    status 5.3.4 / 5.2.3), so a smaller version of the same message may still go through."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large
