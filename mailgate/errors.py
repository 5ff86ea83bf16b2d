"""The exceptions mailgate raises, and what each one means to a peer.

```
MailgateError
├── ConfigError              -> exit 78 at start-up, every bad key named
├── TransientError           -> SMTP 451 4.x.x / retry with backoff
│   ├── ApiUnavailable       (transport errors, timeouts, 5xx, 429, 409)
│   │   └── ApiUnauthorized  (401: hold every queue, never tell senders)
│   ├── StoreBusy
│   └── DeliveryDeferred     (relay 4xx, connection errors)
└── PermanentError           -> SMTP 5xx / a notice to the sender
    ├── MessageRejected      (policy: who, what, how big) carries the SMTP reply
    ├── ApiRejected          (400/402/403/404/422) carries the status and the API's reason
    └── DeliveryFailed       (relay 5xx)
```

Foreign exceptions (httpx, sqlite3, aiosmtplib) are translated into these at one boundary each
(`api`, `store`, `outbound`). A peer never sees exception text: SMTP replies are chosen by class.
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


class TransientError(MailgateError):
    """Worth trying again later. `retry_after` (seconds) is a hint from the peer, if it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApiUnavailable(TransientError):
    """The API could not be reached or asked us to come back later."""


class ApiUnauthorized(ApiUnavailable):
    """The API key is missing, wrong or revoked: an operator problem, not a sender's."""


class StoreBusy(TransientError):
    """The SQLite store could not commit (locked, disk full, I/O error)."""


class DeliveryDeferred(TransientError):
    """The relay answered 4xx or the connection failed."""


class PermanentError(MailgateError):
    """Trying again will not help."""


class MessageRejected(PermanentError):
    """Policy refuses a message. `code` and `status` form the SMTP reply, `reason` is safe to show."""

    def __init__(self, code: int, status: str, reason: str) -> None:
        super().__init__(f"{code} {status} {reason}")
        self.code = code
        self.status = status
        self.reason = reason

    @property
    def smtp_reply(self) -> str:
        return f"{self.code} {self.status} {self.reason}"


class ApiRejected(PermanentError):
    """The API refused the request: `status` is the HTTP status, `reason` the API's own words."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class DeliveryFailed(PermanentError):
    """The relay refused the message permanently (5xx)."""
