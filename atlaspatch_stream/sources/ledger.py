"""The daemon's ledger: one SQLite record per slide, so that no slide is lost or repeated across restarts.

Layout (reference `service-and-daemon.md` §2):

- **Rules** are pure functions from a record (and what was observed) to a `Change`; they are tested without a
  database: `observe`, `vanish`, `reconcile` (start-up and rescans), `on_done`, `on_error` (error classes and full-jitter
  backoff), `settings_change`, `requeue`, `release`, `resume`, `due`.
- **`_Store`** applies rules on one `sqlite3` connection inside `BEGIN IMMEDIATE` transactions and answers the
  status queries.
- **`Ledger`** is the async face: a dedicated writer thread owns the connection (as aiosqlite does) and runs each
  command as one short transaction; async callers wait on an event the thread sets through the loop's token.
- **`read_status`, `requeue_slides`, `retry_quarantined`** are synchronous, for `atlaspatch status`: readers open
  `mode=ro`; the two admin commands take their own short write transaction (WAL lets them run beside the daemon).

States: `seen → ready → running → done | failed | quarantined`, plus `deferred` (a system error; never charged to
the slide) and `missing` (the source was deleted; the record and the H5 are kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import queue
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import anyio
import orjson
from anyio import from_thread
from anyio.lowlevel import current_token

from ..config import PipelineConfig, WatchConfig, geometry_fingerprint
from ..errors import AtlasPatchError
from .clock import Clock, SystemClock
from .complete import SlideKind
from .naming import unique_stem

__all__ = [
    "LEDGER_FILE",
    "Change",
    "ErrorKind",
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
    "classify_error",
    "due",
    "needs_rerun",
    "observe",
    "on_done",
    "on_error",
    "read_status",
    "reconcile",
    "release",
    "requeue",
    "requeue_slides",
    "requeue_outputs",
    "resume",
    "retry_quarantined",
    "settings_change",
    "vanish",
]

State = Literal["seen", "ready", "running", "done", "failed", "quarantined", "deferred", "missing"]
STATES: tuple[str, ...] = get_args(State)
ErrorKind = Literal["slide", "transient", "system", "incomplete"]
SCHEMA_VERSION = 1
LEDGER_FILE = "ledger.sqlite3"  # inside the state folder (`WatchConfig.state_path`), on a local disk
BUSY_TIMEOUT_MS = 5000
T = TypeVar("T")


class LedgerError(AtlasPatchError):
    """The ledger cannot be read or written (disk full, I/O error, a newer schema): the daemon must stop."""


# ---------------------------------------------------------------------------------------------------------------
# Records and rules (pure)


@dataclass(frozen=True)
class Settings:
    """The output-shaping settings a slide was (or is to be) processed with.

    Attributes:
        geometry_fp: `config.geometry_fingerprint(...)`: patch size, magnification, segmenter, thresholds.
        encoders: the feature extractors requested.
    """

    geometry_fp: str
    encoders: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: PipelineConfig, segmenter_sha256: str | None) -> Settings:
        """The settings of a run: its geometry fingerprint (as stored in every H5) and its encoders."""
        return cls(geometry_fingerprint(config, segmenter_sha256), tuple(config.encode.extractors))

    @property
    def fingerprint(self) -> str:
        """One stable hash of both."""
        payload = orjson.dumps([self.geometry_fp, sorted(self.encoders)])
        return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class Observation:
    """A slide as a scan (or an event) saw it.

    Attributes:
        slide_id: path relative to the watch root (NFC, `/`).
        source: the same path as it is spelled on disk (used to open it).
        kind: "file", "dicom" or "mrxs".
        size: bytes over all member files.
        mtime_ns: newest member mtime.
        stem: the natural output stem (`Path.stem`, or the DICOM folder's name).
        fingerprint: the quick fingerprint, when it was computed (otherwise size and mtime decide).
        pseudonym: the slide's keyed hash when pseudonymisation is on; it then also names the output.
    """

    slide_id: str
    source: str
    kind: SlideKind
    size: int
    mtime_ns: int
    stem: str
    fingerprint: str | None = None
    pseudonym: str | None = None


@dataclass(frozen=True)
class SlideRecord:
    """One slide's row in the ledger."""

    slide_id: str
    source: str
    kind: SlideKind
    state: State
    version: int = 1
    size: int = 0
    mtime_ns: int = 0
    fingerprint: str | None = None
    attempts: int = 0
    transient: int = 0  # uncharged retries in a row; only their backoff grows
    next_attempt_at: float | None = None
    error_kind: str | None = None
    error_msg: str | None = None
    stem: str = ""
    output_stem: str | None = None
    output_h5: str | None = None
    settings_fp: str | None = None
    geometry_fp: str | None = None
    encoders: tuple[str, ...] = ()
    pseudonym: str | None = None
    prior_state: str | None = None  # the state a missing slide had before it vanished
    ready_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    row_id: int | None = None

    @property
    def display(self) -> str:
        """The name for logs and metrics: the pseudonym when there is one."""
        return self.pseudonym or self.slide_id


@dataclass(frozen=True)
class Change:
    """One transition: the record before (None for a new slide), after, and why (for the events table)."""

    before: SlideRecord | None
    after: SlideRecord
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def from_state(self) -> str | None:
        """The state before, if any."""
        return self.before.state if self.before is not None else None


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of slide errors: full-jitter exponential backoff, then quarantine."""

    max_attempts: int = 3
    base_s: float = 60.0
    factor: float = 4.0
    max_s: float = 21600.0

    @classmethod
    def from_config(cls, watch: WatchConfig) -> RetryPolicy:
        """From a `WatchConfig`."""
        return cls(watch.max_attempts, watch.backoff_base_s, watch.backoff_factor, watch.backoff_max_s)


def backoff_s(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter: uniform(0, min(max, base × factor^(attempt-1))) seconds (AWS's "full jitter")."""
    ceiling = min(policy.max_s, policy.base_s * policy.factor ** max(0, attempt - 1))
    return rng.uniform(0.0, ceiling)


def _with(record: SlideRecord, now: float, **changes: Any) -> SlideRecord:
    return dataclasses.replace(record, updated_at=now, **changes)


def _fresh(record: SlideRecord, now: float, **changes: Any) -> SlideRecord:
    """Back to `seen` with a clean slate: no attempts, no error, no due time."""
    return _with(
        record, now, state="seen", attempts=0, transient=0, next_attempt_at=None, error_kind=None, error_msg=None,
        ready_at=None, started_at=None, **changes,
    )


def classify_change(record: SlideRecord, obs: Observation) -> Literal["same", "touched", "changed"]:
    """Did the file change? Same size and mtime: "same"; only the mtime moved and the fingerprint matches: "touched"."""
    if obs.size == record.size and obs.mtime_ns == record.mtime_ns:
        return "same"
    if obs.size == record.size and obs.fingerprint is not None and obs.fingerprint == record.fingerprint:
        return "touched"
    return "changed"


def observe(record: SlideRecord | None, obs: Observation, now: float) -> Change | None:
    """A slide seen by a scan: new, changed, touched, back from missing, or nothing to do.

    A record still `seen` (arriving) takes new sizes quietly; any later state sees a change as a new version that
    goes back to `seen` (a re-scanned glass under the same name is re-processed and its H5 rebuilt).
    """
    if record is None:
        after = SlideRecord(
            slide_id=obs.slide_id, source=obs.source, kind=obs.kind, state="seen", size=obs.size,
            mtime_ns=obs.mtime_ns, fingerprint=obs.fingerprint, stem=obs.stem, pseudonym=obs.pseudonym,
            created_at=now, updated_at=now,
        )
        return Change(None, after, "discovered")
    verdict = classify_change(record, obs)
    identity = {"size": obs.size, "mtime_ns": obs.mtime_ns, "source": obs.source}
    if record.state == "missing":
        if verdict != "changed" and record.prior_state == "done":
            return Change(record, _with(record, now, state="done", prior_state=None, **identity), "reappeared unchanged")
        return Change(record, _fresh(record, now, version=record.version + 1, prior_state=None, **identity), "reappeared")
    if verdict == "same":
        return None
    if verdict == "touched":
        return Change(record, _with(record, now, **identity), "touched (same content)")
    if record.state == "seen":
        return Change(record, _with(record, now, **identity), "still arriving")
    after = _fresh(record, now, version=record.version + 1, fingerprint=obs.fingerprint, **identity)
    return Change(record, after, f"changed while {record.state}")


def vanish(record: SlideRecord, now: float) -> Change | None:
    """The source is gone: keep the record (and its H5), mark it `missing`."""
    if record.state == "missing":
        return None
    after = _with(record, now, state="missing", prior_state=record.state, next_attempt_at=None)
    return Change(record, after, "source deleted")


def needs_rerun(record: SlideRecord, settings: Settings) -> tuple[str, ...] | None:
    """What a `done` slide lacks under `settings`: None (nothing), ("geometry",) or the missing encoders."""
    if record.geometry_fp != settings.geometry_fp:
        return ("geometry",)
    missing = tuple(sorted(set(settings.encoders) - set(record.encoders)))
    return missing or None


def settings_change(record: SlideRecord, settings: Settings, now: float) -> Change | None:
    """Re-queue what new settings need: a `done` slide that lacks something; a quarantined slide gets a new chance."""
    if record.settings_fp == settings.fingerprint:
        return None
    if record.state == "done":
        lacking = needs_rerun(record, settings)
        if lacking is None:
            return None
        after = _with(record, now, state="ready", attempts=0, transient=0, ready_at=now, error_kind=None, error_msg=None)
        return Change(record, after, "settings changed", {"needs": list(lacking)})
    if record.state == "quarantined":
        return Change(record, _fresh(record, now), "settings changed: retried")
    return None


def release(record: SlideRecord, now: float, reason: str = "interrupted; no attempt charged") -> Change | None:
    """A `running` slide whose processing was stopped (shutdown, crash) goes back to `ready`, uncharged."""
    if record.state != "running":
        return None
    return Change(record, _with(record, now, state="ready", started_at=None, ready_at=record.ready_at or now), reason)


def resume(record: SlideRecord, now: float) -> Change | None:
    """A `deferred` slide (system error) goes back to `ready` once the system recovered."""
    if record.state != "deferred":
        return None
    return Change(record, _with(record, now, state="ready", ready_at=now), "system recovered")


def due(record: SlideRecord, now: float) -> Change | None:
    """A `failed` slide whose retry time has come goes back to `seen` (re-checked, then queued)."""
    if record.state != "failed" or record.next_attempt_at is None or record.next_attempt_at > now:
        return None
    return Change(record, _with(record, now, state="seen", next_attempt_at=None, ready_at=None), "retry due")


def requeue(record: SlideRecord, now: float) -> Change:
    """An operator's `--requeue SLIDE` / `--retry-quarantined`: back to `seen` with its attempts forgotten.

    Raises:
        ValueError: the slide is running now, or its source is missing.
    """
    if record.state == "running":
        raise ValueError(f"{record.slide_id}: running now; requeue it after it finishes")
    if record.state == "missing":
        raise ValueError(f"{record.slide_id}: its source is missing")
    return Change(record, _fresh(record, now), "requeued by operator")


def _settings_fields(record: SlideRecord, settings: Settings) -> dict[str, Any]:
    same_geometry = record.geometry_fp == settings.geometry_fp
    encoders = set(settings.encoders) | (set(record.encoders) if same_geometry else set())
    return {"settings_fp": settings.fingerprint, "geometry_fp": settings.geometry_fp, "encoders": tuple(sorted(encoders))}


def on_done(record: SlideRecord, output_h5: str, settings: Settings, now: float) -> Change:
    """Processing finished: `done` with its output and the settings that made it (a missing slide stays missing)."""
    common = {"output_h5": output_h5, "finished_at": now, "error_kind": None, "error_msg": None, "transient": 0,
              "next_attempt_at": None, **_settings_fields(record, settings)}
    if record.state == "missing":
        return Change(record, _with(record, now, prior_state="done", **common), "finished after its source vanished")
    return Change(record, _with(record, now, state="done", **common), "done")


def on_error(
    record: SlideRecord, kind: ErrorKind, message: str, now: float, policy: RetryPolicy, rng: random.Random,
    settings: Settings | None = None,
) -> Change:
    """A failure, by class (reference §2.3).

    - slide (corrupt, unsupported, no tissue, no magnification; or a broken completeness check): one attempt
      charged; `failed` with a full-jitter backoff, or `quarantined` once `max_attempts` are used.
    - incomplete (quiet but never complete): `quarantined` at once; a change to the file brings it back.
    - transient (vanished, I/O error on a share): `failed` with a backoff on the uncharged count; never quarantined.
    - system (disk full, output unwritable, device lost): `deferred`, uncharged; the caller pauses intake.
    """
    detail = {"kind": kind, "message": message}
    base: dict[str, Any] = {"error_kind": kind, "error_msg": message, "started_at": None}
    if settings is not None:
        base["settings_fp"] = settings.fingerprint
    if record.state == "missing":
        return Change(record, _with(record, now, **base), f"{kind} error after its source vanished", detail)
    if kind == "system":
        return Change(record, _with(record, now, state="deferred", **base), "system error: deferred", detail)
    if kind == "transient":
        count = record.transient + 1
        delay = backoff_s(count, policy, rng)
        after = _with(record, now, state="failed", transient=count, next_attempt_at=now + delay, **base)
        return Change(record, after, "transient error: retry, not charged", {**detail, "retry_in_s": round(delay, 3)})
    attempts = record.attempts + 1
    if kind == "incomplete" or attempts >= policy.max_attempts:
        after = _with(record, now, state="quarantined", attempts=attempts, transient=0, next_attempt_at=None, **base)
        return Change(record, after, f"quarantined after {attempts} attempt(s)", detail)
    delay = backoff_s(attempts, policy, rng)
    after = _with(record, now, state="failed", attempts=attempts, transient=0, next_attempt_at=now + delay, **base)
    return Change(record, after, f"attempt {attempts} failed", {**detail, "retry_in_s": round(delay, 3)})


def reconcile(
    records: Iterable[SlideRecord], scanned: Mapping[str, Observation], now: float, *,
    startup: bool, settings: Settings | None = None,
) -> list[Change]:
    """Merge a full scan into the ledger (reference §1.4).

    Args:
        records: the ledger's records (at least every one that may change; others are simply untouched).
        scanned: what the scan found, by slide ID.
        now: the time of the scan.
        startup: also apply the start-up rules: `running` (left by a crash) back to `ready` without charging an
            attempt, and `deferred` back to `ready` (the restart is the probe).
        settings: when given, re-queue what these settings need (`settings_change`).

    Returns:
        The changes, in order; several may concern one slide (each applies to the previous one's `after`).
    """
    changes: list[Change] = []
    known: dict[str, SlideRecord] = {}

    def step(change: Change | None) -> None:
        if change is not None:
            changes.append(change)
            known[change.after.slide_id] = change.after

    for record in records:
        known[record.slide_id] = record
        if startup:
            step(release(record, now, "interrupted by a stop or crash; no attempt charged"))
            step(resume(known[record.slide_id], now))
    for slide_id in sorted(scanned):  # sorted: within one scan, the first to claim a stem is deterministic
        step(observe(known.get(slide_id), scanned[slide_id], now))
    for slide_id in list(known):
        if slide_id not in scanned:
            step(vanish(known[slide_id], now))
    if settings is not None:
        for slide_id in list(known):
            step(settings_change(known[slide_id], settings, now))
    return changes


# ---------------------------------------------------------------------------------------------------------------
# Error classes

_SYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_TRANSIENT_ERRNOS = frozenset({
    errno.ENOENT, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ECONNRESET,
    errno.EHOSTDOWN, errno.ENOTCONN, errno.EBUSY,
})
_SYSTEM_TEXT = ("no space left on device", "disk quota exceeded", "read-only file system", "errno = 28",
                "cuda error", "device-side assert", "cudaerrordevicesunavailable", "device lost", "nvml")
_TRANSIENT_TEXT = ("stale file handle", "input/output error", "no such file or directory", "vanished",
                   "resource temporarily unavailable", "timed out", "errno = 5")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _under(path: Any, root: Path | None) -> bool:
    if root is None or not path:
        return False
    with contextlib.suppress(TypeError, ValueError, OSError):
        return Path(os.fspath(path)).resolve().is_relative_to(Path(root).resolve())
    return False


def classify_error(exc: BaseException | None = None, message: str = "", *, output_root: Path | None = None) -> ErrorKind:
    """Class a failure: "system" (never the slide's fault), "transient" (retry uncharged) or "slide".

    Looks at errno values through the exception chain first, then at the message text (h5py and the readers often
    lose the errno but keep its words). EACCES/EPERM count as system only on a path under `output_root`.
    """
    for item in _chain(exc):
        code = getattr(item, "errno", None)
        if code in _SYSTEM_ERRNOS or (code in _ACCESS_ERRNOS and _under(getattr(item, "filename", None), output_root)):
            return "system"
        if code in _TRANSIENT_ERRNOS or isinstance(item, TimeoutError):
            return "transient"
    text = " ".join([message, *(str(e) for e in _chain(exc))]).lower()
    if any(needle in text for needle in _SYSTEM_TEXT):
        return "system"
    if any(needle in text for needle in _TRANSIENT_TEXT):
        return "transient"
    return "slide"


# ---------------------------------------------------------------------------------------------------------------
# Status


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


# ---------------------------------------------------------------------------------------------------------------
# The store: rules applied on one connection

_COLUMNS = [f.name for f in dataclasses.fields(SlideRecord) if f.name != "row_id"]
_SCHEMA = f"""
CREATE TABLE slides (
    id INTEGER PRIMARY KEY,
    slide_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    version INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    fingerprint TEXT,
    attempts INTEGER NOT NULL,
    transient INTEGER NOT NULL,
    next_attempt_at REAL,
    error_kind TEXT,
    error_msg TEXT,
    stem TEXT NOT NULL,
    output_stem TEXT UNIQUE,
    output_h5 TEXT,
    settings_fp TEXT,
    geometry_fp TEXT,
    encoders TEXT NOT NULL,
    pseudonym TEXT,
    prior_state TEXT,
    ready_at REAL,
    started_at REAL,
    finished_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX slides_queue ON slides (state, ready_at, id);
CREATE INDEX slides_due ON slides (state, next_attempt_at);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    slide_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    ts REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_state ON events (to_state, id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _row_to_record(row: sqlite3.Row) -> SlideRecord:
    values = {name: row[name] for name in _COLUMNS}
    values["encoders"] = tuple(orjson.loads(values["encoders"]))
    return SlideRecord(row_id=row["id"], **values)


def _record_values(record: SlideRecord) -> list[Any]:
    values = [getattr(record, name) for name in _COLUMNS]
    values[_COLUMNS.index("encoders")] = orjson.dumps(list(record.encoders)).decode()
    return values


def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        _create_private(Path(path))
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not read_only:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _create_private(path: Path) -> None:
    """Create the database file 0640 before SQLite does: SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o640)
    try:
        # Owner read-write, group read at most (whatever the umask allowed), never anything for others.
        os.fchmod(fd, (os.fstat(fd).st_mode & 0o640) | 0o600)
    finally:
        os.close(fd)


