"""Encoders on their own CUDA streams, fed from a fixed ring of device slots, features back through pinned buffers.

The shape of one batch's life (gpu.md §4.6):

    submit(pixels)      take a free slot k (blocks while none is free: the back-pressure towards the readers)
      input stream      copy the batch into slot k (host batches through a pinned staging buffer) -> event in[k]
      encoder stream e  wait in[k]; preprocess + forward; async copy into the pinned feature buffer [k][e] -> out[k][e]
    collect(ticket)     wait out[k][*] on the host (a worker thread, never the event loop), copy the features out,
                        give slot k back

Ordering is by events only: there is no device-wide `synchronize` anywhere. Device memory is allocated once (the
ring), so no tensor crosses streams through the caching allocator and `record_stream` is never needed for it.

Everything device-specific goes through a small `DeviceOps` object: `CudaOps` (torch.cuda) on a GPU, `InlineOps` on
the CPU (work runs at once, events are born complete), and `atlaspatch_stream.testing.streams.SimulatedOps` in tests,
which defers work per stream and runs it in random interleavings, so a missing wait shows up as wrong features.

An out-of-memory error at a batch halves that encoder's micro-batch once, with a warning; a second one stops the run
with a message that names the encoder and the sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import AtlasPatchError
from ..items import Encoded

if TYPE_CHECKING:
    from ..config import PipelineConfig

log = logging.getLogger("atlaspatch_stream")


class EncoderOutOfMemory(AtlasPatchError):
    """An encoder ran out of device memory even at half the batch size."""


class DeviceOps(Protocol):
    """Streams, events and buffers of one device."""

    device: str

    def stream(self, priority: int) -> Any:
        """A new stream (priority -1 = high, 0 = normal)."""
        ...

    def event(self) -> Any:
        """A new event."""
        ...

    def launch(self, stream: Any, work: Callable[[], None]) -> None:
        """Queue `work` (torch ops writing into preallocated buffers) on `stream`."""
        ...

    def record(self, event: Any, stream: Any) -> None:
        """Mark `event` when everything queued on `stream` so far has run."""
        ...

    def wait(self, stream: Any, event: Any) -> None:
        """Make later work on `stream` wait for `event`'s latest record (no host wait)."""
        ...

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until `event` has fired (call from a worker thread)."""
        ...

    def follow_current(self, stream: Any) -> None:
        """Make later work on `stream` wait for what the calling thread queued so far on its current stream."""
        ...

    def query(self, event: Any) -> bool:
        """True when `event` has fired (never blocks)."""
        ...

    def empty(self, shape: tuple[int, ...], dtype: Any, pinned: bool) -> Any:
        """A new uninitialised tensor: on the device, or in (pinned) host memory."""
        ...


class CudaOps:
    """`DeviceOps` over torch.cuda for one GPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = str(torch.device(device))
        self._torch = torch

    def stream(self, priority: int) -> Any:
        """A torch CUDA stream on this device."""
        return self._torch.cuda.Stream(device=self.device, priority=priority)

    def event(self) -> Any:
        """A torch CUDA event (timing off: cheaper)."""
        return self._torch.cuda.Event()

    def launch(self, stream: Any, work: Callable[[], None]) -> None:
        """Run `work` with `stream` current: its kernels are queued there."""
        with self._torch.cuda.stream(stream):
            work()

    def record(self, event: Any, stream: Any) -> None:
        """`event.record(stream)`."""
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        """`stream.wait_event(event)`."""
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        """`event.synchronize()` (releases the GIL while waiting)."""
        event.synchronize()

    def follow_current(self, stream: Any) -> None:
        """An event on this thread's current stream, waited on by `stream`."""
        stream.wait_stream(self._torch.cuda.current_stream(self.device))

    def query(self, event: Any) -> bool:
        """`event.query()`."""
        return bool(event.query())

    def empty(self, shape: tuple[int, ...], dtype: Any, pinned: bool) -> Any:
        """Device memory, or page-locked host memory for async copies."""
        if pinned:
            return self._torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._torch.empty(shape, dtype=dtype, device=self.device)


