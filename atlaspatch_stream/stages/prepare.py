"""Stage `prepare`: SlideJob -> Thumbnail. Reuse check, lock, open, thumbnail; a pool of workers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import refused
from ..items import OpenedSlide, Reuse, ReuseDecision, SlideJob, Thumbnail
from ..protocols import OutputStore, SlideHandle, SlideSource
from .book import SlideBook
from .workers import run_workers


@dataclass(frozen=True)
class PrepareSettings:
    """What `prepare` needs from the config."""

    workers: int
    encoders: tuple[str, ...]
    skip_existing: bool


async def run(
    receive: MemoryObjectReceiveStream[SlideJob],
    send: MemoryObjectSendStream[Thumbnail],
    *,
    book: SlideBook,
    slides: SlideSource,
    outputs: OutputStore | None,
    settings: PrepareSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """SlideJob -> Thumbnail.

    For each job: wait for a slot (`--max-open-slides`; a job that must not start — withdrawn, or intake stopped — is
    finished `cancelled` by the book), decide skip/reuse, take the lock, open the slide and build its segmentation
    thumbnail, in worker threads limited by `limiter`. `outputs=None` (detect-tissue) means no locks and no reuse, as
    upstream. Skipped, locked and failed slides are finished here and send nothing downstream. Closes `send` when
    `receive` ends; `settings.workers` workers share clones of the stream ends. Per-slide errors become failures;
    bugs propagate.
    """
    task_status.started()

    async def worker(rx: MemoryObjectReceiveStream[SlideJob], tx: MemoryObjectSendStream[Thumbnail]) -> None:
        async with rx, tx:
            async for job in rx:
                if await book.admit(job):
                    item = await _prepare_one(job, book, slides, outputs, settings, limiter)
                    if item is not None:
                        await tx.send(item)

    await run_workers(settings.workers, receive, worker, send)


async def _prepare_one(job: SlideJob, book: SlideBook, slides: SlideSource, outputs: OutputStore | None,
                       settings: PrepareSettings, limiter: anyio.CapacityLimiter) -> Thumbnail | None:
    started = time.perf_counter()
    try:
        decision = await _decide(job, book, outputs, settings, limiter)
        if decision is None:
            return None
        handle = await anyio.to_thread.run_sync(slides.open_slide, job, limiter=limiter)
        book.attach(job, handle=handle)
        if outputs is not None and not await _same_source(job, handle, decision, book, outputs):
            return None
        if decision.action == "skip":
            await book.finish(job, "skipped", h5_path=outputs.h5_path(job) if outputs else None,
                              num_patches=decision.num_patches, message=decision.reason)
            return None
        reuse = (Reuse(outputs.h5_path(job), decision.num_patches, decision.missing)
                 if decision.action == "reuse" and outputs is not None else None)
        image = None if reuse else await anyio.to_thread.run_sync(slides.thumbnail, handle, limiter=limiter)
    except Exception as exc:  # a foreign per-slide failure becomes a record; bugs stop the run
        await book.fail_on(job, "open", exc)
        return None
    book.time(job, "open", time.perf_counter() - started)
    return Thumbnail(OpenedSlide(job, handle, reuse), image)


async def _decide(job: SlideJob, book: SlideBook, outputs: OutputStore | None, settings: PrepareSettings,
                  limiter: anyio.CapacityLimiter) -> ReuseDecision | None:
    """The reuse decision, with the lock taken unless the slide is skipped; None when the slide finished here.

    The decision is made again once the lock is held: another process (a second shard, a resubmitted array task)
    may have finished the slide between the first look and the lock, and must not see it processed twice.
    """
    if outputs is None:
        return ReuseDecision("new")
    if settings.skip_existing:
        decision = await _existing(job, book, outputs, settings, limiter)
        if decision is None or decision.action == "skip":
            return decision
    lock = await anyio.to_thread.run_sync(outputs.acquire_lock, job, limiter=limiter)
    if lock is None:
        await book.finish(job, "locked", message=f"locked by another process ({outputs.lock_path(job)})")
        return None
    book.attach(job, lock=lock)
    if not settings.skip_existing:
        return ReuseDecision("new")
    return await _existing(job, book, outputs, settings, limiter)


async def _existing(job: SlideJob, book: SlideBook, outputs: OutputStore, settings: PrepareSettings,
                    limiter: anyio.CapacityLimiter) -> ReuseDecision | None:
    """What an existing output means for this slide; None (the slide failed) when it was made with other settings."""
    decision = await anyio.to_thread.run_sync(outputs.reuse_decision, job, settings.encoders, limiter=limiter)
    if decision.action == "mismatch":
        await _refuse_reuse(job, book, outputs, f"was made with other settings ({decision.reason})")
        return None
    return decision


async def _same_source(job: SlideJob, handle: SlideHandle, decision: ReuseDecision, book: SlideBook,
                       outputs: OutputStore) -> bool:
    """An existing output is only skipped or extended when it was made from this very slide."""
    if decision.source is None or decision.action not in ("skip", "reuse"):
        return True
    why = decision.source.mismatch(job.recorded_filename, (handle.info.width, handle.info.height))
    if why is None:
        return True
    await _refuse_reuse(job, book, outputs, f"was not made from this slide ({why})")
    return False


async def _refuse_reuse(job: SlideJob, book: SlideBook, outputs: OutputStore, why: str) -> None:
    """Fail a slide whose existing output may be neither skipped nor extended (`why`: how it differs)."""
    await book.fail(job, refused("reuse", "reuse_refused"),
                    f"{job.name}: existing output {outputs.h5_path(job)} {why}; use --force to overwrite it or choose "
                    "another --output")
