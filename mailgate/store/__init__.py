"""The store: every hand-off between mailgate's stages is a committed row here.

`Store` (SQLite, `sqlite`) is the async face: named reads and named state changes, each one
transaction. `schema` holds the tables, their versions and the row types; `reads` the synchronous SQL
that runs on the reader's thread; `probe` reads a store's version without changing anything; `lock`
keeps one gateway per store. Nothing outside this package writes SQL.
"""

from mailgate.store.lock import InstanceLock, holder
from mailgate.store.reads import AdmissionFacts
from mailgate.store.schema import (
    Admitted,
    InboundRow,
    NewMessage,
    NewReply,
    NewTask,
    OutboxRow,
    Problem,
    TaskListing,
    TaskRow,
)
from mailgate.store.sqlite import Store, probe

__all__ = [
    "AdmissionFacts",
    "Admitted",
    "InboundRow",
    "InstanceLock",
    "NewMessage",
    "NewReply",
    "NewTask",
    "OutboxRow",
    "Problem",
    "Store",
    "TaskListing",
    "TaskRow",
    "holder",
    "probe",
]
