"""Stage `write`: PatchPlan / FeatureBatch / SlideFailed -> finished H5 files. One writer owns every open file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ..batching import RowTally, split_by_slide
from ..errors import refused
from ..items import Failure, FeatureBatch, PatchBatch, PatchPlan, SlideJob, Status, WriteItem
from ..protocols import OutputStore, Store
from .book import SlideBook

if TYPE_CHECKING:
    import numpy as np


@dataclass
class _Open:
    plan: PatchPlan
    store: Store
    names: tuple[str, ...]
    tally: RowTally | None = None  # set when rows are counted without features (--save-images, no encoder)
    nonfinite: dict[str, int] = field(default_factory=dict)  # encoder -> rows with NaN/Inf written so far

    @property
    def job(self) -> SlideJob:
        return self.plan.slide.job


@dataclass(frozen=True)
class WriteSettings:
    """What `write` needs: which feature sets each slide gets and whether rows are counted without features."""

    encoders: tuple[str, ...]
    dims: Mapping[str, int]
    count_rows: bool  # pixels are read (e.g. --save-images) but no encoder runs: finish when all rows were read
    allow_nonfinite: bool = False  # --allow-nonfinite: keep rows with NaN/Inf (counted in the H5 and the report)


@dataclass
class _Writer:
    """The writer's state: every open file, keyed by slide id."""

    book: SlideBook
    outputs: OutputStore
    settings: WriteSettings
    limiter: anyio.CapacityLimiter
    files: dict[int, _Open] = field(default_factory=dict)


