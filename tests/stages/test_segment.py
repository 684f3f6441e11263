"""Stage `segment` driven through memory streams: batches from what is queued, failures alone, errors propagate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from atlaspatch_stream.items import Thumbnail, TissueMask
from atlaspatch_stream.stages import segment
from atlaspatch_stream.testing.fakes import FakeSegmenter

from .conftest import Books, Opened, jobs

pytestmark = pytest.mark.anyio


class OddSegmenter(FakeSegmenter):
    """Fails thumbnails 31 pixels high; counts closes."""

    closed: int = 0

    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        self.batches.append(len(thumbnails))
        return [ValueError("no convergence") if t.shape[0] == 31 else np.ones(t.shape[:2], bool) for t in thumbnails]

    def close(self) -> None:
        self.closed += 1


class DeadDevice(OddSegmenter):
    def segment(self, thumbnails: Sequence[np.ndarray]) -> list[np.ndarray | Exception]:
        raise RuntimeError("CUDA error: an illegal memory access")


async def _thumbnails(opened: Opened, folder: Path, heights: list[int | None]) -> list[Thumbnail]:
    items = []
    for job, high in zip(jobs(folder, len(heights)), heights, strict=True):
        slide = await opened.slide(job)
        items.append(Thumbnail(slide, None if high is None else np.zeros((high, 32, 3), np.uint8)))
    return items


async def _run(items: list[Thumbnail], books: Books, segmenter: FakeSegmenter, batch: int) -> list[TissueMask]:
    send_in, receive_in = anyio.create_memory_object_stream[Thumbnail](len(items))
    send, receive = anyio.create_memory_object_stream[TissueMask](len(items))
    for item in items:
        send_in.send_nowait(item)
    send_in.close()
    with anyio.fail_after(10):
        await segment.run(receive_in, send, book=books.book, segmenter=segmenter, batch_size=batch,
                          limiter=anyio.CapacityLimiter(1))
        return [m async for m in receive]


async def test_batches_take_what_is_queued(books: Books, opened: Opened, tmp_path: Path) -> None:
    """Five thumbnails queued, batch size 4: two calls (4 then 1); every mask comes out, in order."""
    items = await _thumbnails(opened, tmp_path, [32] * 5)
    segmenter = OddSegmenter()
    masks = await _run(items, books, segmenter, batch=4)
    assert segmenter.batches == [4, 1] and [m.slide.job.stem for m in masks] == [f"s{i}" for i in range(5)]
    assert all(m.mask is not None and m.mask.all() for m in masks) and segmenter.closed == 1


async def test_a_failed_image_fails_alone_and_reused_slides_pass(books: Books, opened: Opened, tmp_path: Path) -> None:
    """In one batch: a thumbnail the segmenter cannot handle fails its slide ('segment'); a reused slide (no image)
    passes without a mask; the others get masks."""
    items = await _thumbnails(opened, tmp_path, [32, 31, None])
    masks = await _run(items, books, OddSegmenter(), batch=3)
    [failed] = books.drained()
    assert failed.job.stem == "s1" and failed.failure.stage == "segment" and "no convergence" in failed.message
    assert [(m.slide.job.stem, m.mask is None) for m in masks] == [("s0", False), ("s2", True)]


async def test_a_broken_device_propagates_and_closes(books: Books, opened: Opened, tmp_path: Path) -> None:
    """An exception from the segmenter itself stops the stage (it is not one slide's fault); the model is closed."""
    items = await _thumbnails(opened, tmp_path, [32, 32])
    segmenter = DeadDevice()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await _run(items, books, segmenter, batch=2)
    assert segmenter.closed == 1
