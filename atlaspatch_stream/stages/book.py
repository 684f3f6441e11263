"""`SlideBook`: admission, what each slide holds, and the single place a slide's final result is issued and counted."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ..errors import PipelineFull, failure_message, failure_of, is_bug
from ..items import Failure, SlideJob, SlideResult, Status, Totals
from ..protocols import Lock, SlideHandle

log = logging.getLogger(__name__)

@dataclass
class Tally:
    """Running totals of final results: the one place slide statuses are counted."""

    finished: int = 0
    patches: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: SlideResult) -> None:
        """Count one final result."""
        self.finished += 1
        self.by_status[result.status] = self.by_status.get(result.status, 0) + 1
        if result.status in ("done", "reused") and result.num_patches:
            self.patches += int(result.num_patches)

    def totals(self) -> Totals:
        """Totals, throughput and elapsed time."""
        elapsed = time.perf_counter() - self.started
        return Totals(finished=self.finished, by_status=dict(self.by_status), patches=self.patches,
                      patches_per_s=self.patches / elapsed if elapsed > 0 else 0.0, elapsed_s=elapsed)


@dataclass
class _Entry:
    job: SlideJob
    started: float
    handle: SlideHandle | None = None
    lock: Lock | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)


class SlideBook:
    """Admits slides up to `max_open`, keeps their handle and lock, and releases both exactly once.

    Every job handed to the pipeline gets exactly one `SlideResult`, sent by `finish()` (admitted slides) or
    `reject()` (jobs that never started: withdrawn by their caller, cancelled because intake stopped, collisions).
    Handles are closed and locks released in a worker thread under `limiter`.
    """

    def __init__(self, results: MemoryObjectSendStream[SlideResult], max_open: int,
                 limiter: anyio.CapacityLimiter,
                 on_systemic: Callable[[Failure], None] | None = None) -> None:
        self._results = results
        self.on_systemic = on_systemic
        self._slots = anyio.Semaphore(max_open)
        self._entries: dict[int, _Entry] = {}
        self._withdrawn: set[int] = set()
        self._limiter = limiter
        self.stop_reason: str | None = None
        self.tally = Tally()

    # -- admission ------------------------------------------------------------------------------------------------

    async def admit(self, job: SlideJob) -> bool:
        """Wait for a free slot, then register the slide; False (and a `cancelled` result) when it must not start."""
        if not await self._may_start(job):
            return False
        await self._slots.acquire()
        if not await self._may_start(job):
            self._slots.release()
            return False
        self._entries[job.slide_id] = _Entry(job, time.perf_counter())
        return True

    async def _may_start(self, job: SlideJob) -> bool:
        if job.slide_id in self._withdrawn:
            self._withdrawn.discard(job.slide_id)
            await self.reject(job, "cancelled", "withdrawn by its caller before it started")
            return False
        if self.stop_reason is not None:
            await self.reject(job, "cancelled", f"not started: {self.stop_reason}")
            return False
        return True

    def withdraw(self, job: SlideJob) -> bool:
        """Withdraw a job that has not started (it will not be opened); False when it is already in flight."""
        if job.slide_id in self._entries:
            return False
        self._withdrawn.add(job.slide_id)
        return True

    def stop_intake(self, reason: str) -> None:
        """From now on no slide starts: every job not yet admitted finishes `cancelled` ("not started: <reason>")."""
        if self.stop_reason is None:
            self.stop_reason = reason

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def attach(self, job: SlideJob, *, handle: SlideHandle | None = None, lock: Lock | None = None) -> None:
        """Record a handle or lock the slide now holds (released by `finish`)."""
        entry = self._entries[job.slide_id]
        entry.handle = handle if handle is not None else entry.handle
        entry.lock = lock if lock is not None else entry.lock

    def time(self, job: SlideJob, stage: str, seconds: float) -> None:
        """Add busy seconds of `stage` to the slide's timings."""
        entry = self._entries.get(job.slide_id)
        if entry is not None:
            entry.timings[stage] = entry.timings.get(stage, 0.0) + seconds

    def note(self, job: SlideJob, **notes: object) -> None:
        """Attach facts for the run report to the slide's result (e.g. patch counts, decode routes)."""
        entry = self._entries.get(job.slide_id)
        if entry is not None:
            entry.notes.update(notes)

    def admitted(self, job: SlideJob) -> bool:
        """Whether the slide is in flight (admitted and not yet finished)."""
        return job.slide_id in self._entries

    def holds_lock(self, job: SlideJob) -> bool:
        """Whether the slide holds its lock (new or extended files; not slides skipped before locking)."""
        entry = self._entries.get(job.slide_id)
        return entry is not None and entry.lock is not None

    @property
    def in_flight(self) -> int:
        """Slides admitted and not yet finished."""
        return len(self._entries)

    # -- the end of a slide ---------------------------------------------------------------------------------------

    async def finish(self, job: SlideJob, status: Status, *, h5_path: Path | None = None,
                     num_patches: int | None = None, message: str = "", features: tuple[str, ...] = (),
                     failure: Failure | None = None) -> None:
        """Release what the slide holds and send its result. A second call for the same slide is ignored."""
        entry = self._entries.pop(job.slide_id, None)
        if entry is None:
            return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_release, entry, limiter=self._limiter)
            self._slots.release()
            entry.timings["total"] = time.perf_counter() - entry.started
            await self._send(SlideResult(job=job, status=status, h5_path=h5_path, num_patches=num_patches,
                                         message=message, features=features, timings=entry.timings, failure=failure,
                                         notes=entry.notes))

    async def fail(self, job: SlideJob, failure: Failure, message: str) -> None:
        """Finish a slide as failed.

        A systemic failure (full disk, read-only output, a failed device) is also handed to `on_systemic`, which
        decides what the run does about it (`process` stops starting slides; a daemon pauses intake).
        """
        await self.finish(job, "failed", message=message, failure=failure)
        if failure.systemic and self.on_systemic is not None:
            self.on_systemic(failure)

    async def fail_on(self, job: SlideJob, stage: str, exc: BaseException) -> None:
        """Finish a slide whose `stage` raised `exc`: typed by `failure_of`, described in one line. A bug (`is_bug`)
        is raised again instead: it stops the run."""
        if is_bug(exc):
            raise exc
        await self.fail(job, failure_of(exc, stage), failure_message(job.name, exc))

    async def reject(self, job: SlideJob, status: Status, message: str, failure: Failure | None = None) -> None:
        """The result of a job that never started (nothing to release)."""
        with anyio.CancelScope(shield=True):
            await self._send(SlideResult(job=job, status=status, message=message, failure=failure))

    def reject_nowait(self, job: SlideJob, status: Status, message: str, failure: Failure | None = None) -> None:
        """`reject()` without waiting; raises `PipelineFull` when the results backlog is full."""
        result = SlideResult(job=job, status=status, message=message, failure=failure)
        try:
            self._results.send_nowait(result)
        except anyio.WouldBlock:
            raise PipelineFull("the pipeline's results backlog is full") from None
        self.tally.add(result)

    async def _send(self, result: SlideResult) -> None:
        self.tally.add(result)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._results.send(result)

    async def heartbeat(self) -> None:
        """Refresh the lock of every slide in flight (another host judges a lock by its age)."""
        locks = [e.lock for e in self._entries.values() if e.lock is not None]
        if locks:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_beat, locks, limiter=self._limiter)

    async def release_all(self) -> list[SlideResult]:
        """On cancellation: release every handle and lock still held; return (and count) their `cancelled` results.

        The results are not sent: the run is being torn down, and the caller reports them.
        """
        entries, self._entries = list(self._entries.values()), {}
        results = []
        with anyio.CancelScope(shield=True):
            for entry in entries:
                await anyio.to_thread.run_sync(_release, entry, limiter=self._limiter)
                result = SlideResult(job=entry.job, status="cancelled", message="interrupted before it finished",
                                     timings=entry.timings, notes=entry.notes)
                self.tally.add(result)
                results.append(result)
        return results

    async def aclose(self) -> None:
        """Close the results stream (after every stage has ended)."""
        await self._results.aclose()


def _beat(locks: list[Lock]) -> None:
    for lock in locks:
        try:
            lock.heartbeat()
        except Exception as exc:  # noqa: BLE001 - a failed touch is retried at the next beat; the slide goes on
            log.warning("heartbeat of a slide lock failed: %s", exc)


def _release(entry: _Entry) -> None:
    """Close the handle and release the lock; neither may stop the other, nor the run."""
    if entry.handle is not None:
        with contextlib.suppress(Exception):
            entry.handle.close()
    if entry.lock is not None:
        with contextlib.suppress(Exception):
            entry.lock.release()
