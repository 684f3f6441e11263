"""`SlideBook`: who is in flight, what each holds, and the single place a slide's final result is issued."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectSendStream

from ..items import SlideJob, SlideResult, Status


@dataclass
class _Entry:
    job: SlideJob
    started: float
    handle: Any = None
    lock: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class SlideBook:
    """Admits slides up to `max_open`, keeps their handle and lock, and releases both exactly once.

    `finish()` is the only way a slide leaves the pipeline: it closes the handle and releases the lock in a worker
    thread, frees the slot, and sends the `SlideResult`.
    """

    def __init__(self, results: ObjectSendStream[SlideResult], max_open: int) -> None:
        self._results = results
        self._slots = anyio.Semaphore(max_open)
        self._entries: dict[int, _Entry] = {}
        self.max_open = max_open

    async def admit(self, job: SlideJob) -> None:
        """Wait for a free slot (bounded slides in flight), then register the slide."""
        await self._slots.acquire()
        self._entries[job.slide_id] = _Entry(job, time.perf_counter())

    def attach(self, job: SlideJob, *, handle: Any = None, lock: Any = None) -> None:
        """Record a handle or lock the slide now holds (released by `finish`)."""
        entry = self._entries[job.slide_id]
        entry.handle = handle if handle is not None else entry.handle
        entry.lock = lock if lock is not None else entry.lock

    def active(self, slide_id: int) -> bool:
        """Whether the slide is still in flight."""
        return slide_id in self._entries

    def time(self, job: SlideJob, stage: str, seconds: float) -> None:
        """Add busy seconds of `stage` to the slide's timings."""
        entry = self._entries.get(job.slide_id)
        if entry is not None:
            entry.timings[stage] = entry.timings.get(stage, 0.0) + seconds

    def note(self, job: SlideJob, **extra: Any) -> None:
        """Attach extra facts to the slide's result (e.g. patch counts)."""
        entry = self._entries.get(job.slide_id)
        if entry is not None:
            entry.extra.update(extra)

    @property
    def in_flight(self) -> int:
        """Slides admitted and not yet finished."""
        return len(self._entries)

    async def finish(self, job: SlideJob, status: Status, **kwargs: Any) -> None:
        """Release what the slide holds and send its result. A second call for the same slide is ignored."""
        entry = self._entries.pop(job.slide_id, None)
        if entry is None:
            return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_release, entry)
            self._slots.release()
            entry.timings["total"] = time.perf_counter() - entry.started
            extra = {**entry.extra, **kwargs.pop("extra", {})}
            result = SlideResult(job=job, status=status, timings=entry.timings, extra=extra, **kwargs)
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._results.send(result)

    async def fail(self, job: SlideJob, stage: str, message: str) -> None:
        """Finish a slide as failed in `stage`."""
        await self.finish(job, "failed", message=message, extra={"stage": stage})

    async def release_all(self) -> None:
        """On shutdown: release every handle and lock still held (no results are sent)."""
        entries, self._entries = list(self._entries.values()), {}
        with anyio.CancelScope(shield=True):
            for entry in entries:
                await anyio.to_thread.run_sync(_release, entry)

    async def aclose(self) -> None:
        """Close the results stream (after every stage has ended)."""
        await self._results.aclose()


def _release(entry: _Entry) -> None:
    for closer in (_closer(entry.handle, "close"), _closer(entry.lock, "release")):
        if closer is not None:
            with contextlib.suppress(Exception):
                closer()


def _closer(obj: Any, name: str) -> Callable[[], Any] | None:
    return getattr(obj, name, None) if obj is not None else None
