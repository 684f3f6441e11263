"""What the batch backends (DALI, nvImageCodec) share: a pool of engines, start-up probes, routing, device output.

A subclass says how to build one engine (a DALI pipeline, an nvImageCodec decoder), how to prepare a tile's bytes
for it (the colour fix) and how to run one batch. On CUDA every engine owns a high-priority stream; the batch's
pixels are copied once into torch memory on that stream (so their lifetime no longer depends on the engine's
buffers) and an event recorded after the copy travels with them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...batching import to_host
from ...protocols import DecodedTiles
from ..tiles import TilePageMeta
from .base import Codec, Counters, ResourcePool, codec_of, cuda_index
from .probe import ProbeResult, compare, probe_tiles

_CODEC_NAMES = {1: "uncompressed", 5: "LZW", 8: "deflate", 32946: "deflate", 50000: "zstd", 50001: "WebP"}


@dataclass(eq=False)
class Engine:
    """One pooled engine: the backend's object and, on CUDA, the stream its batches run on."""

    handle: Any
    stream: Any


class BatchedDecoder:
    """Base of the DALI and nvImageCodec backends (implements `TileDecoder` with the subclass hooks).

    Args:
        device: "cpu" (the library's CPU backend) or "cuda:N".
        batch_size: Most tiles per engine call.
        engines: Engines in the pool (concurrent batch calls).
    """

    name = "batched"

    def __init__(self, device: str, batch_size: int, engines: int) -> None:
        if batch_size < 1:
            raise ValueError(f"decoder batch size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self.cuda = cuda_index(device)
        self._pool: ResourcePool[Engine] = ResourcePool(self._new_engine, engines)
        self._counters = Counters()
        self._probes: dict[Codec, ProbeResult] = {}
        self._lock = threading.Lock()
        self._ready = False

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _build(self, stream: Any) -> Any:
        """A new backend object (pipeline, decoder) whose work goes to `stream` (None on the CPU)."""
        raise NotImplementedError

    def _prepare(self, raw: bytes, meta: TilePageMeta) -> bytes:
        """The stream this backend decodes for one stored tile (tables merged, colour fix applied)."""
        raise NotImplementedError

    def _run(self, engine: Engine, streams: list[bytes], meta: TilePageMeta) -> list[Any]:
        """Decode one batch on `engine`: host numpy arrays on the CPU, torch tensors on CUDA (any lifetime)."""
        raise NotImplementedError

    # -- protocol -------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Build the engines and run the colour probes (idempotent, thread-safe)."""
        with self._lock:
            if self._ready:
                return
            self._pool.fill()
            self._probes = self._run_probes()
            self._ready = True

    def probes(self) -> dict[Codec, ProbeResult]:
        """The start-up probe results by codec family (after warm-up)."""
        self.warm_up()
        return dict(self._probes)

    def unsupported(self, meta: TilePageMeta) -> str | None:
        """Why this backend cannot decode `meta`'s tiles exactly, or None: non-JPEG codecs, failed probes."""
        codec = codec_of(meta)
        if codec == "other":
            kind = _CODEC_NAMES.get(meta.compression, f"compression {meta.compression}")
            return f"{kind} tiles: {self.name} decodes JPEG and JPEG 2000 only"
        probe = self.probes()[codec]
        if not probe.ok:
            return (f"{codec} tiles: {self.name} on {self.device} decoded the start-up probe off by mean "
                    f"{probe.mean_abs} (max {probe.max_abs}) grey levels")
        return None

    def decode_batch(self, raws: Sequence[bytes], meta: TilePageMeta) -> DecodedTiles:
        """Decode tiles of one level in engine batches of at most `batch_size`, all on one engine's stream."""
        self.warm_up()
        started = time.perf_counter()
        streams = [self._prepare(raw, meta) for raw in raws]
        pixels: list[Any] = []
        ready = None
        with self._pool.borrow() as engine:
            for k in range(0, len(streams), self.batch_size):
                pixels.extend(self._run(engine, streams[k : k + self.batch_size], meta))
            if engine.stream is not None:
                import torch

                ready = torch.cuda.Event()
                ready.record(engine.stream)
        self._counters.add(len(raws), time.perf_counter() - started)
        return DecodedTiles(pixels, ready)

    def statistics(self) -> dict[str, Any]:
        """Tiles and batches decoded, seconds, and the probe results."""
        probes = {c: {"mean_abs": p.mean_abs, "max_abs": p.max_abs, "ok": p.ok} for c, p in self._probes.items()}
        return {"decoder": self.name, "device": self.device, **self._counters.snapshot(), "probes": probes}

    def close(self) -> None:
        """Drop every engine (their pools are released by the library when the objects go)."""
        with self._lock:
            self._pool.drain()
            self._ready = False

    # -- helpers --------------------------------------------------------------------------------------------------

    def _new_engine(self) -> Engine:
        stream = None
        if self.cuda is not None:
            import torch

            # High priority: decode and cut must not queue behind large encoder GEMMs (gpu.md §1.5).
            stream = torch.cuda.Stream(device=self.cuda, priority=-1)
        return Engine(self._build(stream), stream)

    def _run_probes(self) -> dict[Codec, ProbeResult]:
        results: dict[Codec, ProbeResult] = {}
        with self._pool.borrow() as engine:
            for codec, (raw, meta, want) in probe_tiles().items():
                try:
                    got = to_host(self._run(engine, [self._prepare(raw, meta)], meta)[0])
                except Exception:  # noqa: BLE001 - a backend that cannot decode a family fails its probe
                    got = None
                results[codec] = compare(codec, got, want)
        return results




def stack_on_device(tensors: list[Any], stream: Any) -> list[Any]:
    """Copy per-tile device tensors into one torch allocation on `stream` and return per-tile views of it.

    The copy detaches the pixels from the decoding library's buffers (DALI's output lifetime, nvImageCodec's own
    allocations), so nothing downstream depends on when the library reuses them.
    """
    import torch

    with torch.cuda.stream(stream):
        return list(torch.stack(tensors).unbind(0))
