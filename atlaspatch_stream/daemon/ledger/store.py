"""The ledger's SQL: the rules of `states` applied on one `sqlite3` connection, each command one `BEGIN IMMEDIATE`
transaction (WAL, `busy_timeout`; the database file created 0640 before SQLite does)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from ...errors import AtlasPatchError
from ..naming import unique_stem
from .states import STATES, Change, Observation, Settings, SlideRecord, reconcile, requeue

SCHEMA_VERSION = 1
LEDGER_FILE = "ledger.sqlite3"  # inside the state folder (`WatchConfig.state_path`), on a local disk
BUSY_TIMEOUT_MS = 5000


class LedgerError(AtlasPatchError):
    """The ledger cannot be read or written (disk full, I/O error, a newer schema): the daemon must stop."""


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


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection to the ledger at `path`: `mode=ro` for readers; WAL and NORMAL sync for the writer."""
    if read_only:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        _create_private(Path(path))
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row  # the busy timeout is set by connect(timeout=...)
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


class Store:
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

    def recent_failures(self, limit: int = 10) -> list[tuple[str, float, str, dict[str, Any]]]:
        """The last `limit` transitions to failed, quarantined or deferred, newest first: (slide, ts, state, detail)."""
        rows = self.conn.execute(
            "SELECT slide_id, ts, to_state, detail FROM events "
            "WHERE to_state IN ('failed', 'quarantined', 'deferred') ORDER BY id DESC LIMIT ?", (int(limit),)
        )
        return [(r["slide_id"], r["ts"], r["to_state"], orjson.loads(r["detail"]) if r["detail"] else {}) for r in rows]

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
        """Apply `rule` to every matching record (the first `limit`, in queue order) in one transaction."""
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

    def requeue(self, slide_ids: Sequence[str], now: float) -> list[Change]:
        """Operator: these slides back to `seen` with attempts forgotten (all or nothing).

        Raises:
            ValueError: a slide is unknown, running or missing.
        """
        with self.transaction():
            changes = []
            for slide_id in slide_ids:
                record = self.get(slide_id)
                if record is None:
                    raise ValueError(f"{slide_id}: no such slide in the ledger")
                changes.append(requeue(record, now))
            return self.apply(changes)


def open_store(path: Path) -> Store:
    """Open (creating and migrating) the read-write store at `path`; on the thread that will use it."""
    store = Store(connect(Path(path)))
    try:
        store.migrate()
    except BaseException:
        store.conn.close()
        raise
    return store
