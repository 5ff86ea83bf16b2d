"""The store: every hand-off between mailgate's stages is a committed row here.

`Store` (`base`) is the protocol the stages use: named reads, claims and named state changes, each one
transaction. Two backends implement it: `sqlite.SqliteStore` (the embedded default) and
`postgres.PostgresStore` (several gateways on one database; imported only when asked for, since its
driver is an extra). `schema` holds SQLite's tables, versions and the row types, `reads` the synchronous
SQL that runs on SQLite's reader thread; `probe` reads an SQLite store's version without changing
anything; `lock` keeps one gateway per SQLite store; `pg_schema` and `pg_reads` are PostgreSQL's. `copy`
moves a gateway's state from SQLite to PostgreSQL. Nothing outside this package writes SQL. `spool`
is the other hand-off, on disk: a message's files between the step that reads it and the one that posts.
"""

from mailgate.store.base import Queue, Store
from mailgate.store.lock import InstanceLock, holder
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import (
    Admitted,
    BounceRow,
    InboundRow,
    NewBounce,
    NewMessage,
    NewReply,
    NewTask,
    OutboxRow,
    Problem,
    Pruned,
    SuppressionRow,
    TaskListing,
    TaskRow,
)
from mailgate.store.sqlite import SqliteStore, probe

__all__ = [
    "AdmissionFacts",
    "Admitted",
    "BounceRow",
    "InboundRow",
    "InstanceLock",
    "NewBounce",
    "NewMessage",
    "NewReply",
    "NewTask",
    "OutboxRow",
    "Problem",
    "Pruned",
    "Queue",
    "SqliteStore",
    "Store",
    "SuppressionRow",
    "TaskListing",
    "TaskRow",
    "holder",
    "probe",
]
