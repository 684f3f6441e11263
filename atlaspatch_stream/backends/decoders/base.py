"""The tile-decoder protocol shared by every backend, and the byte-level preparation all of them need.

A decoder turns the stored bytes of tiles of one pyramid level into RGB uint8 pixels on its device. The reader hands
it whole batches (one `decode_batch` call per batch of tiles), so GPU backends get the batches their engines need
and the CPU backend gets batches of one, decoded in the reader's own threads.

Colour rules (reference gpu.md §1.8): Aperio stores RGB samples as JPEG without the APP14/JFIF marker that would
say so, and only the TIFF photometric tag tells. Each backend applies its own fix: the CPU reference forces the
source colour space in libjpeg-turbo, DALI gets an APP14 "transform = 0" segment inserted after SOI, nvImageCodec
decodes with `ColorSpec.SYCC` (no colour conversion). Abbreviated tile streams are completed with the level's
shared JPEGTables first (`full_jpeg`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, Literal, TypeVar

from ..tiles import JPEG, JPEG2000, TilePageMeta

Codec = Literal["jpeg_rgb", "jpeg_ycbcr", "jpeg2000", "other"]

_PHOTOMETRIC_RGB = 2
# APP14 "Adobe" segment, version 100, flags 0/0, transform 0: the components are RGB, not YCbCr.
APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def codec_of(meta: TilePageMeta) -> Codec:
    """The codec family of a level, as routing sees it."""
    if meta.compression == JPEG:
        return "jpeg_rgb" if meta.jpeg_colorspace == _PHOTOMETRIC_RGB else "jpeg_ycbcr"
    if meta.compression in JPEG2000:
        return "jpeg2000"
    return "other"


def full_jpeg(raw: bytes, meta: TilePageMeta) -> bytes:
    """A self-contained JPEG stream: the shared JPEGTables (without EOI) merged ahead of the tile (without SOI)."""
    tables = meta.jpegtables
    if not tables or len(tables) <= 4:
        return raw
    return tables[:-2] + raw[2:]


def with_app14_rgb(stream: bytes) -> bytes:
    """`stream` with an APP14 transform=0 segment right after SOI, so any libjpeg-style decoder keeps RGB as RGB."""
    return stream[:2] + APP14_RGB + stream[2:]


T = TypeVar("T")


class ResourcePool(Generic[T]):
    """A fixed set of non-thread-safe objects (DALI pipelines, nvImageCodec decoders) lent to one thread at a time.

    DALI and nvImageCodec recommend one pipeline/decoder per calling thread; the reader's threads come and go per
    slide, so objects are pooled instead of kept per thread: bounded, built once, never leaked.
    """

    def __init__(self, build: Callable[[], T], size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self._build = build
        self._size = size
        self._items: queue.Queue[T] = queue.Queue()
        self._built: list[T] = []
        self._lock = threading.Lock()

    def fill(self) -> None:
        """Build every object now (idempotent), so failures surface at warm-up, not at the first slide."""
        with self._lock:
            while len(self._built) < self._size:
                item = self._build()
                self._built.append(item)
                self._items.put(item)

    @contextmanager
    def borrow(self) -> Iterator[T]:
        """Lend one object to the calling thread (blocks while all are lent)."""
        self.fill()
        item = self._items.get()
        try:
            yield item
        finally:
            self._items.put(item)

    def drain(self) -> None:
        """Drop every object from the pool (the libraries release them when they go); it refills on next use."""
        with self._lock:
            self._built = []
            self._items = queue.Queue()


class Counters:
    """Thread-safe decode counters shared by the backends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tiles = 0
        self.batches = 0
        self.seconds = 0.0

    def add(self, tiles: int, seconds: float) -> None:
        """Count one decoded batch."""
        with self._lock:
            self.tiles += tiles
            self.batches += 1
            self.seconds += seconds

    def snapshot(self) -> dict[str, Any]:
        """The counters as a plain dict."""
        with self._lock:
            return {"tiles": self.tiles, "batches": self.batches, "seconds": round(self.seconds, 4)}


def cuda_index(device: str) -> int | None:
    """The CUDA ordinal of "cuda" / "cuda:N" (None for the CPU)."""
    if not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index) if index else 0