class _Store:
    """The rules applied on one connection; every public method is one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # -- schema

    def migrate(self) -> None:
        """Create the schema, or check that an existing one is ours.

        Raises:
            LedgerError: the ledger was written by a newer schema.
        """
        with self.transaction():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"ledger schema {version} is newer than this atlaspatch ({SCHEMA_VERSION})")
            if version == 0:
                # One statement at a time: executescript() would commit the open transaction first.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.conn.execute(statement)
                self.conn.execute("INSERT INTO meta VALUES ('created_with_schema', ?)", (str(SCHEMA_VERSION),))
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error): the write lock up front, so no upgrade deadlock."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- reads

    def get(self, slide_id: str) -> SlideRecord | None:
        """The record of one slide."""
        row = self.conn.execute("SELECT * FROM slides WHERE slide_id = ?", (slide_id,)).fetchone()
        return _row_to_record(row) if row is not None else None

    def where(self, clause: str, params: Sequence[Any] = (), limit: int | None = None) -> list[SlideRecord]:
        """Records matching an SQL condition, in queue order."""
        sql = f"SELECT * FROM slides WHERE {clause} ORDER BY ready_at, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_record(r) for r in self.conn.execute(sql, tuple(params))]

    def counts(self) -> dict[str, int]:
        """Slides per state, every state present."""
        found = dict(self.conn.execute("SELECT state, COUNT(*) FROM slides GROUP BY state").fetchall())
        return {state: int(found.get(state, 0)) for state in STATES}

    def status(self) -> LedgerStatus:
        """Counts, in flight, the last 10 failures, quarantined and deferred slides."""
        failures = [
            FailureEvent(r["slide_id"], r["ts"], r["to_state"], *_kind_message(r["detail"]))
            for r in self.conn.execute(
                "SELECT slide_id, ts, to_state, detail FROM events "
                "WHERE to_state IN ('failed', 'quarantined', 'deferred') ORDER BY id DESC LIMIT 10"
            )
        ]
        return LedgerStatus(
            counts=self.counts(),
            in_flight=self.where("state = 'running'"),
            failures=failures,
            quarantined=self.where("state = 'quarantined'"),
            deferred=self.where("state = 'deferred'"),
        )

    def next_due(self) -> float | None:
        """The earliest retry time of a `failed` slide."""
        return self.conn.execute("SELECT MIN(next_attempt_at) FROM slides WHERE state = 'failed'").fetchone()[0]

    def events(self, slide_id: str) -> list[dict[str, Any]]:
        """The audit trail of one slide, oldest first."""
        rows = self.conn.execute("SELECT * FROM events WHERE slide_id = ? ORDER BY id", (slide_id,))
        return [{**dict(r), "detail": orjson.loads(r["detail"])} for r in rows]

    # -- writes

    def _taken(self, slide_id: str) -> Callable[[str], bool]:
        def taken(stem: str) -> bool:
            row = self.conn.execute("SELECT slide_id FROM slides WHERE output_stem = ?", (stem,)).fetchone()
            return row is not None and row[0] != slide_id

        return taken

    def apply(self, changes: Iterable[Change]) -> list[Change]:
        """Write each change's `after` and one event; new slides get a collision-free output stem."""
        applied: list[Change] = []
        for change in changes:
            after = change.after
            if after.output_stem is None:
                wanted = after.pseudonym or after.stem
                after = dataclasses.replace(after, output_stem=unique_stem(after.slide_id, wanted, self._taken(after.slide_id)))
            placeholders = ", ".join("?" for _ in _COLUMNS)
            updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "slide_id")
            cursor = self.conn.execute(
                f"INSERT INTO slides ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
                f"ON CONFLICT (slide_id) DO UPDATE SET {updates} RETURNING id",
                _record_values(after),
            )
            after = dataclasses.replace(after, row_id=cursor.fetchone()[0])
            self.conn.execute(
                "INSERT INTO events (slide_id, version, ts, from_state, to_state, reason, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (after.slide_id, after.version, after.updated_at, change.from_state, after.state, change.reason,
                 orjson.dumps(dict(change.detail)).decode()),
            )
            applied.append(dataclasses.replace(change, after=after))
        return applied

    def one(self, slide_id: str, rule: Callable[[SlideRecord], Change | None]) -> Change | None:
        """Apply `rule` to one slide's record in one transaction."""
        with self.transaction():
            record = self.get(slide_id)
            change = rule(record) if record is not None else None
            return self.apply([change])[0] if change is not None else None

    def many(self, clause: str, params: Sequence[Any], rule: Callable[[SlideRecord], Change | None],
             limit: int | None = None) -> list[Change]:
        """Apply `rule` to every matching record in one transaction."""
        with self.transaction():
            changes = [c for c in (rule(r) for r in self.where(clause, params, limit)) if c is not None]
            return self.apply(changes)

    def reconcile(self, scanned: Mapping[str, Observation], now: float, *, startup: bool,
                  settings: Settings | None) -> list[Change]:
        """`reconcile` over the records that can change: the light identity columns decide which to load."""
        with self.transaction():
            light = self.conn.execute("SELECT slide_id, state, size, mtime_ns, settings_fp FROM slides").fetchall()
            wanted = set(scanned) - {r[0] for r in light}
            for slide_id, state, size, mtime_ns, settings_fp in light:
                obs = scanned.get(slide_id)
                if obs is None:
                    if state != "missing":
                        wanted.add(slide_id)
                elif state == "missing" or (obs.size, obs.mtime_ns) != (size, mtime_ns):
                    wanted.add(slide_id)
                if startup and state in ("running", "deferred"):
                    wanted.add(slide_id)
                if settings is not None and state in ("done", "quarantined") and settings_fp != settings.fingerprint:
                    wanted.add(slide_id)
            records = [r for r in (self.get(s) for s in sorted(wanted)) if r is not None]
            # Only the loaded records and their observations: an unloaded record is unchanged by construction.
            subset = {s: scanned[s] for s in wanted if s in scanned}
            changes = reconcile(records, subset, now, startup=startup, settings=settings)
            return self.apply(changes)


