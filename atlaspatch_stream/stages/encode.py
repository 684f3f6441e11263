"""Stage `encode`: PatchBatch -> FeatureBatch. Batches filled across slides; every encoder sees each batch once."""

from __future__ import annotations

import time
from collections import deque

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..batching import Batcher
from ..buffers import BufferPool
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
    a partial batch runs as soon as nothing more is queued, so a slow reader never stalls a slide's last rows. Each
    forward runs in a worker thread under `limiter` (device submissions). Rows with NaN or Inf are counted where the
    features are and travel with the batch (`FeatureBatch.nonfinite`); the writer decides. Host batches joined from
    several chunks reuse buffers: as many as are in flight, plus the one being filled. Closes `send` when `receive`
    ends. Encoder errors are bugs or a broken device: they propagate and stop the run.
    """
    task_status.started()
    flight = _InFlight(encoders, send, limiter)
    try:
        async with receive, send:
            await anyio.to_thread.run_sync(encoders.warm_up, limiter=limiter)
            batcher = Batcher(batch_size, BufferPool(max(1, encoders.depth) + 1))  # the depth is known once warm
            async for chunk in receive:
                for batch in batcher.add(chunk):
                    await flight.submit(batch)
                if len(batcher) and receive.statistics().current_buffer_used == 0:
                    await flight.submit(batcher.flush())
                    await flight.drain()  # nothing more is coming soon: do not hold finished features back
            if len(batcher):
                await flight.submit(batcher.flush())
            await flight.drain()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(encoders.close, limiter=limiter)


class _InFlight:
    """Batches submitted to the encoders and not yet collected: at most `encoders.depth`, collected in order."""

    def __init__(self, encoders: EncoderSet, send: MemoryObjectSendStream[WriteItem],
                 limiter: anyio.CapacityLimiter) -> None:
        self.encoders = encoders
        self.send = send
        self.limiter = limiter
        self.pending: deque[tuple[PatchBatch, object, float]] = deque()  # (batch, ticket, start time)

    async def submit(self, batch: PatchBatch) -> None:
        """Start one batch; collect (and send on) the oldest once `depth` are in flight."""
        started = time.perf_counter()
        ticket = await anyio.to_thread.run_sync(self.encoders.submit, batch.pixels, batch.encoders,
                                                limiter=self.limiter)
        self.pending.append((batch, ticket, started))
        while len(self.pending) >= max(1, self.encoders.depth):
            await self._collect_oldest()

    async def drain(self) -> None:
        """Collect every batch in flight."""
        while self.pending:
            await self._collect_oldest()

    async def _collect_oldest(self) -> None:
        batch, ticket, started = self.pending.popleft()
        encoded = await anyio.to_thread.run_sync(self.encoders.collect, ticket, limiter=self.limiter)
        await self.send.send(FeatureBatch(batch.slide_ids, batch.rows, encoded.features,
                                          encode_seconds=time.perf_counter() - started,
                                          read_seconds=batch.read_seconds, nonfinite=encoded.nonfinite))