async def run(
    receive: MemoryObjectReceiveStream[WriteItem],
    *,
    book: SlideBook,
    outputs: OutputStore,
    settings: WriteSettings,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """PatchPlan | FeatureBatch | PatchBatch | SlideFailed -> final files and `SlideResult`s (through `book`).

    A PatchPlan opens the slide's file (a temporary file with coords, or an existing file for reuse); feature rows
    are placed by (slide_id, row) whatever their arrival order; when every row of every feature set is written the
    sets are renamed, the file is moved into place and the slide finishes. A SlideFailed (or a write error) drops the
    partial output. Every H5 call runs in a worker thread under `limiter` (capacity 1). On cancellation every open
    file is aborted under a shielded scope, so no file ever looks complete unless it is.
    """
    task_status.started()
    writer = _Writer(book, outputs, settings, limiter)
    try:
        async with receive:
            async for item in receive:
                await _dispatch(item, writer)
        for entry in list(writer.files.values()):
            await _fail(entry, writer, refused("write", "bug"), f"{entry.job.name}: pipeline ended before all rows "
                        "arrived")
    finally:
        with anyio.CancelScope(shield=True):
            for entry in list(writer.files.values()):
                await anyio.to_thread.run_sync(entry.store.abort, limiter=limiter)


async def _dispatch(item: WriteItem, writer: _Writer) -> None:
    if isinstance(item, PatchPlan):
        await _open(item, writer)
    elif isinstance(item, FeatureBatch | PatchBatch):
        await _rows(item, writer)
    else:
        entry = writer.files.get(item.job.slide_id)
        if entry is not None:
            await _fail(entry, writer, item.failure, item.message)
        else:
            await writer.book.fail(item.job, item.failure, item.message)


async def _open(plan: PatchPlan, writer: _Writer) -> None:
    job = plan.slide.job
    reuse = plan.slide.reuse
    names = reuse.missing if reuse is not None else writer.settings.encoders
    dims = {name: writer.settings.dims[name] for name in names}
    try:
        store = await anyio.to_thread.run_sync(writer.outputs.open_store, plan, dims, limiter=writer.limiter)
    except Exception as exc:  # e.g. disk full: this slide fails (the book decides what the run does about it)
        await writer.book.fail_on(job, "write", exc)
        return
    tally = RowTally(plan.num_patches) if writer.settings.count_rows and not names else None
    entry = _Open(plan, store, tuple(names), tally)
    writer.files[job.slide_id] = entry
    if plan.num_patches == 0:
        try:
            for name in names:
                await anyio.to_thread.run_sync(store.begin_feature, name, writer.settings.dims[name],
                                               limiter=writer.limiter)
        except Exception as exc:
            await _fail_on(entry, writer, exc)
            return
    await _maybe_finish(entry, writer)


async def _rows(batch: FeatureBatch | PatchBatch, writer: _Writer) -> None:
    for slide_id, sel, share in split_by_slide(batch.slide_ids):
        entry = writer.files.get(slide_id)
        if entry is None:
            continue  # rows of a slide that already failed
        writer.book.time(entry.job, "read", batch.read_seconds * share)
        if isinstance(batch, FeatureBatch):
            writer.book.time(entry.job, "encode", batch.encode_seconds * share)
        try:
            if isinstance(batch, FeatureBatch):
                await anyio.to_thread.run_sync(_write_features, entry, batch, sel, limiter=writer.limiter)
            elif entry.tally is not None:
                entry.tally.mark(batch.rows[sel])
        except Exception as exc:
            await _fail_on(entry, writer, exc)
            continue
        await _maybe_finish(entry, writer)


def _write_features(entry: _Open, batch: FeatureBatch, sel: np.ndarray) -> None:
    rows = batch.rows[sel]
    for name, mask in batch.nonfinite.items():
        entry.nonfinite[name] = entry.nonfinite.get(name, 0) + int(mask[sel].sum())
    for name in entry.names:
        values = batch.features[name][sel]
        if not entry.store.has_feature(name):
            entry.store.begin_feature(name, int(values.shape[1]))
        entry.store.write_rows(name, rows, values)


def _complete(entry: _Open) -> bool:
    if entry.tally is not None:
        return entry.tally.complete
    return all(entry.store.has_feature(n) for n in entry.names) and entry.store.complete()


async def _maybe_finish(entry: _Open, writer: _Writer) -> None:
    if not _complete(entry):
        return
    job = entry.job
    bad = {name: n for name, n in entry.nonfinite.items() if n and name in entry.names}
    if bad and not writer.settings.allow_nonfinite:
        message = f"{job.name}: {nonfinite_message(bad, entry.plan.num_patches)}"
        await _fail(entry, writer, refused("encode", "nonfinite"), message)
        return
    writer.files.pop(job.slide_id, None)
    try:
        with anyio.CancelScope(shield=True):
            for name, n in bad.items():
                await anyio.to_thread.run_sync(entry.store.set_feature_attrs, name, {"nonfinite_rows": n},
                                               limiter=writer.limiter)
            path = await anyio.to_thread.run_sync(entry.store.finalize, limiter=writer.limiter)
    except Exception as exc:
        await _fail_on(entry, writer, exc)
        return
    status: Status = "reused" if entry.plan.slide.reuse is not None else "done"
    if bad:
        writer.book.note(job, nonfinite_rows=bad)
    await writer.book.finish(job, status, h5_path=path, num_patches=entry.plan.num_patches, features=entry.names)


def nonfinite_message(bad: Mapping[str, int], num_patches: int) -> str:
    """The cause of a slide failed for NaN/Inf features: each encoder, its bad rows, and the fix."""
    counts = ", ".join(f"encoder {name} wrote {n} of {num_patches} feature rows with NaN or Inf" for name, n in
                       bad.items())
    return (f"{counts} (a float16 overflow?): use --feature-precision bfloat16 or float32 "
            "(or --allow-nonfinite to keep such rows)")


async def _fail(entry: _Open, writer: _Writer, failure: Failure, message: str) -> None:
    await _drop(entry, writer)
    await writer.book.fail(entry.job, failure, message)


async def _fail_on(entry: _Open, writer: _Writer, exc: BaseException) -> None:
    """Drop the slide's file, then fail the slide (or raise a bug: `SlideBook.fail_on`)."""
    await _drop(entry, writer)
    await writer.book.fail_on(entry.job, "write", exc)


async def _drop(entry: _Open, writer: _Writer) -> None:
    """Forget the slide's open file and remove it."""
    writer.files.pop(entry.job.slide_id, None)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(entry.store.abort, limiter=writer.limiter)