def _kind_message(detail: str) -> tuple[str | None, str | None]:
    data = orjson.loads(detail) if detail else {}
    return data.get("kind"), data.get("message")


# ---------------------------------------------------------------------------------------------------------------
# The async ledger: a dedicated writer thread


class _Writer:
    """One thread that owns the connection; commands arrive on a queue and each result goes back to its caller."""

    def __init__(self, path: Path) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[_Store], Any], Callable[[Any, BaseException | None], None]] | None] = queue.SimpleQueue()
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(path,), name="atlaspatch-ledger", daemon=True)
        self._thread.start()

    def _main(self, path: Path) -> None:
        try:
            store = _Store(_connect(path))
            store.migrate()
        except BaseException as exc:  # reported to the opener, then the thread ends
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            while (item := self._queue.get()) is not None:
                command, reply = item
                try:
                    result = command(store)
                except BaseException as exc:  # delivered to the caller, who raises it
                    reply(None, exc)
                else:
                    reply(result, None)
        finally:
            store.conn.close()

    def wait_open(self) -> BaseException | None:
        """Block until the connection is open; the error if it failed."""
        self._opened.wait()
        return self._open_error

    def submit(self, command: Callable[[_Store], Any], reply: Callable[[Any, BaseException | None], None]) -> None:
        """Queue one command."""
        self._queue.put((command, reply))

    def stop(self) -> None:
        """Ask the thread to finish after the commands already queued."""
        self._queue.put(None)

    def join(self) -> None:
        """Wait for the thread to end."""
        self._thread.join()


