"""Stage `encode` driven through memory streams: cross-slide batches, early partial batches, subsets for reused
slides, cancellation mid-batch, and device errors that stop the run."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

from atlaspatch_stream.backends.encoders.group import EncoderGroup
from atlaspatch_stream.batching import slide_chunk
from atlaspatch_stream.items import FeatureBatch, PatchBatch, WriteItem
from atlaspatch_stream.stages import encode
from atlaspatch_stream.testing.fakes import FakeEncoder

pytestmark = pytest.mark.anyio


class Recording(FakeEncoder):
    """Records the batch sizes it saw and whether it was closed."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        super().__init__(name=name, delay=delay)
        self.sizes: list[int] = []
        self.closed = False

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        self.sizes.append(len(pixels))
        return super().encode(pixels)

    def close(self) -> None:
        self.closed = True


def _chunk(slide_id: int, start: int, n: int, needed: frozenset[str] | None = None) -> PatchBatch:
    rows = np.arange(start, start + n, dtype=np.int64)
    pixels = np.full((n, 8, 8, 3), slide_id * 10 + start, np.uint8)
    return slide_chunk(slide_id, rows, pixels, 0.01, needed)


async def _run(chunks: list[PatchBatch], encoders: EncoderGroup, batch: int) -> list[FeatureBatch]:
    send_in, receive_in = anyio.create_memory_object_stream[PatchBatch](len(chunks))
    send, receive = anyio.create_memory_object_stream[WriteItem](100)
    for c in chunks:
        send_in.send_nowait(c)
    send_in.close()
    with anyio.fail_after(10):
        await encode.run(receive_in, send, encoders=encoders, batch_size=batch, limiter=anyio.CapacityLimiter(1))
        return [b async for b in receive if isinstance(b, FeatureBatch)]


async def test_batches_fill_across_slides_and_keep_row_labels(tmp_path: object) -> None:
    """Chunks of 3 rows from two slides, batch size 4, all queued: batches of 4, 2 (the rest); rows keep their
    (slide, row) labels; both encoders see every batch once."""
    a, b = Recording("a"), Recording("b")
    chunks = [_chunk(0, 0, 3), _chunk(1, 0, 3)]
    out = await _run(chunks, EncoderGroup([a, b]), batch=4)
    assert [len(f.rows) for f in out] == [4, 2] and a.sizes == b.sizes == [4, 2]
    labels = [(int(s), int(r)) for f in out for s, r in zip(f.slide_ids, f.rows, strict=True)]
    assert labels == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(set(f.features) == {"a", "b"} and f.features["a"].shape == (len(f.rows), 3) for f in out)
    assert a.closed and b.closed


async def test_reused_slides_only_run_their_missing_encoders(tmp_path: object) -> None:
    """A chunk of a reused slide that lacks only `b` is encoded by `b` alone."""
    a, b = Recording("a"), Recording("b")
    [batch] = await _run([_chunk(0, 0, 2, frozenset({"b"}))], EncoderGroup([a, b]), batch=8)
    assert set(batch.features) == {"b"} and a.sizes == [] and b.sizes == [2]


async def test_a_partial_batch_runs_when_nothing_more_is_queued(tmp_path: object) -> None:
    """A slow upstream sends one chunk of 3 with batch size 32: it is encoded at once, not held until more rows
    come (a slide's last rows never wait for another slide)."""
    a = Recording("a")
    send_in, receive_in = anyio.create_memory_object_stream[PatchBatch](4)
    send, receive = anyio.create_memory_object_stream[WriteItem](4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: encode.run(receive_in, send, encoders=EncoderGroup([a]), batch_size=32,
                                             limiter=anyio.CapacityLimiter(1)))
            await send_in.send(_chunk(0, 0, 3))
            first = await receive.receive()
            await send_in.aclose()
    assert isinstance(first, FeatureBatch) and len(first.rows) == 3


