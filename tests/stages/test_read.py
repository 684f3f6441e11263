"""Stage `read` driven through memory streams: chunks cover every row, failures become records, a slow consumer
bounds how far the reader runs ahead, and the reader's own threads are stopped on cancellation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from atlaspatch_stream.items import PatchBatch, PatchPlan, Pixels, SlideFailed, WriteItem
from atlaspatch_stream.outputs.h5outputs import H5Outputs, SettingsRecord
from atlaspatch_stream.stages import read
from atlaspatch_stream.testing.fakes import FakeChunks, FakePixels, FakePlanner, fake_jobs
from tests.helpers import fake_config

from .conftest import Opened

pytestmark = pytest.mark.anyio


class CountingPixels(FakePixels):
    """Counts chunks produced and whether the iterator was closed; `short` stops one chunk early."""

    def __init__(self, read_delay: float = 0.0) -> None:
        super().__init__(fail_read=["bad"], read_delay=read_delay)
        self.produced = 0
        self.closed: list[str] = []

    def iter_patches(self, plan: PatchPlan, patch_size: int, chunk: int, threads: int) -> FakeChunks:
        return FakeChunks(self._counted(plan, super().iter_patches(plan, patch_size, chunk, threads)))

    def _counted(self, plan: PatchPlan, chunks: FakeChunks) -> Iterator[tuple[np.ndarray, Pixels]]:
        try:
            for index, item in enumerate(chunks):
                if plan.slide.job.stem == "short" and index == 2:
                    return
                self.produced += 1
                yield item
        finally:
            self.closed.append(plan.slide.job.stem)


def _settings(chunk: int = 4) -> read.ReadSettings:
    return read.ReadSettings(slides_in_parallel=2, reader_threads=1, chunk=chunk, patch_size=16, save_images=False,
                             keep_pixels=True)


async def _plans(opened: Opened, out: Path, stems: list[str], n: int = 10) -> list[PatchPlan]:
    config = fake_config(out)
    planner = FakePlanner(config, SettingsRecord(config, lambda: None), n)
    return [planner.plan(await opened.slide(job), np.ones((4, 4), bool)) for job in fake_jobs(out, stems)]


def _outputs(out: Path) -> H5Outputs:
    config = fake_config(out)
    return H5Outputs(config, SettingsRecord(config, lambda: None))


async def test_chunks_cover_every_row_and_failures_become_records(opened: Opened, tmp_path: Path) -> None:
    """Three slides of 10 rows in chunks of 4: every row of the good slide arrives once, labelled by slide; the slide
    whose read fails half-way and the one whose reader stops early each send one SlideFailed to the writer."""
    plans = await _plans(opened, tmp_path, ["good", "bad", "short"])
    send_in, receive_in = anyio.create_memory_object_stream[PatchPlan](3)
    send, receive = anyio.create_memory_object_stream[PatchBatch](100)
    send_w, receive_w = anyio.create_memory_object_stream[WriteItem](10)
    for p in plans:
        send_in.send_nowait(p)
    send_in.close()
    pixels = CountingPixels()
    with anyio.fail_after(10):
        await read.run(receive_in, send, send_w, book=opened.books.book, pixels=pixels,
                       outputs=_outputs(tmp_path), settings=_settings(),
                       limiter=anyio.CapacityLimiter(2))
        batches = [b async for b in receive]
        failures = [f async for f in receive_w]
    good_id = plans[0].slide.job.slide_id
    rows = np.concatenate([b.rows[b.slide_ids == good_id] for b in batches])
    assert sorted(rows.tolist()) == list(range(10))
    assert all(b.pixels.shape[1:] == (16, 16, 3) and len(b) <= 4 for b in batches)
    by_stem = {f.job.stem: f for f in failures if isinstance(f, SlideFailed)}
    assert set(by_stem) == {"bad", "short"} and "corrupt tile" in by_stem["bad"].message
    assert "returned 8 of 10" in by_stem["short"].message
    assert sorted(pixels.closed) == ["bad", "good", "short"]


async def test_a_slow_consumer_bounds_how_far_the_reader_runs_ahead(opened: Opened, tmp_path: Path) -> None:
    """With an output buffer of 1 and a consumer that has not started, one worker produces at most 2 chunks (one
    buffered, one waiting to be sent): memory is bounded by the stream, not by the slide."""
    [p] = await _plans(opened, tmp_path, ["big"], n=200)
    send_in, receive_in = anyio.create_memory_object_stream[PatchPlan](1)
    send, receive = anyio.create_memory_object_stream[PatchBatch](1)
    send_w, _receive_w = anyio.create_memory_object_stream[WriteItem](10)
    send_in.send_nowait(p)
    send_in.close()
    pixels = CountingPixels()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: read.run(receive_in, send, send_w, book=opened.books.book, pixels=pixels,
                                           outputs=_outputs(tmp_path),
                                           settings=_settings(), limiter=anyio.CapacityLimiter(2)))
            await anyio.sleep(0.3)
            assert pixels.produced <= 2
            got = [len(b) async for b in receive]
    assert sum(got) == 200


async def test_cancellation_stops_the_reader(opened: Opened, tmp_path: Path) -> None:
    """Cancelled mid-slide, the stage closes the reader's iterator (its decode threads stop) and returns."""
    [p] = await _plans(opened, tmp_path, ["slow"], n=200)
    send_in, receive_in = anyio.create_memory_object_stream[PatchPlan](1)
    send, receive = anyio.create_memory_object_stream[PatchBatch](100)
    send_w, _receive_w = anyio.create_memory_object_stream[WriteItem](10)
    send_in.send_nowait(p)
    pixels = CountingPixels(read_delay=0.02)
    with anyio.fail_after(10):
        with anyio.move_on_after(0.2):
            await read.run(receive_in, send, send_w, book=opened.books.book, pixels=pixels,
                       outputs=_outputs(tmp_path), settings=_settings(),
                           limiter=anyio.CapacityLimiter(2))
    assert pixels.closed == ["slow"] and 0 < pixels.produced < 50
    receive.close()