class Ledger:
    """The async ledger. Open with `async with Ledger.open(path) as ledger:`.

    Every method is one short transaction on the writer thread; callers on the event loop never block. A
    cancelled caller stops waiting, but a command already queued still runs (the write is not torn).

    Args:
        writer: the started writer thread (use `open`).
        clock: the time source for every record.
        policy: retry policy for slide errors.
        rng: randomness for the backoff jitter (seed it in tests).
    """

    def __init__(self, writer: _Writer, clock: Clock, policy: RetryPolicy, rng: random.Random) -> None:
        self._writer = writer
        self._clock = clock
        self._policy = policy
        self._rng = rng
        self._closed = False
        self.settings: Settings | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock | None = None, policy: RetryPolicy | None = None,
                   rng: random.Random | None = None) -> AsyncIterator[Ledger]:
        """Open (creating it 0640, WAL mode) the ledger at `path`; closes the writer thread on exit.

        Raises:
            LedgerError: the database cannot be opened or has a newer schema.
        """
        limiter = anyio.CapacityLimiter(1)
        writer = _Writer(Path(path))
        error = await anyio.to_thread.run_sync(writer.wait_open, limiter=limiter)
        if error is not None:
            await anyio.to_thread.run_sync(writer.join, limiter=limiter)
            if isinstance(error, LedgerError):
                raise error
            raise LedgerError(f"cannot open the ledger {path}: {error}") from error
        ledger = cls(writer, clock or SystemClock(), policy or RetryPolicy(), rng or random.Random())
        try:
            yield ledger
        finally:
            ledger._closed = True
            writer.stop()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(writer.join, limiter=limiter)

    async def _run(self, command: Callable[[_Store], T]) -> T:
        if self._closed:
            raise LedgerError("the ledger is closed")
        token = current_token()
        done = anyio.Event()
        box: list[Any] = []

        def reply(result: Any, error: BaseException | None) -> None:
            box.extend((result, error))
            with contextlib.suppress(from_thread.RunFinishedError):
                from_thread.run_sync(done.set, token=token)

        self._writer.submit(command, reply)
        await done.wait()
        result, error = box
        if isinstance(error, sqlite3.Error):
            raise LedgerError(f"ledger write failed: {error}") from error
        if error is not None:
            raise error
        return result

    # -- the watcher's commands

    async def reconcile(self, scanned: Mapping[str, Observation], *, startup: bool = False,
                        settings: Settings | None = None) -> list[Change]:
        """Merge a full scan (see `reconcile`); with `settings`, also remember them for later errors."""
        if settings is not None:
            self.settings = settings
        now = self._clock.now()
        return await self._run(lambda s: s.reconcile(scanned, now, startup=startup, settings=settings))

    async def observe(self, obs: Observation) -> Change | None:
        """One slide seen by an event or a targeted look."""
        now = self._clock.now()

        def command(store: _Store) -> Change | None:
            with store.transaction():
                change = observe(store.get(obs.slide_id), obs, now)
                return store.apply([change])[0] if change is not None else None

        return await self._run(command)

    async def mark_ready(self, slide_id: str, size: int, mtime_ns: int, fingerprint: str) -> Change | None:
        """A `seen` slide passed the quiet period and its completeness check: `ready`, with its final identity."""
        now = self._clock.now()

        def rule(r: SlideRecord) -> Change | None:
            if r.state != "seen":
                return None
            after = _with(r, now, state="ready", size=size, mtime_ns=mtime_ns, fingerprint=fingerprint, ready_at=now)
            return Change(r, after, "settled and complete")

        return await self._run(lambda s: s.one(slide_id, rule))

    async def take_next(self) -> Change | None:
        """The oldest `ready` slide, now `running` (FIFO by ready time); None when none is ready."""
        now = self._clock.now()

        def command(store: _Store) -> Change | None:
            with store.transaction():
                rows = store.where("state = 'ready'", limit=1)
                if not rows:
                    return None
                change = Change(rows[0], _with(rows[0], now, state="running", started_at=now), "sent to the pipeline")
                return store.apply([change])[0]

        return await self._run(command)

    async def finish_done(self, slide_id: str, version: int, output_h5: str, settings: Settings) -> Change | None:
        """The pipeline finished a slide. A result for an older version (the file changed meanwhile) is ignored."""
        now = self._clock.now()

        def rule(r: SlideRecord) -> Change | None:
            return on_done(r, output_h5, settings, now) if r.version == version else None

        return await self._run(lambda s: s.one(slide_id, rule))

    async def finish_error(self, slide_id: str, version: int, kind: ErrorKind, message: str) -> Change | None:
        """The pipeline (or the completeness check) failed a slide; see `on_error` for what each class does."""
        now = self._clock.now()

        def rule(r: SlideRecord) -> Change | None:
            if r.version != version:
                return None
            return on_error(r, kind, message, now, self._policy, self._rng, self.settings)

        return await self._run(lambda s: s.one(slide_id, rule))

    async def release(self, slide_id: str) -> Change | None:
        """One slide taken but never processed (its send was cancelled): back to `ready`, uncharged."""
        now = self._clock.now()
        return await self._run(lambda s: s.one(slide_id, lambda r: release(r, now)))

    async def release_running(self) -> list[Change]:
        """Shutdown: every `running` slide back to `ready`, uncharged (call under a shielded scope)."""
        now = self._clock.now()
        return await self._run(lambda s: s.many("state = 'running'", (), lambda r: release(r, now)))

    async def resume_deferred(self) -> list[Change]:
        """The system recovered: every `deferred` slide back to `ready`."""
        now = self._clock.now()
        return await self._run(lambda s: s.many("state = 'deferred'", (), lambda r: resume(r, now)))

    async def promote_due(self) -> list[Change]:
        """`failed` slides whose retry time has come go back to `seen`."""
        now = self._clock.now()
        return await self._run(
            lambda s: s.many("state = 'failed' AND next_attempt_at <= ?", (now,), lambda r: due(r, now))
        )

    async def requeue(self, slide_ids: Sequence[str]) -> list[Change]:
        """Operator: these slides back to `seen` with attempts forgotten (ValueError for running/missing/unknown)."""
        now = self._clock.now()
        return await self._run(lambda s: _requeue(s, slide_ids, now))

    async def retry_quarantined(self) -> list[Change]:
        """Operator: every quarantined slide back to `seen`."""
        now = self._clock.now()
        return await self._run(lambda s: s.many("state = 'quarantined'", (), lambda r: requeue(r, now)))

    # -- queries

    async def identities(self) -> dict[str, tuple[str, int, int]]:
        """Every slide's (state, size, mtime_ns): what a rescan compares before reading any file."""
        return await self._run(lambda s: {r[0]: (r[1], r[2], r[3]) for r in s.conn.execute(
            "SELECT slide_id, state, size, mtime_ns FROM slides")})

    async def get(self, slide_id: str) -> SlideRecord | None:
        """One slide's record."""
        return await self._run(lambda s: s.get(slide_id))

    async def in_state(self, state: State, limit: int | None = None) -> list[SlideRecord]:
        """Records in one state, in queue order."""
        return await self._run(lambda s: s.where("state = ?", (state,), limit))

    async def counts(self) -> dict[str, int]:
        """Slides per state."""
        return await self._run(lambda s: s.counts())

    async def status(self) -> LedgerStatus:
        """The `atlaspatch status` view."""
        return await self._run(lambda s: s.status())

    async def next_due(self) -> float | None:
        """The earliest retry time of a `failed` slide."""
        return await self._run(lambda s: s.next_due())

    async def events(self, slide_id: str) -> list[dict[str, Any]]:
        """The audit trail of one slide."""
        return await self._run(lambda s: s.events(slide_id))