class InlineOps:
    """`DeviceOps` for the CPU: work runs when launched, events are complete at once, pinned = ordinary memory."""

    device = "cpu"

    def stream(self, priority: int) -> Any:
        """A placeholder (the CPU has one implicit, synchronous stream)."""
        return None

    def event(self) -> Any:
        """A placeholder event."""
        return None

    def launch(self, stream: Any, work: Callable[[], None]) -> None:
        """Run `work` now."""
        work()

    def record(self, event: Any, stream: Any) -> None:
        """Nothing: work already ran."""

    def wait(self, stream: Any, event: Any) -> None:
        """Nothing: work already ran."""

    def synchronize(self, event: Any) -> None:
        """Nothing: work already ran."""

    def follow_current(self, stream: Any) -> None:
        """Nothing: work already ran."""

    def query(self, event: Any) -> bool:
        """Always complete."""
        return True

    def empty(self, shape: tuple[int, ...], dtype: Any, pinned: bool) -> Any:
        """An ordinary CPU tensor."""
        import torch

        return torch.empty(shape, dtype=dtype)


def device_ops(device: str) -> DeviceOps:
    """`CudaOps` for a CUDA device, else `InlineOps`."""
    return CudaOps(device) if device.startswith("cuda") else InlineOps()


@dataclass(frozen=True)
class Ticket:
    """A submitted batch: its ring slot, row count and the lanes (encoder indices) it runs on."""

    slot: int
    rows: int
    lanes: tuple[int, ...]


@dataclass(eq=False)
class _Lane:
    """One encoder's stream, micro-batch and events (one per slot)."""

    index: int
    encoder: Any
    stream: Any
    done: list[Any]
    micro: int
    halved: bool = False


