"""Stage `plan`: TissueMask -> PatchPlan. Contours, lattice, optional pixel filters and overlays."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import SlideError, describe, is_bug
from ..items import PatchPlan, TissueMask, WriteItem
from ..protocols import OutputStore, Planner
from .book import SlideBook
from .workers import run_workers

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanSettings:
    """What `plan` needs: whether only overlays are made (detect-tissue), and the number of workers."""

    detect: bool
    workers: int = 2


async def run(
    receive: MemoryObjectReceiveStream[TissueMask],
    send_write: MemoryObjectSendStream[WriteItem] | None,
    send_read: MemoryObjectSendStream[PatchPlan] | None,
    *,
    book: SlideBook,
    planner: Planner,
    outputs: OutputStore | None,
    settings: PlanSettings,
    limiter: anyio.CapacityLimiter,
    h5_limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """TissueMask -> PatchPlan, sent first to the writer (which creates the file) and then to the readers.

    New slides: contours and coordinates from the mask (and the black/white filters with `--no-fast-mode`), plus the
    requested overlays, in threads under `limiter`; reused slides: coordinates read back from their H5 under
    `h5_limiter`. In detect mode (`settings.detect`, no writer) only the mask overlays are written and the slide
    finishes here. `send_read` is None when no pixels are read. Closes both send streams when `receive` ends;
    `settings.workers` workers. Per-slide errors become failures; bugs propagate.
    """
    task_status.started()

    async def worker(rx: MemoryObjectReceiveStream[TissueMask], tx_w: MemoryObjectSendStream[WriteItem] | None,
                     tx_r: MemoryObjectSendStream[PatchPlan] | None) -> None:
        async with rx, tx_w or contextlib.nullcontext(), tx_r or contextlib.nullcontext():
            async for item in rx:
                plan = await _plan_one(item, book, planner, outputs, settings, limiter, h5_limiter)
                if plan is None:
                    continue
                if tx_w is not None:
                    await tx_w.send(plan)
                if tx_r is not None and plan.num_patches:
                    await tx_r.send(plan)

    await run_workers(settings.workers, receive, worker, send_write, send_read)


async def _plan_one(item: TissueMask, book: SlideBook, planner: Planner, outputs: OutputStore | None,
                    settings: PlanSettings, limiter: anyio.CapacityLimiter,
                    h5_limiter: anyio.CapacityLimiter) -> PatchPlan | None:
    """The slide's plan, or None when it finished here (detect mode, or a failure)."""
    job = item.slide.job
    started = time.perf_counter()
    try:
        if settings.detect:
            await anyio.to_thread.run_sync(planner.detect_overlays, item.slide, _mask(item), limiter=limiter)
            book.time(job, "plan", time.perf_counter() - started)
            await book.finish(job, "done")
            return None
        reuse = item.slide.reuse
        if reuse is not None and outputs is not None:
            coords = await anyio.to_thread.run_sync(outputs.read_coords, reuse.h5_path, limiter=h5_limiter)
            plan = PatchPlan(item.slide, None, coords)
        else:
            plan = await anyio.to_thread.run_sync(planner.plan, item.slide, _mask(item), limiter=limiter)
    except Exception as exc:  # a foreign per-slide failure becomes a record; bugs stop the run
        await book.fail_on(job, "plan", exc)
        return None
    book.time(job, "plan", time.perf_counter() - started)
    book.note(job, num_patches=plan.num_patches)
    if item.thumbnail is not None and item.mask is not None and outputs is not None:
        await _save_qc(outputs, item, item.thumbnail, item.mask, limiter)
    return plan


async def _save_qc(outputs: OutputStore, item: TissueMask, thumbnail: np.ndarray, mask: np.ndarray,
                   limiter: anyio.CapacityLimiter) -> None:
    """`--qc`: the slide's QC thumbnail and mask; a failure here is a warning, never the slide's failure."""
    try:
        await anyio.to_thread.run_sync(outputs.save_qc_thumbnail, item.slide.job.stem, thumbnail, mask,
                                       limiter=limiter)
    except Exception as exc:
        if is_bug(exc):
            raise
        log.warning("%s: QC thumbnail not saved: %s", item.slide.job.name, describe(exc))


def _mask(item: TissueMask) -> np.ndarray:
    if item.mask is None:
        raise SlideError("no tissue mask", slide=item.slide.job.name, kind="no_tissue")
    return item.mask
