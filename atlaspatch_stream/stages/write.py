"""Stage `write`: PatchPlan / FeatureBatch / SlideFailed -> finished H5 files. One writer owns every open file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from ..batching import RowTally, split_by_slide
from ..errors import SlideError, describe
from ..items import FeatureBatch, PatchBatch, PatchPlan, SlideFailed, Status
from .book import SlideBook


@dataclass
class _Open:
    plan: PatchPlan
    store: Any
    names: tuple[str, ...]
    tally: RowTally | None = None  # set when rows are counted without features (--save-images, no encoder)

    @property
    def job(self) -> Any:
        return self.plan.slide.job


@dataclass(frozen=True)
class WriteSettings:
    """What `write` needs: which feature sets each slide gets and whether rows are counted without features."""

    encoders: tuple[str, ...]
    dims: dict[str, int]
    count_rows: bool  # pixels are read (e.g. --save-images) but no encoder runs: finish when all rows were read


async def run(
    receive: ObjectReceiveStream[Any],
    *,
    book: SlideBook,
    backends: Any,
    settings: WriteSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """PatchPlan | FeatureBatch | PatchBatch | SlideFailed -> final files and `SlideResult`s (through `book`).

    A PatchPlan opens the slide's file (a temporary file with coords, or an existing file for reuse); feature rows
    are placed by (slide_id, row) whatever their arrival order; when every row of every feature set is written the
    sets are renamed, the file is moved into place and the slide finishes. A SlideFailed (or a write error) drops the
    partial output. H5 calls run in a worker thread under `limiter` (capacity 1). On cancellation every open file is
    aborted under a shielded scope, so no file ever looks complete unless it is.
    """
    task_status.started()
    open_: dict[int, _Open] = {}
    try:
        async with receive:
            async for item in receive:
                await _dispatch(item, open_, book, backends, settings, limiter)
        for entry in list(open_.values()):
            await _fail(entry, open_, book, limiter, "write", "pipeline ended before all rows arrived")
    finally:
        with anyio.CancelScope(shield=True):
            for entry in list(open_.values()):
                await anyio.to_thread.run_sync(entry.store.abort)


async def _dispatch(
    item: Any, open_: dict[int, _Open], book: SlideBook, backends: Any, settings: WriteSettings,
    limiter: anyio.CapacityLimiter,
) -> None:
    if isinstance(item, PatchPlan):
        await _open(item, open_, book, backends, settings, limiter)
    elif isinstance(item, FeatureBatch | PatchBatch):
        await _rows(item, open_, book, settings, limiter)
    elif isinstance(item, SlideFailed):
        entry = open_.get(item.job.slide_id)
        if entry is not None:
            await _fail(entry, open_, book, limiter, item.stage, item.message)
        else:
            await book.fail(item.job, item.stage, item.message)
    else:  # pragma: no cover - a wiring bug
        raise TypeError(f"writer got {type(item).__name__}")


async def _open(
    plan: PatchPlan, open_: dict[int, _Open], book: SlideBook, backends: Any, settings: WriteSettings,
    limiter: anyio.CapacityLimiter,
) -> None:
    job = plan.slide.job
    reuse = plan.slide.reuse
    names = reuse.missing if reuse is not None else settings.encoders
    try:
        store = await anyio.to_thread.run_sync(backends.open_store, plan, limiter=limiter)
    except Exception as exc:  # noqa: BLE001 - e.g. disk full: this slide fails, the run goes on
        await book.fail(job, "write", f"{job.name}: cannot write output: {describe(exc)}")
        return
    tally = RowTally(plan.num_patches) if settings.count_rows and not names else None
    entry = _Open(plan, store, tuple(names), tally)
    open_[job.slide_id] = entry
    if plan.num_patches == 0:
        for name in names:
            await anyio.to_thread.run_sync(store.begin_feature, name, settings.dims[name], limiter=limiter)
    await _maybe_finish(entry, open_, book, limiter)


async def _rows(
    batch: FeatureBatch | PatchBatch, open_: dict[int, _Open], book: SlideBook, settings: WriteSettings,
    limiter: anyio.CapacityLimiter,
) -> None:
    for slide_id, sel, share in split_by_slide(batch.slide_ids):
        entry = open_.get(slide_id)
        if entry is None:
            continue  # rows of a slide that already failed
        _account(entry, book, batch, share)
        try:
            if isinstance(batch, FeatureBatch):
                await anyio.to_thread.run_sync(_write_features, entry, batch, sel, limiter=limiter)
            elif entry.tally is not None:
                entry.tally.mark(batch.rows[sel])
        except Exception as exc:  # noqa: BLE001
            message = exc.one_line() if isinstance(exc, SlideError) else describe(exc)
            await _fail(entry, open_, book, limiter, "write", f"{entry.job.name}: {message}")
            continue
        await _maybe_finish(entry, open_, book, limiter)


def _account(entry: _Open, book: SlideBook, batch: FeatureBatch | PatchBatch, share: float) -> None:
    book.time(entry.job, "read", batch.read_seconds * share)
    if isinstance(batch, FeatureBatch):
        book.time(entry.job, "encode", batch.encode_seconds * share)


def _write_features(entry: _Open, batch: FeatureBatch, sel: Any) -> None:
    rows = batch.rows[sel]
    for name in entry.names:
        values = batch.features[name][sel]
        if not entry.store.has_feature(name):
            entry.store.begin_feature(name, int(values.shape[1]))
        entry.store.write_rows(name, rows, values)


def _complete(entry: _Open) -> bool:
    if entry.tally is not None:
        return entry.tally.complete
    return all(entry.store.has_feature(n) for n in entry.names) and entry.store.complete()


async def _maybe_finish(entry: _Open, open_: dict[int, _Open], book: SlideBook, limiter: anyio.CapacityLimiter) -> None:
    if not _complete(entry):
        return
    job = entry.job
    open_.pop(job.slide_id, None)
    try:
        with anyio.CancelScope(shield=True):
            path = await anyio.to_thread.run_sync(entry.store.finalize, limiter=limiter)
    except Exception as exc:  # noqa: BLE001
        await anyio.to_thread.run_sync(entry.store.abort)
        await book.fail(job, "write", f"{job.name}: cannot finalize output: {describe(exc)}")
        return
    status: Status = "reused" if entry.plan.slide.reuse is not None else "done"
    await book.finish(job, status, h5_path=path, num_patches=entry.plan.num_patches, features=entry.names)


async def _fail(
    entry: _Open, open_: dict[int, _Open], book: SlideBook, limiter: anyio.CapacityLimiter, stage: str, message: str
) -> None:
    open_.pop(entry.job.slide_id, None)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(entry.store.abort, limiter=limiter)
    await book.fail(entry.job, stage, message)


def feature_dims(encoders: Sequence[Any]) -> dict[str, int]:
    """Declared widths, used only for (0, D) datasets of slides without patches (upstream §2.4)."""
    return {e.name: int(e.dim) for e in encoders}