class EncoderCudaStreams:
    """Runs every encoder on each batch, each encoder on its own stream, through a fixed ring of `slots` slots.

    Args:
        encoders: `DeviceEncoder`s on `ops.device` (`TorchEncoder` is one), warmed up.
        ops: The device's `DeviceOps` (`device_ops(device)`).
        batch_size: Rows per batch (`--feature-batch-size`): the ring's slot size.
        slots: Batches in flight (2-4 is plenty; more only buys memory).

    `submit` and `collect` are blocking and thread-safe; call them from worker threads (one submitting, one
    collecting keeps the device busy while features are written).
    """

    def __init__(self, encoders: Sequence[Any], ops: DeviceOps, *, batch_size: int, slots: int = 3) -> None:
        import torch

        if batch_size < 1 or slots < 1:
            raise ValueError(f"batch_size and slots must be >= 1, got {batch_size} and {slots}")
        self.ops = ops
        self.batch_size = batch_size
        self.slots = slots
        self.input_stream = ops.stream(-1)  # high priority: copies must not queue behind large GEMMs
        self._lanes = [_Lane(i, e, ops.stream(0), [ops.event() for _ in range(slots)], batch_size)
                       for i, e in enumerate(encoders)]
        self._filled = [ops.event() for _ in range(slots)]
        self._free: queue.Queue[int] = queue.Queue()
        for k in range(slots):
            self._free.put(k)
        self._inputs: list[Any] = []
        self._staging: list[Any] = []
        self._features = [[ops.empty((batch_size, lane.encoder.dim), torch.float32, True) for lane in self._lanes]
                          for _ in range(slots)]
        self._bad = [[ops.empty((batch_size,), torch.bool, True) for _ in self._lanes] for _ in range(slots)]
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The encoders' names, in order."""
        return [lane.encoder.name for lane in self._lanes]

    def submit(self, pixels: Any, encoders: frozenset[str] | None = None) -> Ticket:
        """Queue one batch (uint8 (n, P, P, 3), numpy or torch, n <= batch_size) on every encoder (or those named).

        Blocks while every slot is in flight. Returns the ticket to `collect`.
        """
        rows = int(pixels.shape[0])
        if rows > self.batch_size:
            raise ValueError(f"batch of {rows} rows exceeds the ring's batch size {self.batch_size}")
        lanes = [lane for lane in self._lanes if encoders is None or lane.encoder.name in encoders]
        k = self._free.get()
        try:
            self._fill(k, pixels)
            for lane in lanes:
                self._run_lane(lane, k, rows)
        except BaseException:
            self._free.put(k)
            raise
        return Ticket(k, rows, tuple(lane.index for lane in lanes))

    def ready(self, ticket: Ticket) -> bool:
        """True when `collect(ticket)` would not block (poll from the event loop if you like)."""
        return all(self.ops.query(self._lanes[i].done[ticket.slot]) for i in ticket.lanes)

    def collect(self, ticket: Ticket) -> Encoded:
        """Wait for a submitted batch (worker thread), return float32 (n, dim) per encoder and the rows the device
        found non-finite; free its slot."""
        k, rows = ticket.slot, ticket.rows
        try:
            out, nonfinite = {}, {}
            if not ticket.lanes:  # no encoder read the slot: still let its copy finish before the slot is reused
                self.ops.synchronize(self._filled[k])
            for i in ticket.lanes:
                lane = self._lanes[i]
                self.ops.synchronize(lane.done[k])
                out[lane.encoder.name] = self._features[k][i][:rows].numpy().copy()
                bad = self._bad[k][i][:rows].numpy()
                if bad.any():
                    nonfinite[lane.encoder.name] = bad.copy()
            return Encoded(out, nonfinite)
        finally:
            self._free.put(k)

    def close(self) -> None:
        """Drop the ring, so its device and pinned memory go back at once."""
        with self._lock:
            self._inputs, self._staging, self._features, self._bad = [], [], [], []

    # -- internals ------------------------------------------------------------------------------------------------

    def _fill(self, k: int, pixels: Any) -> None:
        """Copy a batch into slot k on the input stream; host batches go through slot k's pinned staging buffer."""
        import torch

        self._allocate(tuple(int(d) for d in pixels.shape[1:]))
        rows = int(pixels.shape[0])
        slot = self._inputs[k]
        if isinstance(pixels, np.ndarray) or pixels.device.type == "cpu":
            stage = self._staging[k]
            stage[:rows].copy_(torch.as_tensor(np.ascontiguousarray(pixels)))  # host memcpy, in this thread
            self.ops.launch(self.input_stream, lambda: slot[:rows].copy_(stage[:rows], non_blocking=True))
        else:
            self.ops.follow_current(self.input_stream)  # the producer's kernels on its own stream come first
            self.ops.launch(self.input_stream, lambda: slot[:rows].copy_(pixels, non_blocking=True))
        self.ops.record(self._filled[k], self.input_stream)

    def _allocate(self, shape: tuple[int, ...]) -> None:
        with self._lock:
            if self._inputs and tuple(self._inputs[0].shape[1:]) == shape:
                return
            if self._inputs:
                raise ValueError(f"patch shape changed from {tuple(self._inputs[0].shape[1:])} to {shape}")
            import torch

            full = (self.batch_size, *shape)
            self._inputs = [self.ops.empty(full, torch.uint8, False) for _ in range(self.slots)]
            staging_pinned = self.ops.device != "cpu"
            self._staging = [self.ops.empty(full, torch.uint8, staging_pinned) for _ in range(self.slots)]

    def _run_lane(self, lane: _Lane, k: int, rows: int) -> None:
        self.ops.wait(lane.stream, self._filled[k])
        while True:
            try:
                self.ops.launch(lane.stream, self._lane_work(lane, k, rows))
                break
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self._halve(lane, rows, exc)  # raises EncoderOutOfMemory the second time
        self.ops.record(lane.done[k], lane.stream)

    def _lane_work(self, lane: _Lane, k: int, rows: int) -> Callable[[], None]:
        """The work of one encoder on slot k: preprocess + forward per micro-batch, async copy of the features."""
        slot, features, bad = self._inputs[k], self._features[k][lane.index], self._bad[k][lane.index]
        encoder, micro = lane.encoder, lane.micro

        def work() -> None:
            import torch

            for start in range(0, rows, micro):
                stop = min(rows, start + micro)
                # A compiled model sees one shape: run the whole micro-batch window, pad rows included.
                end = start + micro if getattr(encoder, "fixed_batch", False) else stop
                out = encoder.encode_device(slot[start : min(end, slot.shape[0])])[: stop - start]
                features[start:stop].copy_(out, non_blocking=True)
                # counted on the device: one bool per row crosses to the host, never a second copy of the features
                bad[start:stop].copy_(torch.isfinite(out).all(dim=1).logical_not_(), non_blocking=True)

        return work

    def _halve(self, lane: _Lane, rows: int, exc: BaseException) -> None:
        name = lane.encoder.name
        if lane.halved or lane.micro == 1:
            raise EncoderOutOfMemory(
                f"encoder {name} ran out of device memory at {lane.micro} patches per forward, already halved "
                f"from {self.batch_size}: lower --feature-batch-size or free the GPU ({exc})"
            ) from exc
        lane.micro, lane.halved = max(1, lane.micro // 2), True
        log.warning("encoder %s ran out of device memory at a batch of %d; retrying at %d patches per forward",
                    name, rows, lane.micro)
        if self.ops.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@dataclass(frozen=True)
class RingLayout:
    """Sizes derived from one GPU memory budget (gpu.md §4.7)."""

    budget_bytes: int
    slots: int
    tile_cache_bytes: int
    patch_queue: int


def ring_layout(free_bytes: int, budget: float, batch_size: int, patch_size: int, dims: Sequence[int]) -> RingLayout:
    """Ring slots, decoded-tile cache and patch-queue depth from `budget` × the device's free memory.

    One slot holds a uint8 batch on the device and in pinned staging, plus each encoder's pinned features. Slots take
    at most a quarter of the budget (2 to 4 of them), the queue of decoded patch chunks ahead of the encoders
    another quarter (at least 2, at most 16 batches), and the decoded-tile cache the rest.
    """
    total = int(free_bytes * budget)
    batch_bytes = batch_size * patch_size * patch_size * 3
    slot_bytes = 2 * batch_bytes + batch_size * sum(dims) * 4
    slots = int(min(4, max(2, (total // 4) // max(1, slot_bytes))))
    queue_depth = int(min(16, max(2, (total // 4) // max(1, batch_bytes))))
    cache = max(0, total - slots * slot_bytes - queue_depth * batch_bytes)
    return RingLayout(total, slots, cache, queue_depth)


TILE_BYTES = 512 * 512 * 3  # a large decoded RGB tile: the unit of the decode-batch ceiling


def free_bytes(device: str) -> int:
    """Free memory of `device`: CUDA's, or the host's available memory (the ring's CPU stand-in)."""
    import os

    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _sizing(device: str, free: int | None) -> str | None:
    """How `size_for_device` sizes a pipeline whose encoders run on `device`: "cuda" on a visible CUDA device (or
    with `free` given), "cpu" on the CPU and for a plain "cuda" without CUDA (the backends fall back to the CPU, as
    `devices.resolve_device`), None for anything else (an explicit "cuda:N" that is not there, which the backends
    refuse with their own message; another device type)."""
    import torch

    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError):
        return None
    if wanted.type == "cpu":
        return "cpu"
    if wanted.type != "cuda":
        return None
    if free is not None or (torch.cuda.is_available() and (wanted.index or 0) < torch.cuda.device_count()):
        return "cuda"
    return "cpu" if wanted.index is None else None


def size_for_device(config: PipelineConfig, free: int | None = None) -> PipelineConfig:
    """On a CUDA feature device, the patch queue and the decode batch from `encode.gpu_memory_budget`; on the CPU,
    `PipelineConfig.sized_for_cpu`.

    `ring_layout`'s patch-queue share becomes the `patches` stream's depth (in reader chunks), and its tile-cache share
    caps `read.decode_batch` (a reader holds the tiles of two decode batches at once: the one being cut and the one
    decoded ahead), so a small GPU or a small budget shrinks both; the configured sizes stay the ceilings. Without
    encoders, or where `_sizing` says neither, the configuration is returned unchanged. `free`: the device's free
    bytes (default: asked of the device).
    """
    sizing = _sizing(config.feature_device, free) if config.encode.extractors else None
    if sizing == "cpu":
        return config.sized_for_cpu()
    if sizing != "cuda":
        return config
    enc, read = config.encode, config.read
    available = free_bytes(config.feature_device) if free is None else free
    plan = ring_layout(available, enc.gpu_memory_budget, enc.batch_size, config.plan.patch_size, ())
    chunks = max(2, -(-plan.patch_queue * enc.batch_size // read.chunk_patches))
    decode_batch = int(min(read.decode_batch, max(16, plan.tile_cache_bytes // (2 * TILE_BYTES))))
    log.debug("sized from %.1f GB free x %.2f: patch queue %d chunks, decode batch %d tiles",
              available / 1e9, enc.gpu_memory_budget, chunks, decode_batch)
    return config.replace(queues=dataclasses.replace(config.queues, patches=chunks),
                          read=dataclasses.replace(read, decode_batch=decode_batch))
