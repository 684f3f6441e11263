"""The daemon's ledger: one SQLite record per slide, so that no slide is lost or repeated across restarts.

By layer (reference `service-and-daemon.md` §2):
- `states`: the pure state machine and the retry/backoff rules;
- `store`: the SQL, on one `sqlite3` connection;
- `facade`: the async `Ledger`, on its own `WriterThread` (the helper the H5 store uses too);
- `status`: the `atlaspatch status` view and the operator's synchronous commands.

The names below are re-exported so callers import them from `atlaspatch_stream.daemon.ledger`.
"""

from .facade import Ledger
from .states import (
    STATES,
    Change,
    Observation,
    RetryPolicy,
    Settings,
    SlideRecord,
    State,
    backoff_s,
    classify_change,
    due,
    needs_rerun,
    observe,
    on_done,
    on_error,
    reconcile,
    release,
    requeue,
    resume,
    settings_change,
    vanish,
)
from .status import (
    FailureEvent,
    LedgerStatus,
    read_status,
    requeue_outputs,
    requeue_slides,
    retry_quarantined,
)
from .store import LEDGER_FILE, SCHEMA_VERSION, LedgerError

__all__ = [
    "LEDGER_FILE",
    "SCHEMA_VERSION",
    "STATES",
    "Change",
    "FailureEvent",
    "Ledger",
    "LedgerError",
    "LedgerStatus",
    "Observation",
    "RetryPolicy",
    "Settings",
    "SlideRecord",
    "State",
    "backoff_s",
    "classify_change",
    "due",
    "needs_rerun",
    "observe",
    "on_done",
    "on_error",
    "read_status",
    "reconcile",
    "release",
    "requeue",
    "requeue_outputs",
    "requeue_slides",
    "resume",
    "retry_quarantined",
    "settings_change",
    "vanish",
]
