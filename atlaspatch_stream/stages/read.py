"""Stage `read`: PatchPlan -> PatchBatch. Pixels of every planned patch at `patch_size`, each tile decoded once."""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..batching import slide_chunk
from ..errors import SlideError, failure_message, failure_of, is_bug
from ..items import PatchBatch, PatchPlan, SlideFailed, WriteItem
from ..protocols import OutputStore, PatchChunks, PixelSource
from .book import SlideBook
from .workers import run_workers


@dataclass(frozen=True)
class ReadSettings:
    """What `read` needs from the config."""

    slides_in_parallel: int
    reader_threads: int
    chunk: int
    patch_size: int
    save_images: bool
    keep_pixels: bool  # False when no encoder runs: only row counts travel on (images are saved here)


async def run(
    receive: MemoryObjectReceiveStream[PatchPlan],
    send: MemoryObjectSendStream[PatchBatch],
    send_write: MemoryObjectSendStream[WriteItem],
    *,
    book: SlideBook,
    pixels: PixelSource,
    outputs: OutputStore,
    settings: ReadSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """PatchPlan -> PatchBatch chunks of one slide (at most `settings.chunk` rows each).

    `settings.slides_in_parallel` workers each read one slide at a time; the backend reader decodes tiles in its own
    threads, and each `next()` of its iterator runs in a worker thread under `limiter`. With `--save-images` the
    PNGs are written here from the same decoded pixels. How each level was decoded (the reader's `routes`: which
    decoder, and why a GPU decoder was not used) is noted on the slide's result. Without encoders
    (`keep_pixels=False`) `send` is the writer's stream and carries only row labels. A slide whose pixels cannot be read sends a `SlideFailed` to the writer
    (which drops its partial file) and the run goes on; bugs propagate. The reader's own threads are stopped on
    failure and cancellation. Closes `send` and `send_write` when `receive` ends.
    """
    task_status.started()

    async def worker(rx: MemoryObjectReceiveStream[PatchPlan], tx: MemoryObjectSendStream[PatchBatch],
                     tx_w: MemoryObjectSendStream[WriteItem]) -> None:
        async with rx, tx, tx_w:
            async for plan in rx:
                failure = await _read_one(plan, tx, book, pixels, outputs, settings, limiter)
                if failure is not None:
                    await tx_w.send(failure)

    await run_workers(settings.slides_in_parallel, receive, worker, send, send_write)


async def _read_one(plan: PatchPlan, send: MemoryObjectSendStream[PatchBatch], book: SlideBook, pixels: PixelSource,
                    outputs: OutputStore, settings: ReadSettings, limiter: anyio.CapacityLimiter) -> SlideFailed | None:
    """Send every chunk of one slide; a `SlideFailed` when its pixels cannot be read."""
    job = plan.slide.job
    chunks: PatchChunks | None = None
    try:
        chunks = await anyio.to_thread.run_sync(
            pixels.iter_patches, plan, settings.patch_size, settings.chunk, settings.reader_threads, limiter=limiter
        )
        sent = 0
        needed = frozenset(plan.slide.reuse.missing) if plan.slide.reuse is not None else None
        while True:
            started = time.perf_counter()
            chunk = await anyio.to_thread.run_sync(next, chunks, None, limiter=limiter)
            if chunk is None:
                break
            rows, px = chunk
            sent += int(rows.shape[0])
            if settings.save_images:
                await anyio.to_thread.run_sync(outputs.save_images, plan, rows, px, limiter=limiter)
            kept = px if settings.keep_pixels else None
            await send.send(slide_chunk(job.slide_id, rows, kept, time.perf_counter() - started, needed))
        if sent != plan.num_patches:
            # A short reader would leave the slide open (and its slot taken) until the run ends: fail it now.
            raise SlideError(f"reader returned {sent} of {plan.num_patches} patches", slide=job.name)
        if chunks.routes:
            book.note(job, decode_routes=chunks.routes)
    except Exception as exc:  # a foreign per-slide failure becomes a record; bugs stop the run
        if is_bug(exc):
            raise
        return SlideFailed(job, failure_of(exc, "read"), failure_message(job.name, exc))
    finally:
        if chunks is not None:  # stop the reader's own decode threads, also on cancellation
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close, limiter=limiter)
    return None
