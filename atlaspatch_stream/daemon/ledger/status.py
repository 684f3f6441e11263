"""What `atlaspatch status` shows, and the operator's synchronous commands beside a running daemon.

Readers open the ledger `mode=ro`; `requeue_slides` and `requeue_outputs` take their own short write transaction
(WAL lets them run beside the daemon, which picks the slides up at its next rescan).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..clock import Clock, SystemClock
from .states import Change, SlideRecord, requeue
from .store import LedgerError, Store, connect, open_store


@dataclass(frozen=True)
class FailureEvent:
    """One failure from the events table."""

    slide_id: str
    ts: float
    state: str
    kind: str | None
    message: str | None


@dataclass(frozen=True)
class LedgerStatus:
    """What `atlaspatch status` shows.

    Attributes:
        counts: slides per state (every state present, zeros included).
        in_flight: the `running` records.
        failures: the last 10 failures, newest first.
        quarantined: every quarantined record.
        deferred: every deferred record (waiting for the system to recover).
    """

    counts: dict[str, int]
    in_flight: list[SlideRecord]
    failures: list[FailureEvent]
    quarantined: list[SlideRecord]
    deferred: list[SlideRecord]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (for `--json`)."""
        def brief(r: SlideRecord) -> dict[str, Any]:
            return {"slide": r.slide_id, "state": r.state, "attempts": r.attempts, "error_kind": r.error_kind,
                    "error": r.error_msg, "started_at": r.started_at, "updated_at": r.updated_at}

        return {
            "counts": self.counts,
            "in_flight": [brief(r) for r in self.in_flight],
            "failures": [dataclasses.asdict(f) for f in self.failures],
            "quarantined": [brief(r) for r in self.quarantined],
            "deferred": [brief(r) for r in self.deferred],
        }


@contextlib.contextmanager
def _store(path: Path, *, read_only: bool) -> Iterator[Store]:
    if read_only and not Path(path).exists():
        raise LedgerError(f"no ledger at {path}")
    try:
        store = Store(connect(Path(path), read_only=True)) if read_only else open_store(Path(path))
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open the ledger {path}: {exc}") from exc
    try:
        yield store
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path}: {exc}") from exc
    finally:
        store.conn.close()


def read_status(path: Path) -> LedgerStatus:
    """The status of the ledger at `path`, through a read-only connection (safe beside a running daemon).

    Raises:
        LedgerError: no ledger there, or it cannot be read.
    """
    with _store(path, read_only=True) as store:
        failures = [FailureEvent(slide_id, ts, state, detail.get("kind"), detail.get("message"))
                    for slide_id, ts, state, detail in store.recent_failures(10)]
        return LedgerStatus(
            counts=store.counts(),
            in_flight=store.where("state = 'running'"),
            failures=failures,
            quarantined=store.where("state = 'quarantined'"),
            deferred=store.where("state = 'deferred'"),
        )


def requeue_slides(path: Path, slide_ids: Sequence[str], *, clock: Clock | None = None) -> list[Change]:
    """`atlaspatch status OUTPUT --requeue SLIDE`: back to `seen`, attempts forgotten; the daemon picks them up at
    its next rescan.

    Raises:
        ValueError: a slide is unknown, running or missing (nothing is changed then).
        LedgerError: the ledger cannot be written.
    """
    now = (clock or SystemClock()).now()
    with _store(path, read_only=False) as store:
        return store.requeue(slide_ids, now)


def requeue_outputs(path: Path, stems: Sequence[str], *, clock: Clock | None = None) -> list[Change]:
    """`atlaspatch check OUTPUT --requeue`: the slides whose output stems are `stems` back to `seen` for a retry
    (a slide running now or whose source is missing is left as it is)."""
    now = (clock or SystemClock()).now()
    changes: list[Change] = []
    with _store(path, read_only=False) as store:
        for start in range(0, len(stems), 500):  # SQLite caps the parameters of one statement
            chunk = tuple(stems[start : start + 500])
            marks = ", ".join("?" for _ in chunk)
            changes += store.many(f"output_stem IN ({marks}) AND state NOT IN ('running', 'missing')", chunk,
                                  lambda r: requeue(r, now))
    return changes