def _requeue(store: _Store, slide_ids: Sequence[str], now: float) -> list[Change]:
    with store.transaction():
        changes = []
        for slide_id in slide_ids:
            record = store.get(slide_id)
            if record is None:
                raise ValueError(f"{slide_id}: no such slide in the ledger")
            changes.append(requeue(record, now))
        return store.apply(changes)


# ---------------------------------------------------------------------------------------------------------------
# Synchronous entry points for `atlaspatch status`


@contextlib.contextmanager
def _store(path: Path, *, read_only: bool) -> Iterator[_Store]:
    if read_only and not Path(path).exists():
        raise LedgerError(f"no ledger at {path}")
    try:
        conn = _connect(Path(path), read_only=read_only)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open the ledger {path}: {exc}") from exc
    try:
        store = _Store(conn)
        if not read_only:
            store.migrate()
        yield store
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path}: {exc}") from exc
    finally:
        conn.close()


def read_status(path: Path) -> LedgerStatus:
    """The status of the ledger at `path`, through a read-only connection (safe beside a running daemon).

    Raises:
        LedgerError: no ledger there, or it cannot be read.
    """
    with _store(path, read_only=True) as store:
        return store.status()


def requeue_slides(path: Path, slide_ids: Sequence[str], *, clock: Clock | None = None) -> list[Change]:
    """`atlaspatch status OUTPUT --requeue SLIDE`: back to `seen`, attempts forgotten; the daemon picks them up at
    its next rescan.

    Raises:
        ValueError: a slide is unknown, running or missing (nothing is changed then).
        LedgerError: the ledger cannot be written.
    """
    now = (clock or SystemClock()).now()
    with _store(path, read_only=False) as store:
        return _requeue(store, slide_ids, now)


def retry_quarantined(path: Path, *, clock: Clock | None = None) -> list[Change]:
    """`atlaspatch watch --retry-quarantined`: every quarantined slide back to `seen`."""
    now = (clock or SystemClock()).now()
    with _store(path, read_only=False) as store:
        return store.many("state = 'quarantined'", (), lambda r: requeue(r, now))


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
