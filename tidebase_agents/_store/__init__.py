"""Persistence: one store per backend behind one interface. Never imports the engine or the SDK.

``base`` defines the interface and what both backends share, ``postgres`` and ``sqlite`` the
fenced writes each backend makes its own way, ``queue`` the queue operations, ``rewind`` the
operator's fork and reset, ``sql`` the named statements, ``tables`` the SQLAlchemy models,
``records`` what goes in and out.
"""

from .base import RUN_COUNT_KEYS, USAGE_GROUP_KEYS, Listener, Store
from .queue import DEFAULT_QUEUE, Backoff
from .records import (
    Acquired,
    ApprovalRecord,
    Claim,
    Event,
    EventRecord,
    Lease,
    MessageRecord,
    NewRun,
    QueuedRun,
    ReconcileReport,
    RunCursor,
    RunPage,
    RunRecord,
    StateVersion,
    StepRecord,
    StepsReset,
    UsageRecord,
    utcnow,
)
from .registry import close_stores, get_store

__all__ = [
    "DEFAULT_QUEUE",
    "RUN_COUNT_KEYS",
    "USAGE_GROUP_KEYS",
    "Acquired",
    "ApprovalRecord",
    "Backoff",
    "Claim",
    "Event",
    "EventRecord",
    "Lease",
    "Listener",
    "MessageRecord",
    "NewRun",
    "QueuedRun",
    "ReconcileReport",
    "RunCursor",
    "RunPage",
    "RunRecord",
    "StateVersion",
    "StepRecord",
    "StepsReset",
    "Store",
    "UsageRecord",
    "close_stores",
    "get_store",
    "utcnow",
]
