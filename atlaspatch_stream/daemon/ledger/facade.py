"""The async ledger: every command one short transaction on the ledger's own `WriterThread`, which owns the
connection (as aiosqlite does); callers on the event loop never block, and a cancelled caller still waits for a
command in progress, so a write is never torn."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio

from ...items import Failure
from ...outputs.h5thread import WriterThread
from ..clock import Clock, SystemClock
from .holder import hold
from .states import (
    Change,
    Observation,
    RetryPolicy,
    Settings,
    SlideRecord,
    State,
    due,
    observe,
    on_done,
    on_error,
    release,
    requeue,
    resume,
    with_,
)
from .store import LedgerError, Store, open_store

T = TypeVar("T")


class Ledger:
    """The async ledger. Open with `async with Ledger.open(path) as ledger:`.

    Every method is one short transaction on the writer thread; callers on the event loop never block. A
    cancelled caller waits for its command in progress to finish (the write is not torn).

    Args:
        writer: the started writer thread (use `open`).
        store: the store opened on that thread.
        limiter: one token: at most one caller waits on the writer thread at a time.
        clock: the time source for every record.
        policy: retry policy for slide errors.
        rng: randomness for the backoff jitter (seed it in tests).
    """

    def __init__(self, writer: WriterThread, store: Store, limiter: anyio.CapacityLimiter, clock: Clock,
                 policy: RetryPolicy, rng: random.Random) -> None:
        self._writer = writer
        self._store = store
        self._limiter = limiter
        self._clock = clock
        self._policy = policy
        self._rng = rng
        self._closed = False
        self.settings: Settings | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock | None = None, policy: RetryPolicy | None = None,
                   rng: random.Random | None = None) -> AsyncIterator[Ledger]:
        """Open (creating it 0640, WAL mode) the ledger at `path`, holding its lock (`holder`) until exit, when the
        writer thread is closed too.

        Raises:
            LedgerError: a live daemon holds the ledger, or the database cannot be opened or has a newer schema.
        """
        path = Path(path)
        limiter = anyio.CapacityLimiter(1)
        claim = await anyio.to_thread.run_sync(hold, path, limiter=limiter)
        try:
            writer = WriterThread("atlaspatch-ledger")
            try:
                store = await writer.acall(open_store, path, limiter=limiter)
            except BaseException as exc:
                writer.stop()
                if isinstance(exc, sqlite3.Error | OSError):
                    raise LedgerError(f"cannot open the ledger {path}: {exc}") from exc
                raise
            ledger = cls(writer, store, limiter, clock or SystemClock(), policy or RetryPolicy(), rng or random.Random())
            try:
                yield ledger
            finally:
                ledger._closed = True
                with anyio.CancelScope(shield=True):
                    await writer.acall(store.conn.close, limiter=limiter)
                    writer.stop()
                    await anyio.to_thread.run_sync(writer.join, limiter=limiter)
        finally:
            claim.release()

    async def _run(self, command: Callable[[Store], T]) -> T:
        """Run `command` on the writer thread as one short transaction; sqlite errors become `LedgerError`."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        try:
            return await self._writer.acall(command, self._store, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from exc

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

        def command(store: Store) -> Change | None:
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
            after = with_(r, now, state="ready", size=size, mtime_ns=mtime_ns, fingerprint=fingerprint, ready_at=now)
            return Change(r, after, "settled and complete")

        return await self._run(lambda s: s.one(slide_id, rule))

    async def take_next(self) -> Change | None:
        """The oldest `ready` slide, now `running` (FIFO by ready time); None when none is ready."""
        now = self._clock.now()

        def take(r: SlideRecord) -> Change:
            return Change(r, with_(r, now, state="running", started_at=now), "sent to the pipeline")

        taken = await self._run(lambda s: s.many("state = 'ready'", (), take, limit=1))
        return taken[0] if taken else None

    async def finish_done(self, slide_id: str, version: int, output_h5: str, settings: Settings) -> Change | None:
        """The pipeline finished a slide. A result for an older version (the file changed meanwhile) is ignored."""
        now = self._clock.now()

        def rule(r: SlideRecord) -> Change | None:
            return on_done(r, output_h5, settings, now) if r.version == version else None

        return await self._run(lambda s: s.one(slide_id, rule))

    async def finish_error(self, slide_id: str, version: int, failure: Failure, message: str) -> Change | None:
        """The pipeline (or the completeness check) failed a slide; see `on_error` for what each class does."""
        now = self._clock.now()

        def rule(r: SlideRecord) -> Change | None:
            if r.version != version:
                return None
            return on_error(r, failure, message, now, self._policy, self._rng, self.settings)

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

    async def in_state(self, state: State) -> list[SlideRecord]:
        """Records in one state, in queue order."""
        return await self._run(lambda s: s.where("state = ?", (state,)))

    async def counts(self) -> dict[str, int]:
        """Slides per state."""
        return await self._run(lambda s: s.counts())

    async def next_due(self) -> float | None:
        """The earliest retry time of a `failed` slide."""
        return await self._run(lambda s: s.next_due())

    async def events(self, slide_id: str) -> list[dict[str, Any]]:
        """The audit trail of one slide."""
        return await self._run(lambda s: s.events(slide_id))