async def test_cancellation_mid_batch_closes_the_models(tmp_path: object) -> None:
    """Cancelled while a slow forward runs, the stage returns promptly (the forward finishes in its thread) and
    closes every model."""
    slow = Recording("a", delay=0.3)
    send_in, receive_in = anyio.create_memory_object_stream[PatchBatch](4)
    send, _receive = anyio.create_memory_object_stream[WriteItem](4)
    for i in range(4):
        send_in.send_nowait(_chunk(0, i * 8, 8))
    started = time.monotonic()
    with anyio.fail_after(10), anyio.move_on_after(0.1):
        await encode.run(receive_in, send, encoders=EncoderGroup([slow]), batch_size=8, limiter=anyio.CapacityLimiter(1))
    assert slow.closed and time.monotonic() - started < 2 and len(slow.sizes) <= 2


class DeviceLost(Recording):
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA error: device-side assert triggered")


async def test_an_encoder_error_propagates(tmp_path: object) -> None:
    """An encoder that raises is a broken device or a bug: the stage stops with that error, models closed."""
    broken = DeviceLost("a")
    with pytest.raises(RuntimeError, match="device-side assert"):
        await _run([_chunk(0, 0, 4)], EncoderGroup([broken]), batch=4)
    assert broken.closed


class SlowToLoad(Recording):
    def warm_up(self) -> None:
        time.sleep(0.5)
        self.loaded_at = time.monotonic()


async def test_models_load_after_the_stage_reports_ready(tmp_path: object) -> None:
    """The stage is ready at once and loads its (slow) model in the background, so upstream stages start opening
    and segmenting slides meanwhile; the first batch runs once the model is loaded."""
    slow = SlowToLoad("a")
    send_in, receive_in = anyio.create_memory_object_stream[PatchBatch](4)
    send, receive = anyio.create_memory_object_stream[WriteItem](4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            started = time.monotonic()
            await tg.start(lambda task_status: encode.run(receive_in, send, encoders=EncoderGroup([slow]),
                                                          batch_size=4, limiter=anyio.CapacityLimiter(1),
                                                          task_status=task_status))
            ready_after = time.monotonic() - started
            await send_in.send(_chunk(0, 0, 4))
            first = await receive.receive()
            await send_in.aclose()
    assert ready_after < 0.3 and isinstance(first, FeatureBatch) and slow.sizes == [4]
    assert slow.loaded_at - started >= 0.5


def test_streamed_encoders_through_the_stage_equal_the_cpu_group(tmp_path: object) -> None:
    """The CUDA encoder set (each device encoder on its own stream through the ring, `depth` batches in flight),
    run with its CPU stand-in and a plugin-style host encoder beside a real torch encoder: the stage's features
    are those of the plain CPU group, batch for batch, rows in the same order."""
    import torch
    import torch.nn as nn

    from atlaspatch_stream.backends.encoders.group import CudaEncoderGroup
    from atlaspatch_stream.backends.encoders.runtime import TorchEncoder
    from atlaspatch_stream.backends.encoders.spec import EncoderSpec, Preprocess

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    spec = EncoderSpec(name="tiny", dim=6, build=build,
                       preprocess=Preprocess(resize=None, crop=None, mean=(0.5,) * 3, std=(0.25,) * 3))
    chunks = [_chunk(0, 0, 5), _chunk(1, 0, 7), _chunk(2, 0, 6)]

    def run(make: object) -> list[FeatureBatch]:
        return anyio.run(_run, chunks, make, 4)  # type: ignore[arg-type]

    reference = run(EncoderGroup([TorchEncoder(spec, device="cpu", precision="float32"), Recording("host")]))
    streamed = CudaEncoderGroup([TorchEncoder(spec, device="cpu", precision="float32"), Recording("host")], "cpu",
                                batch_size=4, patch_size=8, memory_budget=0.5)
    got = run(streamed)
    assert [len(f.rows) for f in got] == [len(f.rows) for f in reference]
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.features["tiny"], b.features["tiny"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a.features["host"], b.features["host"])
