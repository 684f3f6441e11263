"""Stage `prepare`: SlideJob -> Thumbnail. Reuse check, lock, open, thumbnail; a pool of workers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..errors import SlideError, describe
from ..items import OpenedSlide, Reuse, SlideJob, Thumbnail
from .book import SlideBook
from .workers import run_workers


@dataclass(frozen=True)
class PrepareSettings:
    """What `prepare` needs from the config."""

    workers: int
    needs_thumbnail: bool
    encoders: tuple[str, ...]
    use_ledger: bool  # False for detect-tissue: no locks, no reuse (upstream §1.3)
    skip_existing: bool


async def run(
    receive: ObjectReceiveStream[SlideJob],
    send: ObjectSendStream[Thumbnail],
    *,
    book: SlideBook,
    backends: Any,
    settings: PrepareSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SlideJob -> Thumbnail.

    For each job: wait for a slot (`--max-open-slides`), decide reuse/skip, take the lock, open the slide and build
    its segmentation thumbnail, in worker threads limited by `limiter`. Skipped, locked and failed slides are finished
    here through `book` and send nothing downstream. Closes `send` when `receive` ends; `settings.workers` workers
    share the stream ends (clones). Converts `SlideError` and foreign per-slide exceptions into failures; propagates
    nothing per slide.
    """
    task_status.started()

    async def worker(rx: ObjectReceiveStream[SlideJob], tx: ObjectSendStream[Thumbnail] | None) -> None:
        assert tx is not None
        async with rx, tx:
            async for job in rx:
                await book.admit(job)
                item = await _prepare_one(job, book, backends, settings, limiter)
                if item is not None:
                    await tx.send(item)

    await run_workers(settings.workers, receive, send, worker)


async def _prepare_one(
    job: SlideJob, book: SlideBook, backends: Any, settings: PrepareSettings, limiter: anyio.CapacityLimiter
) -> Thumbnail | None:
    started = time.perf_counter()
    try:
        reuse = await _claim(job, book, backends, settings, limiter)
        if reuse is False:
            return None
        handle = await anyio.to_thread.run_sync(backends.open_slide, job, limiter=limiter)
        book.attach(job, handle=handle)
        opened = OpenedSlide(job, handle, reuse if isinstance(reuse, Reuse) else None)
        image = None
        if settings.needs_thumbnail and opened.reuse is None:
            image = await anyio.to_thread.run_sync(backends.thumbnail, handle, limiter=limiter)
    except SlideError as exc:
        await book.fail(job, "open", exc.one_line() if exc.slide else f"{job.name}: {exc.one_line()}")
        return None
    except Exception as exc:  # noqa: BLE001 - a foreign per-slide failure becomes a record
        await book.fail(job, "open", f"{job.name}: {describe(exc)}")
        return None
    book.time(job, "open", time.perf_counter() - started)
    return Thumbnail(opened, image)


async def _claim(
    job: SlideJob, book: SlideBook, backends: Any, settings: PrepareSettings, limiter: anyio.CapacityLimiter
) -> Reuse | bool:
    """Reuse decision and lock. Returns a `Reuse`, True (process anew) or False (finished here)."""
    if not settings.use_ledger:
        return True
    decision = None
    if settings.skip_existing:
        decision = await anyio.to_thread.run_sync(backends.reuse_decision, job, settings.encoders, limiter=limiter)
        if decision.action == "skip":
            await book.finish(job, "skipped", h5_path=backends.h5_path(job), num_patches=decision.num_patches,
                              message=decision.reason)
            return False
        if decision.action == "mismatch":
            await book.fail(job, "reuse", f"{job.name}: existing output {backends.h5_path(job)} was made with other "
                            f"settings ({decision.reason}); use --force to overwrite it or choose another --output")
            return False
    lock = await anyio.to_thread.run_sync(backends.acquire_lock, job, limiter=limiter)
    if lock is None:
        await book.finish(job, "locked", message=f"locked by another process ({backends.lock_path(job)})")
        return False
    book.attach(job, lock=lock)
    if decision is not None and decision.action == "reuse":
        return Reuse(backends.h5_path(job), decision.num_patches, decision.missing)
    return True
