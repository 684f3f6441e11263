"""Stage `plan`: TissueMask -> PatchPlan. Contours, lattice, optional pixel filters and overlays."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..errors import SlideError, describe
from ..items import PatchPlan, TissueMask
from .book import SlideBook
from .workers import optional, optional_clone, run_workers

Mode = Literal["coords", "features", "detect"]


@dataclass(frozen=True)
class PlanSettings:
    """What `plan` needs: the command's mode and whether pixels are read downstream."""

    mode: Mode
    needs_pixels: bool
    workers: int = 2


async def run(
    receive: ObjectReceiveStream[TissueMask],
    send_write: ObjectSendStream[Any],
    send_read: ObjectSendStream[PatchPlan] | None,
    *,
    book: SlideBook,
    backends: Any,
    settings: PlanSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """TissueMask -> PatchPlan, sent first to the writer (which creates the file) and then to the readers.

    New slides: contours and coordinates from the mask (and the black/white filters with `--no-fast-mode`), plus the
    requested overlays; reused slides: coordinates read back from their H5. In `detect` mode only the mask overlays
    are written and the slide finishes here. Work runs in threads under `limiter`; `settings.workers` workers. Closes
    both send streams when `receive` ends. Per-slide errors become failures.
    """
    task_status.started()
    async with send_write, optional(send_read):

        async def worker(rx: ObjectReceiveStream[TissueMask], _: Any) -> None:
            async with rx, send_write.clone() as tx_w, optional_clone(send_read) as tx_r:  # type: ignore[attr-defined]
                async for item in rx:
                    await _plan_one(item, tx_w, tx_r, book, backends, settings, limiter)

        await run_workers(settings.workers, receive, None, worker)


async def _plan_one(
    item: TissueMask,
    send_write: ObjectSendStream[Any],
    send_read: ObjectSendStream[PatchPlan] | None,
    book: SlideBook,
    backends: Any,
    settings: PlanSettings,
    limiter: anyio.CapacityLimiter,
) -> None:
    job = item.slide.job
    started = time.perf_counter()
    try:
        if settings.mode == "detect":
            await anyio.to_thread.run_sync(backends.detect_overlays, item.slide, item.mask, limiter=limiter)
            book.time(job, "plan", time.perf_counter() - started)
            await book.finish(job, "done")
            return
        plan = await anyio.to_thread.run_sync(backends.plan, item.slide, item.mask, limiter=limiter)
    except SlideError as exc:
        await book.fail(job, "plan", exc.one_line() if exc.slide else f"{job.name}: {exc.one_line()}")
        return
    except Exception as exc:  # noqa: BLE001 - a foreign per-slide failure becomes a record
        await book.fail(job, "plan", f"{job.name}: {describe(exc)}")
        return
    book.time(job, "plan", time.perf_counter() - started)
    book.note(job, num_patches=plan.num_patches)
    await send_write.send(plan)
    if send_read is not None and settings.needs_pixels and plan.num_patches:
        await send_read.send(plan)
