"""Stage `read`: PatchPlan -> PatchBatch. Pixels of every planned patch at `patch_size`, each tile decoded once."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..batching import slide_chunk
from ..errors import SlideError, describe
from ..items import PatchPlan, SlideFailed
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
    receive: ObjectReceiveStream[PatchPlan],
    send: ObjectSendStream[Any],
    send_write: ObjectSendStream[Any],
    *,
    backends: Any,
    settings: ReadSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """PatchPlan -> PatchBatch chunks of one slide (at most `settings.chunk` rows each).

    `settings.slides_in_parallel` workers each read one slide at a time; the backend reader decodes tiles in its own
    threads, and each `next()` of its iterator runs in a worker thread under `limiter`. With `--save-images` the
    PNGs are written here from the same decoded pixels. A slide whose pixels cannot be read sends a `SlideFailed` to
    the writer (which drops its partial file) and the run goes on. Closes `send` and `send_write` when `receive` ends.
    """
    task_status.started()
    async with send_write:

        async def worker(rx: ObjectReceiveStream[PatchPlan], tx: ObjectSendStream[Any] | None) -> None:
            assert tx is not None
            async with rx, tx, send_write.clone() as tx_w:  # type: ignore[attr-defined]
                async for plan in rx:
                    await _read_one(plan, tx, tx_w, backends, settings, limiter)

        await run_workers(settings.slides_in_parallel, receive, send, worker)


async def _read_one(
    plan: PatchPlan,
    send: ObjectSendStream[Any],
    send_write: ObjectSendStream[Any],
    backends: Any,
    settings: ReadSettings,
    limiter: anyio.CapacityLimiter,
) -> None:
    job = plan.slide.job
    iterator: Any = None
    try:
        iterator = await anyio.to_thread.run_sync(
            backends.iter_patches, plan, settings.patch_size, settings.chunk, settings.reader_threads, limiter=limiter
        )
        sent = 0
        while True:
            started = time.perf_counter()
            chunk = await anyio.to_thread.run_sync(next, iterator, None, limiter=limiter)
            if chunk is None:
                break
            rows, pixels = chunk
            sent += int(rows.shape[0])
            if settings.save_images:
                await anyio.to_thread.run_sync(backends.save_images, plan, rows, pixels, limiter=limiter)
            elapsed = time.perf_counter() - started
            reuse = plan.slide.reuse
            needed = frozenset(reuse.missing) if reuse is not None else None
            kept = pixels if settings.keep_pixels else None
            await send.send(slide_chunk(job.slide_id, rows, kept, elapsed, needed))
        if sent != plan.num_patches:
            # A short reader would leave the slide open (and its slot taken) until the run ends: fail it now.
            raise SlideError(f"reader returned {sent} of {plan.num_patches} patches", slide=job.name)
    except SlideError as exc:
        await send_write.send(SlideFailed(job, "read", exc.one_line() if exc.slide else f"{job.name}: {exc.one_line()}"))
    except Exception as exc:  # noqa: BLE001 - a foreign per-slide failure becomes a record
        await send_write.send(SlideFailed(job, "read", f"{job.name}: {describe(exc)}"))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # stop the reader's own decode threads, also on cancellation
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)
