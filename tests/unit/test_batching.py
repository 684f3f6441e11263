"""Cross-slide batch assembly: rows keep their (slide, row) labels; batches have exactly the requested size."""

from __future__ import annotations

import numpy as np

from atlaspatch_stream.batching import Batcher, concat, slide_chunk, split
from atlaspatch_stream.items import PatchBatch


def _chunk(slide: int, start: int, n: int, seconds: float = 0.0) -> PatchBatch:
    rows = np.arange(start, start + n, dtype=np.int64)
    pixels = np.zeros((n, 2, 2, 3), np.uint8)
    pixels[:, 0, 0, 0] = slide  # pixels carry their label, so we can check they travel with it
    pixels[:, 0, 0, 1] = rows % 256
    return PatchBatch(np.full(n, slide, np.int64), rows, pixels, read_seconds=seconds)


def _labels(batch: PatchBatch) -> list[tuple[int, int]]:
    return list(zip(batch.slide_ids.tolist(), batch.rows.tolist(), strict=True))


def test_batches_span_slides_and_keep_labels() -> None:
    """Chunks of 5, 3 and 7 rows from three slides, batch size 4: batches of exactly 4 cross slide boundaries,
    the remainder comes out on flush, and every (slide, row) appears once, in arrival order, with its pixels."""
    batcher = Batcher(4)
    chunks = [_chunk(0, 0, 5), _chunk(1, 0, 3), _chunk(2, 10, 7)]
    out: list[PatchBatch] = []
    for chunk in chunks:
        out += batcher.add(chunk)
        assert len(batcher) < 4
    assert [len(b) for b in out] == [4, 4, 4]
    assert _labels(out[1]) == [(0, 4), (1, 0), (1, 1), (1, 2)]
    rest = batcher.flush()
    assert len(rest) == 3 and len(batcher) == 0
    got = [label for b in [*out, rest] for label in _labels(b)]
    assert got == [label for c in chunks for label in _labels(c)]
    for batch in [*out, rest]:
        np.testing.assert_array_equal(batch.pixels[:, 0, 0, 0], batch.slide_ids)
        np.testing.assert_array_equal(batch.pixels[:, 0, 0, 1], batch.rows % 256)


def test_large_chunk_splits_into_several_batches() -> None:
    """A chunk of 10 rows with batch size 3 yields three full batches at once and leaves one row buffered."""
    batcher = Batcher(3)
    out = batcher.add(_chunk(5, 0, 10))
    assert [len(b) for b in out] == [3, 3, 3]
    assert len(batcher) == 1
    assert _labels(batcher.flush()) == [(5, 9)]


def test_empty_flush_and_empty_chunk() -> None:
    """An empty chunk adds nothing; flushing an empty buffer gives an empty batch."""
    batcher = Batcher(2)
    assert batcher.add(_chunk(0, 0, 0)) == []
    empty = batcher.flush()
    assert len(empty) == 0 and empty.pixels.shape[0] == 0


def test_read_time_is_shared_by_rows() -> None:
    """Splitting shares read seconds by row count; concatenating sums them (no time lost or invented)."""
    head, tail = split(_chunk(0, 0, 4, seconds=2.0), 1)
    assert head.read_seconds == 0.5 and tail.read_seconds == 1.5
    assert concat([head, tail]).read_seconds == 2.0
    batcher = Batcher(3)
    out = batcher.add(_chunk(0, 0, 2, seconds=1.0)) + batcher.add(_chunk(1, 0, 2, seconds=1.0))
    total = sum(b.read_seconds for b in out) + batcher.flush().read_seconds
    assert abs(total - 2.0) < 1e-9


def test_split_by_slide_and_row_tally() -> None:
    """Rows of a mixed batch are split per slide with their share; a tally completes only when every row arrived."""
    import numpy as np

    from atlaspatch_stream.batching import RowTally, split_by_slide

    parts = split_by_slide(np.array([3, 1, 3, 3]))
    assert [(sid, sel.tolist(), share) for sid, sel, share in parts] == [
        (1, [False, True, False, False], 0.25), (3, [True, False, True, True], 0.75)]
    tally = RowTally(4)
    tally.mark(np.array([3, 0]))
    assert not tally.complete
    tally.mark(np.array([2, 1]))
    assert tally.complete


def test_batches_mix_host_arrays_and_device_tensors() -> None:
    """A chunk read through `read_region` (numpy) and one decoded on the device (torch) fill one batch: the batch is
    one tensor on the device, rows in order; all-numpy batches stay numpy."""
    import torch

    host = slide_chunk(0, np.arange(3), np.full((3, 4, 4, 3), 1, np.uint8), 0.0, None)
    device = slide_chunk(1, np.arange(2), torch.full((2, 4, 4, 3), 2, dtype=torch.uint8), 0.0, None)
    batcher = Batcher(5)
    assert batcher.add(host) == []
    [batch] = batcher.add(device)
    assert isinstance(batch.pixels, torch.Tensor) and batch.pixels.shape == (5, 4, 4, 3)
    assert batch.pixels[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2] and batch.slide_ids.tolist() == [0, 0, 0, 1, 1]
    assert isinstance(concat([host, host]).pixels, np.ndarray)
