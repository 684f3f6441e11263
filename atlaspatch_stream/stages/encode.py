"""Stage `encode`: PatchBatch -> FeatureBatch. Batches filled across slides; every encoder sees each batch once."""

from __future__ import annotations

import time

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..batching import Batcher
from ..items import FeatureBatch, PatchBatch, WriteItem
from ..protocols import EncoderSet


async def run(
    receive: MemoryObjectReceiveStream[PatchBatch],
    send: MemoryObjectSendStream[WriteItem],
    *,
    encoders: EncoderSet,
    batch_size: int,
    limiter: anyio.CapacityLimiter,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """PatchBatch chunks (any slides) -> FeatureBatch of `batch_size` rows with every encoder's output.

    The stage reports ready at once and loads its models (weights already found by `make_encoders`) while the first
    slides are opened and segmented, so the first batch does not wait for the load; a weight file that cannot be
    loaded stops the run from here. Rows from several slides share a batch (the device never idles between slides);
    a partial batch runs as soon as nothing more is queued, so a slow reader never stalls a slide's last rows. Each forward runs in a worker thread under `limiter` (device submissions). Closes
    `send` when `receive` ends. Encoder errors are bugs or a broken device: they propagate and stop the run.
    """
    task_status.started()
    batcher = Batcher(batch_size)
    try:
        async with receive, send:
            await anyio.to_thread.run_sync(encoders.warm_up, limiter=limiter)
            async for chunk in receive:
                for batch in batcher.add(chunk):
                    await send.send(await _encode(batch, encoders, limiter))
                if len(batcher) and receive.statistics().current_buffer_used == 0:
                    await send.send(await _encode(batcher.flush(), encoders, limiter))
            if len(batcher):
                await send.send(await _encode(batcher.flush(), encoders, limiter))
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(encoders.close, limiter=limiter)


async def _encode(batch: PatchBatch, encoders: EncoderSet, limiter: anyio.CapacityLimiter) -> FeatureBatch:
    started = time.perf_counter()
    features = await anyio.to_thread.run_sync(encoders.encode, batch.pixels, batch.encoders, limiter=limiter)
    return FeatureBatch(batch.slide_ids, batch.rows, features, encode_seconds=time.perf_counter() - started,
                        read_seconds=batch.read_seconds)
