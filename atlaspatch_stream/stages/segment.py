"""Stage `segment`: Thumbnail -> TissueMask, in batches of `--seg-batch-size` on the segmentation device."""

from __future__ import annotations

import time

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import describe, failure_of
from ..items import Thumbnail, TissueMask
from ..protocols import Segmenter
from .book import SlideBook


async def run(
    receive: MemoryObjectReceiveStream[Thumbnail],
    send: MemoryObjectSendStream[TissueMask],
    *,
    book: SlideBook,
    segmenter: Segmenter,
    batch_size: int,
    limiter: anyio.CapacityLimiter,
    keep_thumbnails: bool = False,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Thumbnail -> TissueMask.

    Loads the segmenter (weights, device) before reporting ready, so missing weights fail before any slide opens.
    Gathers up to `batch_size` thumbnails (whatever is queued once the first arrives: the next batch fills while the
    current one runs) and segments them in one call in a worker thread under `limiter`. Items without an image
    (reused slides) pass through with no mask. A thumbnail whose segmentation fails fails alone; an exception raised
    by the segmenter itself (a broken device, a bug) propagates and stops the run. Closes `send` when `receive` ends;
    one worker (the device is the bottleneck). With `keep_thumbnails` (`--qc`) each mask carries its thumbnail on
    to `plan`, which saves the QC thumbnail from it (no second read of the slide).
    """
    await anyio.to_thread.run_sync(segmenter.warm_up, limiter=limiter)
    task_status.started()
    try:
        async with receive, send:
            async for first in receive:
                batch = [first, *_drain(receive, batch_size - 1)]
                for item in await _segment(batch, book, segmenter, limiter, keep_thumbnails):
                    await send.send(item)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(segmenter.close, limiter=limiter)


def _drain(receive: MemoryObjectReceiveStream[Thumbnail], n: int) -> list[Thumbnail]:
    """Up to `n` items already waiting, without blocking."""
    items: list[Thumbnail] = []
    while len(items) < n:
        try:
            items.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return items


async def _segment(
    batch: list[Thumbnail], book: SlideBook, segmenter: Segmenter, limiter: anyio.CapacityLimiter, keep: bool
) -> list[TissueMask]:
    todo = [t for t in batch if t.image is not None]
    started = time.perf_counter()
    images = [t.image for t in todo if t.image is not None]
    masks = await anyio.to_thread.run_sync(segmenter.segment, images, limiter=limiter) if todo else []
    share = (time.perf_counter() - started) / max(1, len(todo))
    by_id = {t.slide.job.slide_id: m for t, m in zip(todo, masks, strict=True)}
    out: list[TissueMask] = []
    for item in batch:
        job = item.slide.job
        mask = by_id.get(job.slide_id)
        if isinstance(mask, BaseException):
            await book.fail(job, failure_of(mask, "segment"), f"{job.name}: segmentation failed: {describe(mask)}")
            continue
        if item.image is not None:
            book.time(job, "segment", share)
        out.append(TissueMask(item.slide, mask, item.image if keep else None))
    return out
