"""The host buffer pool: memory is handed out again only when nothing can still read it."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from atlaspatch_stream.backends.readers import RegionReader, TileOnceReader
from atlaspatch_stream.batching import Batcher
from atlaspatch_stream.buffers import BufferPool
from tests.unit.test_batching import _chunk, _labels
from tests.unit.test_readers import LibHandle, collect, grid_coords
from tests.unit.test_tiles import write_pyramid

SHAPE = (8, 16, 16, 3)


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_buffer_is_reused_once_its_array_is_gone() -> None:
    pool = BufferPool(2)
    first = pool.empty(SHAPE)
    assert first.shape == SHAPE and first.dtype == np.uint8 and first.flags.c_contiguous and first.flags.writeable
    where = _address(first)
    del first
    again = pool.empty(SHAPE)
    assert _address(again) == where
    assert (pool.allocated, pool.reused) == (1, 1)


@pytest.mark.parametrize("keeper", [
    lambda a: a[2:5],
    lambda a: a.reshape(-1),
    lambda a: a.transpose(0, 3, 1, 2),
    lambda a: torch.from_numpy(a),
    lambda a: torch.as_tensor(a).permute(0, 3, 1, 2)[1:],
], ids=["slice", "reshape", "transpose", "from_numpy", "tensor-view"])
def test_a_view_or_tensor_outliving_the_array_keeps_its_buffer_out(keeper) -> None:
    """The danger a pool brings: a chunk handed back while a view of it is still queued. Every way the pipeline
    keeps pixels (numpy views, tensors sharing memory) holds the buffer until it is gone itself."""
    pool = BufferPool(4)
    array = pool.empty(SHAPE)
    array[...] = 7
    kept = keeper(array)
    where = _address(array)
    del array
    other = pool.empty(SHAPE)
    assert _address(other) != where
    other[...] = 0
    assert int(np.asarray(kept).min()) == 7 == int(np.asarray(kept).max())
    del kept
    assert _address(pool.empty(SHAPE)) == where


def test_a_copy_does_not_keep_the_buffer() -> None:
    pool = BufferPool(1)
    array = pool.empty(SHAPE)
    where = _address(array)
    copy = array.copy()
    as_float = torch.from_numpy(array).float()
    del array
    assert _address(pool.empty(SHAPE)) == where
    assert copy.shape == SHAPE and as_float.shape == SHAPE


def test_the_pool_keeps_no_more_than_keep() -> None:
    pool = BufferPool(2)
    alive = [pool.empty(SHAPE) for _ in range(5)]
    assert pool.allocated == 5
    del alive
    for _ in range(2):
        pool.empty(SHAPE)  # each dropped at once, so both take the same kept buffer
    assert pool.reused == 2
    held = [pool.empty(SHAPE) for _ in range(3)]
    assert (pool.allocated, pool.reused) == (6, 4)
    del held


def test_smaller_arrays_share_a_buffer_and_a_larger_one_outgrows_the_kept_ones() -> None:
    pool = BufferPool(2)
    big = pool.empty(SHAPE)
    where = _address(big)
    del big
    tail = pool.empty((3, 16, 16, 3))  # a slide's last, shorter chunk
    assert _address(tail) == where and tail.shape == (3, 16, 16, 3)
    del tail
    larger = pool.empty((8, 32, 32, 3))
    assert pool.allocated == 2
    del larger
    assert pool.empty(SHAPE).nbytes == np.prod(SHAPE)
    assert pool.reused == 2  # the larger buffer serves the smaller request; the outgrown one was dropped


def test_other_dtypes_and_keep_zero() -> None:
    pool = BufferPool(1)
    floats = pool.empty((4, 5), np.float32)
    floats[...] = 1.5
    assert floats.dtype == np.float32 and float(floats.sum()) == 30.0
    plain = BufferPool(0)
    array = plain.empty(SHAPE)
    assert array.flags.owndata and (plain.allocated, plain.reused) == (0, 0)
    with pytest.raises(ValueError, match="keep"):
        BufferPool(-1)


def test_threads_never_share_a_buffer() -> None:
    """Eight threads take, fill, check and drop arrays of one small pool: a buffer handed to two holders at once
    would show another thread's fill."""
    pool = BufferPool(3)
    errors: list[str] = []

    def work(mark: int) -> None:
        for _ in range(300):
            array = pool.empty(SHAPE)
            array[...] = mark
            view = array[1:]
            del array
            if int(view.min()) != mark or int(view.max()) != mark:
                errors.append(f"thread {mark} saw another thread's pixels")
            del view

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.reused > 0


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid(tmp_path_factory.mktemp("pool") / "p.svs", "jpeg_ycbcr", width=776, height=520, tile=128)


@pytest.mark.parametrize("reader", [TileOnceReader, RegionReader])
def test_readers_reuse_chunks_and_held_chunks_stay_intact(pyramid: Path, reader: type) -> None:
    """Read twice through one small pool: dropping each chunk as it comes reuses buffers, and pixels equal a reader
    without a pool; holding every chunk (as a deep queue would) allocates instead and overwrites none."""
    handle = LibHandle(pyramid, "tiffslide")
    coords = grid_coords(handle.info, 0, 96, 64)
    want = collect(reader(threads=2).iter_patches(handle, coords, 96, 8), len(coords), 96, 8)
    pool = BufferPool(2)
    got = collect(reader(threads=2, buffers=pool).iter_patches(handle, coords, 96, 8), len(coords), 96, 8)
    np.testing.assert_array_equal(got, want)
    assert pool.reused > 0 and pool.allocated <= 3
    held = list(reader(threads=2, buffers=pool).iter_patches(handle, coords, 96, 8))
    gc.collect()
    for rows, pixels in held:
        np.testing.assert_array_equal(pixels, want[rows])


def test_batches_joined_across_slides_come_from_the_pool_and_keep_their_pixels() -> None:
    """Chunks of 5, 3, 7 and 4 rows into batches of 4: a batch within one chunk is a view of it (no copy); a batch
    joined from two is a copy in a pooled buffer with the right pixels, even while the earlier ones are held."""
    pool = BufferPool(2)
    batcher = Batcher(4, pool)
    chunks = [_chunk(0, 0, 5), _chunk(1, 0, 3), _chunk(2, 10, 7), _chunk(3, 0, 4)]
    out = [batch for chunk in chunks for batch in batcher.add(chunk)]
    assert [len(b) for b in out] == [4, 4, 4, 4]
    assert _labels(out[1]) == [(0, 4), (1, 0), (1, 1), (1, 2)]
    assert np.shares_memory(out[0].pixels, chunks[0].pixels) and np.shares_memory(out[2].pixels, chunks[2].pixels)
    assert (pool.allocated, pool.reused) == (2, 0)
    for batch in out:
        np.testing.assert_array_equal(batch.pixels[:, 0, 0, 0], batch.slide_ids)
        np.testing.assert_array_equal(batch.pixels[:, 0, 0, 1], batch.rows % 256)
    del out
    (joined,) = batcher.add(_chunk(4, 0, 1))
    assert _labels(joined) == [(3, 1), (3, 2), (3, 3), (4, 0)]
    np.testing.assert_array_equal(joined.pixels[:, 0, 0, 0], joined.slide_ids)
    assert (pool.allocated, pool.reused) == (2, 1)
